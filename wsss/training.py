"""Generic SGD training loop shared by the classifier and AffinityNet (and wrapped by Ray Train in
the pipelines): the model-specific parts are a `make_example(sample, rng)` function that turns one
sample into augmented arrays and a `step_loss(model, batch)` function."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal, TypeVar

import numpy as np
import torch
from pydantic import Field
from torch import nn

from wsss.params import Params

Batch = dict[str, torch.Tensor]
Example = dict[str, np.ndarray]
StepLoss = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]
EpochEnd = Callable[[int, dict[str, float]], None]
EpochStart = Callable[[int], None]
Sample = TypeVar("Sample")
Model = TypeVar("Model", bound=nn.Module)


class OptimParams(Params):
    """Optimizer and poly learning-rate decay (IRN: SGD, 5 epochs, batch 16, lr 0.1, head x10)."""

    # "sgd" is the method's optimizer (IRN, PSA), tuned for ImageNet-initialised backbones.
    # From a random initialisation (no pretrained weights reachable) SGD learns far more slowly;
    # "adamw" (typically lr 1e-3, head_lr_mult 1) gets there within the same few epochs.
    algorithm: Literal["sgd", "adamw"] = "sgd"
    epochs: int = Field(default=5, gt=0)
    batch_size: int = Field(default=16, gt=0)
    lr: float = Field(default=0.1, gt=0)
    # Newly added layers (classifier head, AffinityNet projections) learn this much faster.
    head_lr_mult: float = Field(default=10.0, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)  # SGD only
    poly_power: float = Field(default=0.9, gt=0)


def epoch_summary(what: str, epoch: int, epochs: int, metrics: dict[str, float]) -> str:
    """The progress line of one finished epoch (0-based `epoch` of `epochs`)."""
    return (
        f"  {what} epoch {epoch + 1}/{epochs}: loss {metrics['loss']:.4f} "
        f"({metrics['samples_per_s']:.1f} samples/s)"
    )


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def param_groups(model: nn.Module, lr: float, head_lr_mult: float) -> list[dict]:
    """Optimizer groups of a network with a pretrained `backbone`: its trainable parameters at
    `lr`, every other (new) layer's at `lr * head_lr_mult` (IRN trains its new layers 10x)."""
    backbone = {id(p) for p in model.backbone.parameters()}
    return [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": lr},
        {
            "params": [p for p in model.parameters() if id(p) not in backbone],
            "lr": lr * head_lr_mult,
        },
    ]


def check_samples(samples: Sequence[Sample], check: Callable[[Sample], None]) -> None:
    """Raise ValueError naming the first sample `check` rejects (or that there are none)."""
    if len(samples) == 0:
        raise ValueError("no training samples")
    for i, sample in enumerate(samples):
        try:
            check(sample)
        except ValueError as err:
            raise ValueError(f"samples[{i}]: {err}") from None


