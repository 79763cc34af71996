import itertools

import pytest
import torch

from wsss.neighbourhood import offsets, pair_indices, pair_valid, shifted


def brute_force_pairs(h, w, radius):
    pairs = set()
    for (y0, x0), (y1, x1) in itertools.permutations(itertools.product(range(h), range(w)), 2):
        if 0 < (y1 - y0) ** 2 + (x1 - x0) ** 2 < radius**2:
            pairs.add(frozenset([y0 * w + x0, y1 * w + x1]))
    return pairs


@pytest.mark.parametrize(
    ("h", "w", "radius"), [(6, 7, 3), (7, 3, 5), (1, 6, 2), (2, 2, 5), (9, 9, 5)]
)
def test_pairs_cover_each_unordered_pair_once(h, w, radius):
    src, dst = pair_indices(h, w, radius)
    found = [frozenset([int(s), int(d)]) for s, d in zip(src, dst, strict=True)]
    assert len(found) == len(set(found))
    assert set(found) == brute_force_pairs(h, w, radius)
    assert int(pair_valid(h, w, radius).sum()) == len(found)


def test_offsets_half_disk():
    assert len(offsets(5)) == 34  # as PSA and IRN use at radius 5
    assert offsets(1) == ()
    with pytest.raises(ValueError):
        offsets(0)


def test_shifted_reads_neighbour_and_fills_outside():
    maps = torch.arange(12.0).reshape(3, 4)
    out = shifted(maps, 1, -1, fill=-1)
    assert out[0, 1] == maps[1, 0]
    assert out[2].eq(-1).all() and out[:, 0].eq(-1).all()
    assert shifted(maps, 0, 4, fill=7).eq(7).all()  # an offset past the grid leaves only fill
