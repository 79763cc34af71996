from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from wsss.training import (
    OptimParams,
    collate,
    fit,
    make_optimizer,
    make_scheduler,
    shuffled_batches,
    train_in_process,
    train_one_epoch,
)
from wsss.transforms import IMAGENET_MEAN, IMAGENET_STD, AugmentParams, augment, normalize

torch.set_num_threads(1)


def _two_groups(model: nn.Module, lr: float) -> list[dict]:
    return [{"params": [model.weight], "lr": lr}, {"params": [model.bias], "lr": 10 * lr}]


def test_optimizer_puts_weight_decay_and_momentum_in_their_own_slots():
    model = nn.Linear(3, 2)
    params = OptimParams(lr=0.05, weight_decay=3e-4, momentum=0.8)
    optimizer = make_optimizer(_two_groups(model, params.lr), params)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [3e-4, 3e-4]
    assert [g["momentum"] for g in optimizer.param_groups] == [0.8, 0.8]
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, pytest.approx(0.5)]
    # Groups without their own lr take params.lr.
    plain = make_optimizer([{"params": list(model.parameters())}], params)
    assert plain.param_groups[0]["lr"] == 0.05
    adamw = make_optimizer(
        _two_groups(model, 1e-3), params.model_copy(update={"algorithm": "adamw"})
    )
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [3e-4, 3e-4]
    assert [g["lr"] for g in adamw.param_groups] == [1e-3, pytest.approx(1e-2)]


def test_weight_decay_shrinks_weights_without_gradient():
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 2.0)
    params = OptimParams(lr=0.1, weight_decay=0.5, momentum=0.0)
    optimizer = make_optimizer([{"params": list(model.parameters())}], params)
    (model.weight * 0).sum().backward()  # zero gradient: only the decay moves the weight
    optimizer.step()
    assert model.weight.item() == pytest.approx(2.0 - 0.1 * 0.5 * 2.0)


def test_poly_schedule_values_for_every_group():
    model = nn.Linear(3, 2)
    params = OptimParams(lr=0.1, poly_power=0.9)
    optimizer = make_optimizer(_two_groups(model, params.lr), params)
    total = 10
    scheduler = make_scheduler(optimizer, total, params)
    seen = []
    for _ in range(total):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for step, (lr_backbone, lr_head) in enumerate(seen):
        factor = (1 - step / total) ** 0.9
        assert lr_backbone == pytest.approx(0.1 * factor)
        assert lr_head == pytest.approx(1.0 * factor)
    assert seen[5][0] == pytest.approx(0.1 * 0.5**0.9)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="total_steps"):
        make_scheduler(optimizer, 0, params)


def _regression_batches(epoch: int, n_batches: int = 16, batch_size: int = 4):
    generator = torch.Generator().manual_seed(epoch)
    for _ in range(n_batches):
        x = torch.randn(batch_size, 2, generator=generator)
        yield {"x": x, "y": x @ torch.tensor([[2.0], [-1.0]]) + 0.5}


def _mse_step_loss(model, batch):
    loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
    return loss, {"mse": loss.item(), "const": 1.0}


def test_train_one_epoch_reports_weighted_means_and_counts():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    params = OptimParams(lr=0.05, weight_decay=0.0, momentum=0.0)
    optimizer = make_optimizer([{"params": list(model.parameters())}], params)
    batches = [
        {"x": torch.ones(3, 2), "y": torch.zeros(3, 1)},
        {"x": torch.ones(1, 2), "y": torch.zeros(1, 1)},
    ]
    losses = []

    def recording_loss(model, batch):
        loss, parts = _mse_step_loss(model, batch)
        losses.append(loss.item())
        return loss, parts

    metrics = train_one_epoch(model, batches, recording_loss, optimizer, None, "cpu")
    assert metrics["steps"] == 2 and metrics["samples"] == 4
    assert metrics["loss"] == pytest.approx((3 * losses[0] + 1 * losses[1]) / 4)
    assert metrics["mse"] == pytest.approx(metrics["loss"])
    assert metrics["const"] == pytest.approx(1.0)
    assert metrics["seconds"] > 0
    assert metrics["samples_per_s"] == pytest.approx(4 / metrics["seconds"])
    assert losses[1] < losses[0]  # the first step moved the weights