def make_optimizer(param_groups: list[dict], params: OptimParams) -> torch.optim.Optimizer:
    """SGD (or AdamW) over `param_groups` (groups without their own "lr" get `params.lr`).

    Weight decay goes to SGD's `weight_decay` argument; PSA and SEAM passed it positionally into
    the momentum slot by mistake."""
    if params.algorithm == "adamw":
        return torch.optim.AdamW(param_groups, lr=params.lr, weight_decay=params.weight_decay)
    return torch.optim.SGD(
        param_groups, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, params: OptimParams
) -> torch.optim.lr_scheduler.PolynomialLR:
    """Poly decay stepped once per batch: lr_t = lr_0 * (1 - t / total_steps) ** poly_power."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return torch.optim.lr_scheduler.PolynomialLR(
        optimizer, total_iters=total_steps, power=params.poly_power
    )


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _batch_size(batch: Batch) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise ValueError(f"batch has no tensor to count samples in (keys: {sorted(batch)})")


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    step_loss: StepLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    device: torch.device | str,
) -> dict[str, float]:
    """One pass over `batches`, one optimizer (and scheduler) step per batch.

    Returns the sample-weighted mean "loss" and mean of each named loss part, plus "steps",
    "samples", "seconds" and "samples_per_s". The sample count of a batch is the leading
    dimension of its first tensor.
    """
    device = torch.device(device)
    model.train()
    totals: dict[str, float] = {}
    steps = samples = 0
    start = time.perf_counter()
    for batch in batches:
        batch = _to_device(batch, device)
        n = _batch_size(batch)
        loss, parts = step_loss(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {steps}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        for name, value in {"loss": loss.item(), **parts}.items():
            totals[name] = totals.get(name, 0.0) + float(value) * n
        steps += 1
        samples += n
    if steps == 0:
        raise ValueError("train_one_epoch got no batches")
    seconds = time.perf_counter() - start
    metrics = {name: total / samples for name, total in totals.items()}
    metrics.update(
        steps=float(steps),
        samples=float(samples),
        seconds=seconds,
        samples_per_s=samples / seconds if seconds > 0 else math.inf,
    )
    return metrics


def fit(
    model: nn.Module,
    epoch_batches: Callable[[int], Iterable[Batch]],
    step_loss: StepLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    epochs: int,
    device: torch.device | str,
    start_epoch: int = 0,
    on_epoch_end: EpochEnd | None = None,
    on_epoch_start: EpochStart | None = None,
) -> list[dict[str, float]]:
    """Train epochs `start_epoch .. epochs - 1` (a resumed run passes the epoch to start at);
    `epoch_batches(epoch)` gives that epoch's batches. Returns each epoch's metrics (with
    "epoch"); `on_epoch_start(epoch)` is called before each epoch, `on_epoch_end(epoch,
    metrics)` after it (checkpointing, reporting)."""
    if not 0 <= start_epoch <= epochs:
        raise ValueError(f"start_epoch must be in [0, epochs={epochs}], got {start_epoch}")
    model.to(device)
    history = []
    for epoch in range(start_epoch, epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        metrics = train_one_epoch(
            model, epoch_batches(epoch), step_loss, optimizer, scheduler, device
        )
        metrics["epoch"] = float(epoch)
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    return history


def collate(examples: Iterable[dict[str, np.ndarray]]) -> Batch:
    """Stack per-sample numpy arrays into one batch of tensors, key by key."""
    examples = list(examples)
    if not examples:
        raise ValueError("collate got no examples")
    return {
        key: torch.from_numpy(np.stack([example[key] for example in examples]))
        for key in examples[0]
    }


def shuffled_batches(
    samples: Sequence[Sample],
    make_example: Callable[[Sample, np.random.Generator], Example],
    batch_size: int,
    rng: np.random.Generator,
) -> Iterator[Batch]:
    """One epoch of batches: the samples in an order drawn from `rng`, each made into an example
    by `make_example(sample, rng)` (augmentation draws from the same `rng`, after the order),
    collated `batch_size` at a time (the last batch may be smaller)."""
    order = rng.permutation(len(samples))
    for start in range(0, len(order), batch_size):
        yield collate(make_example(samples[i], rng) for i in order[start : start + batch_size])


def train_in_process(
    model: Model,
    samples: Sequence[Sample],
    make_example: Callable[[Sample, np.random.Generator], Example],
    step_loss: StepLoss,
    optim_params: OptimParams,
    seed: int,
    device: torch.device | str | None = None,
    on_epoch_end: EpochEnd | None = None,
    on_epoch_start: EpochStart | None = None,
) -> Model:
    """Train `model` in this process for `optim_params.epochs` epochs of `shuffled_batches`, with
    the poly schedule over all steps; `model` has a `backbone` (`param_groups`).
    Epoch e's order and augmentation depend only on (seed, e). `device` defaults to
    `default_device()`. Returns the model in eval mode."""
    device = torch.device(device) if device is not None else default_device()
    optimizer = make_optimizer(
        param_groups(model, optim_params.lr, optim_params.head_lr_mult), optim_params
    )
    steps_per_epoch = math.ceil(len(samples) / optim_params.batch_size)
    scheduler = make_scheduler(optimizer, steps_per_epoch * optim_params.epochs, optim_params)

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([seed, epoch])
        return shuffled_batches(samples, make_example, optim_params.batch_size, rng)

    fit(
        model,
        epoch_batches,
        step_loss,
        optimizer,
        scheduler,
        optim_params.epochs,
        device,
        on_epoch_end=on_epoch_end,
        on_epoch_start=on_epoch_start,
    )
    return model.eval()
