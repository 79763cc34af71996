"""Training on Ray Train: `job` is the job every network's training runs (Ray Data feeding
data-parallel workers, checkpoints in storage, resume, the model record), and each network has
its module that configures it (`classifier`, `affinity`): its examples, its loss, its inputs.
A new network's training is one module here and its entry in `pipelines.run.TRAINERS`."""