def test_fit_learns_resumes_and_calls_back():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    params = OptimParams(lr=0.05, momentum=0.5, weight_decay=0.0)
    optimizer = make_optimizer([{"params": list(model.parameters())}], params)
    epochs = 6
    scheduler = make_scheduler(optimizer, 16 * epochs, params)
    called = []
    history = fit(
        model,
        _regression_batches,
        _mse_step_loss,
        optimizer,
        scheduler,
        epochs=epochs,
        device="cpu",
        start_epoch=2,
        on_epoch_end=lambda epoch, metrics: called.append((epoch, metrics["loss"])),
    )
    assert [m["epoch"] for m in history] == [2, 3, 4, 5]
    assert called == [(int(m["epoch"]), m["loss"]) for m in history]
    assert history[-1]["loss"] < 0.05 * history[0]["loss"]
    torch.testing.assert_close(
        model.weight.detach(), torch.tensor([[2.0, -1.0]]), atol=0.05, rtol=0
    )
    with pytest.raises(ValueError, match="start_epoch"):
        fit(model, _regression_batches, _mse_step_loss, optimizer, None, 3, "cpu", start_epoch=4)


def test_bad_loss_and_empty_epoch_raise():
    model = nn.Linear(2, 1)
    optimizer = make_optimizer([{"params": list(model.parameters())}], OptimParams())

    def nan_loss(model, batch):
        return model(batch["x"]).sum() * float("nan"), {}

    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 0"):
        train_one_epoch(model, _regression_batches(0), nan_loss, optimizer, None, "cpu")
    with pytest.raises(ValueError, match="no batches"):
        train_one_epoch(model, [], _mse_step_loss, optimizer, None, "cpu")


def test_collate_stacks_each_key():
    examples = [
        {"image": np.full((3, 2, 2), i, np.float32), "t": np.array([i, 1.0])} for i in (0, 1)
    ]
    batch = collate(examples)
    assert batch["image"].shape == (2, 3, 2, 2) and batch["t"].shape == (2, 2)
    assert batch["image"][1].eq(1).all() and batch["t"][:, 0].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="no examples"):
        collate([])


def test_shuffled_batches_order_sizes_and_shared_rng():
    samples = [10 * i for i in range(7)]

    def make_example(sample, rng):
        return {"value": np.array(sample), "draw": np.array(rng.random())}

    batches = list(shuffled_batches(samples, make_example, 3, np.random.default_rng(5)))
    assert [len(b["value"]) for b in batches] == [3, 3, 1]
    # The order comes first from the generator, then each example's draws in that order.
    rng = np.random.default_rng(5)
    order = rng.permutation(7)
    assert torch.cat([b["value"] for b in batches]).tolist() == [samples[i] for i in order]
    assert torch.cat([b["draw"] for b in batches]).tolist() == rng.random(7).tolist()


class _Regression(nn.Module):
    """A linear model whose weights stand for a backbone and whose bias for the new layers."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(2, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x) + self.bias


def _train_regression(seed: int, on_epoch_end=None, seen: list | None = None) -> nn.Module:
    """y = 2 x0 - x1 + 0.5 from 10 samples, each drawn with noise by the epoch's generator."""
    samples = [(i, np.array([np.cos(i), np.sin(2 * i)], np.float32)) for i in range(10)]

    def make_example(sample, rng):
        index, x = sample
        if seen is not None:
            seen.append(index)
        x = x + rng.normal(0, 0.01, 2).astype(np.float32)
        return {"x": x, "y": np.array([2 * x[0] - x[1] + 0.5], np.float32)}

    torch.manual_seed(0)
    params = OptimParams(epochs=20, batch_size=4, lr=0.1, head_lr_mult=1, weight_decay=0)
    return train_in_process(
        _Regression(),
        samples,
        make_example,
        _mse_step_loss,
        params,
        seed,
        "cpu",
        on_epoch_end,
    )


def test_train_in_process_learns_with_epochs_seeded_by_seed_and_epoch():
    history, seen = [], []
    model = _train_regression(3, lambda epoch, metrics: history.append(metrics), seen)
    assert not model.training
    assert [m["epoch"] for m in history] == list(range(20))
    assert all(m["steps"] == 3 and m["samples"] == 10 for m in history)  # ceil(10 / 4) batches
    assert history[-1]["loss"] < 0.01 * history[0]["loss"]
    torch.testing.assert_close(
        model.backbone.weight.detach(), torch.tensor([[2.0, -1.0]]), atol=0.05, rtol=0
    )
    # Epoch e visits the samples in the order drawn from default_rng([seed, e]).
    for epoch in (0, 7):
        order = np.random.default_rng([3, epoch]).permutation(10)
        assert seen[10 * epoch : 10 * (epoch + 1)] == order.tolist()
    same = _train_regression(3)
    other = _train_regression(4)
    torch.testing.assert_close(same.backbone.weight, model.backbone.weight, atol=0, rtol=0)
    assert not torch.equal(other.backbone.weight, model.backbone.weight)


