"""The pooling family: its members, WILDCAT's top-k pooling, and the configuration's union."""

import pydantic
import pytest
import torch

from wsss.classifier import Classifier, ClassifierParams
from wsss.poolings import POOLINGS
from wsss.poolings.top_k import TopKParams, positions

MAPS = torch.tensor([[[[1.0, -2.0], [3.0, 6.0]], [[0.0, 0.0], [0.0, -1.0]]]])  # (1, 2, 2, 2)


def pool(name: str, **settings) -> torch.Tensor:
    return POOLINGS[name](**settings).build()(MAPS)


def test_global_poolings():
    assert {"gap", "gmp", "top_k"} <= set(POOLINGS)
    torch.testing.assert_close(pool("gap"), torch.tensor([[2.0, -0.25]]))
    torch.testing.assert_close(pool("gmp"), torch.tensor([[6.0, 0.0]]))


def test_top_k_is_wildcats_pooling_between_gmp_and_gap():
    # k+ = 2 highest and k- = 1 lowest, weighted 0.5: class 1 (6 + 3) / 2 + 0.5 * -2.
    torch.testing.assert_close(
        pool("top_k", kmax=2, kmin=1, alpha=0.5), torch.tensor([[3.5, -0.5]])
    )
    # Shares of the 4 positions: 0.5 -> 2 of them.
    torch.testing.assert_close(
        pool("top_k", kmax=0.5, kmin=0.5, alpha=1.0), torch.tensor([[4.5 - 0.5, -0.5]])
    )
    torch.testing.assert_close(pool("top_k", kmax=1, kmin=0), pool("gmp"))
    torch.testing.assert_close(pool("top_k", kmax=100, kmin=0), pool("gap"))
    assert [positions(k, 10) for k in (0, 0.01, 0.25, 1, 3, 50)] == [0, 1, 2, 1, 3, 10]
    with pytest.raises(pydantic.ValidationError, match="kmax"):
        TopKParams(kmax=0)


def test_top_k_trains_through_the_chosen_positions():
    maps = MAPS.clone().requires_grad_()
    TopKParams(kmax=1, kmin=1, alpha=0.5).build()(maps).sum().backward()
    # Class 1: the top position (6) gets 1, the lowest (-2) gets alpha; the others nothing.
    torch.testing.assert_close(maps.grad[0, 0], torch.tensor([[0.0, 0.5], [0.0, 1.0]]))


def test_the_default_pooling_is_gap_written_as_its_bare_name():
    assert ClassifierParams().pooling == POOLINGS["gap"]()
    assert ClassifierParams().model_dump(mode="json")["pooling"] == "gap"  # as before the family


def test_a_classifier_with_top_k_pooling_pools_its_score_maps():
    torch.manual_seed(0)
    params = ClassifierParams(backbone={"name": "resnet18"}, pooling={"name": "top_k", "kmax": 2})
    model = Classifier(3, params).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps, logits = model.score_maps(x), model(x)
    expected = maps.flatten(2).topk(2, -1).values.mean(-1)
    expected += 0.7 * maps.flatten(2).topk(positions(0.2, 16), -1, largest=False).values.mean(-1)
    torch.testing.assert_close(logits, expected)
