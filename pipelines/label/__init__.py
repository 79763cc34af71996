"""Labeling on Ray Data: `job` is `wsss label` (plan, the model actors, the CPU pool, the
summary) and `rows` what happens to a row on its way (manifest validation, fetch and decode,
the anti-join against finished shards, the shard sink). `pipelines.relabel` runs `job` on the
new or changed images of a night."""