def test_params_bounds():
    with pytest.raises(ValidationError, match="momentum"):
        OptimParams(momentum=1.0)
    with pytest.raises(ValidationError, match="epochs"):
        OptimParams(epochs=0)
    defaults = OptimParams()
    assert (defaults.lr, defaults.head_lr_mult, defaults.weight_decay) == (0.1, 10.0, 1e-4)


# --- augmentation (wsss.transforms), the input side of every training loop ---


def _two_region_sample(height: int = 40, width: int = 60):
    """Left part class 1 painted red, right part class 2 painted blue, one ignore pixel."""
    mask = np.ones((height, width), np.uint8)
    mask[:, width // 3 :] = 2
    mask[0, 0] = 255
    image = np.zeros((height, width, 3), np.uint8)
    image[mask == 1] = (255, 0, 0)
    image[mask == 2] = (0, 0, 255)
    return image, mask


def _denormalize(image: np.ndarray) -> np.ndarray:
    return (image.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255


def test_normalize_values_and_layout():
    image = np.zeros((2, 3, 3), np.uint8)
    image[1, 2] = (255, 128, 0)
    out = normalize(image)
    assert out.dtype == np.float32 and out.shape == (3, 2, 3)
    np.testing.assert_allclose(
        out[:, 1, 2], ((1.0, 128 / 255, 0.0) - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-6
    )
    np.testing.assert_allclose(out[:, 0, 0], -IMAGENET_MEAN / IMAGENET_STD)
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        normalize(image.astype(np.float32))


def test_augment_moves_image_and_mask_together():
    image, mask = _two_region_sample()
    params = AugmentParams(resize_long=(40, 90), crop_size=48)
    flipped = set()
    for seed in range(12):
        out, (out_mask,) = augment(image, np.random.default_rng(seed), params, masks=(mask,))
        assert out.shape == (3, 48, 48) and out.dtype == np.float32
        assert out_mask.shape == (48, 48) and out_mask.dtype == np.uint8
        assert set(np.unique(out_mask)) <= {1, 2, 255}
        rgb = _denormalize(out)
        red, blue = rgb[..., 0] > 128, rgb[..., 2] > 128
        # Nearest (mask) and bilinear (image) resizing differ only along the class edge.
        assert (red == (out_mask == 1)).mean() > 0.95
        assert (blue == (out_mask == 2)).mean() > 0.95
        cols = np.flatnonzero((out_mask == 1).any(0))
        if cols.size and (out_mask == 2).any():
            flipped.add(bool(cols.mean() > np.flatnonzero((out_mask == 2).any(0)).mean()))
    assert flipped == {False, True}  # both orientations occur


def test_augment_pads_small_images_and_crops_large_ones():
    image, mask = _two_region_sample(40, 60)
    mask[0, 0] = 1  # no ignore pixel of its own: every 255 is padding
    small = AugmentParams(resize_long=(30, 30), crop_size=48, flip=False)
    out, (out_mask,) = augment(image, np.random.default_rng(0), small, masks=(mask,))
    inside = out_mask != 255
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    assert (rows.size, cols.size) == (20, 30) and inside.sum() == 20 * 30  # resized to 20 x 30
    assert (out[:, ~inside] == 0).all() and (out[:, inside] != 0).any(0).all()
    block = out_mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    assert (block[:, 0] == 1).all() and (block[:, -1] == 2).all()  # flip=False: never mirrored

    large = AugmentParams(resize_long=(120, 120), crop_size=32)
    for seed in range(5):
        out, (out_mask,) = augment(image, np.random.default_rng(seed), large, masks=(mask,))
        assert (out_mask != 255).mean() > 0.99  # no padding, at most the ignore pixel
        assert np.abs(out).sum(0).min() > 0  # every pixel comes from the image


def test_augment_is_reproducible_and_checks_masks():
    image, mask = _two_region_sample()
    params = AugmentParams(resize_long=(30, 90), crop_size=40)
    a = augment(image, np.random.default_rng(5), params, masks=(mask,))
    b = augment(image, np.random.default_rng(5), params, masks=(mask,))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1][0], b[1][0])
    with pytest.raises(ValueError, match=r"masks\[1\] must be a uint8 array of shape \(40, 60\)"):
        augment(image, np.random.default_rng(0), params, masks=(mask, mask[:10]))
    with pytest.raises(ValidationError, match="resize_long"):
        AugmentParams(resize_long=(300, 200))
