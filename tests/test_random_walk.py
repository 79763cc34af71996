import json
import subprocess
import sys
import textwrap

import pydantic
import pytest
import torch

from wsss.neighbourhood import offsets, pair_valid
from wsss.random_walk import RandomWalkParams, propagate, transition_matrix, upsample

torch.set_num_threads(1)


def random_affinity(h: int, w: int, radius: int, seed: int = 0) -> torch.Tensor:
    # Affinities in [0.6, 1] so that a**8 keeps pairs from vanishing and the walk mixes.
    generator = torch.Generator().manual_seed(seed)
    return 0.6 + 0.4 * torch.rand(len(offsets(radius)), h, w, generator=generator)


def segment_affinity(segments: torch.Tensor, radius: int) -> torch.Tensor:
    """a(p, q) = 1 inside a segment, 0 across segments (garbage where q is off the grid)."""
    h, w = segments.shape
    out = torch.full((len(offsets(radius)), h, w), float("nan"))
    for k, (dy, dx) in enumerate(offsets(radius)):
        for y in range(h - dy):
            for x in range(max(0, -dx), min(w, w - dx)):
                out[k, y, x] = float(segments[y, x] == segments[y + dy, x + dx])
    return out


def dense_affinity_matrix(affinity: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """The N x N A of PSA, written out pair by pair: a**beta both ways, 1 on the diagonal."""
    _, h, w = affinity.shape
    a = torch.eye(h * w, dtype=torch.float64)
    for k, (dy, dx) in enumerate(offsets(radius)):
        for y in range(h):
            for x in range(w):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w:
                    i, j = y * w + x, yy * w + xx
                    a[i, j] = a[j, i] = float(affinity[k, y, x]) ** beta
    return a


@pytest.mark.parametrize(
    ("h", "w", "radius"),
    [(12, 9, 3), (12, 9, 5), (1, 6, 2), (7, 3, 5)],
)
def test_propagate_equals_dense_reference(h, w, radius):
    params = RandomWalkParams()
    affinity = random_affinity(h, w, radius).double()
    scores = torch.rand(3, h, w, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    a = dense_affinity_matrix(affinity, radius, params.beta)
    t = a / a.sum(dim=1, keepdim=True)
    expected = (torch.linalg.matrix_power(t, params.steps) @ scores.reshape(3, -1).T).T
    torch.testing.assert_close(
        transition_matrix(affinity, radius, params.beta).to_dense(), t, rtol=0, atol=1e-12
    )
    got = propagate(scores, affinity, radius, params)
    assert (got.reshape(3, -1) - expected).abs().max() < 1e-10

    # PSA's form: column-normalised A squared logt times, applied to row vectors.
    psa = a / a.sum(dim=0, keepdim=True)
    for _ in range(params.logt):
        psa = psa @ psa
    assert (scores.reshape(3, -1) @ psa - expected).abs().max() < 1e-10

    # float32 end to end stays within 1e-5 of the float64 reference after 256 steps.
    got32 = propagate(scores.float(), affinity.float(), radius, params)
    assert got32.dtype == torch.float32
    assert (got32.double().reshape(3, -1) - expected).abs().max() < 1e-5


@pytest.mark.parametrize(("h", "w", "radius"), [(12, 9, 5), (30, 20, 5), (6, 2, 4)])
def test_transition_matrix_structure(h, w, radius):
    affinity = random_affinity(h, w, radius, seed=2)
    t = transition_matrix(affinity, radius, beta=8.0)
    n = h * w
    assert t.layout == torch.sparse_csr and t.shape == (n, n)
    # Valid CSR: sorted, distinct columns in every row (re-built with checks on).
    with torch.sparse.check_sparse_tensor_invariants():
        torch.sparse_csr_tensor(t.crow_indices(), t.col_indices(), t.values(), t.shape)
    assert t._nnz() == n + 2 * int(pair_valid(h, w, radius).sum())
    dense = t.to_dense().double()
    torch.testing.assert_close(dense.sum(dim=1), torch.ones(n, dtype=torch.float64))
    # A has a unit diagonal, so D = 1 / diag(T) and A = D T must be symmetric.
    a = dense / dense.diagonal()[:, None]
    torch.testing.assert_close(a, a.T, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.diagonal(), torch.ones(n, dtype=torch.float64))


def test_affinity_off_the_grid_is_ignored():
    affinity = random_affinity(8, 7, 5)
    scores = torch.rand(2, 8, 7)
    garbage = affinity.clone()
    garbage[~pair_valid(8, 7, 5)] = float("nan")
    params = RandomWalkParams(logt=4)
    torch.testing.assert_close(
        propagate(scores, garbage, 5, params), propagate(scores, affinity, 5, params)
    )


def test_walk_spreads_within_a_region_and_stops_at_a_boundary():
    h, w, radius = 16, 20, 5
    segments = torch.zeros(h, w, dtype=torch.long)
    segments[:, 11:] = 1
    affinity = segment_affinity(segments, radius)
    scores = torch.zeros(3, h, w)
    scores[1, 2, 1] = 1.0  # class 1 seeded at one pixel of the left region
    scores[2, 13, 18] = 1.0  # class 2 seeded at one pixel of the right region
    out = propagate(scores, affinity, radius, RandomWalkParams())

    left, right = segments == 0, segments == 1
    assert torch.all(out[1][right] == 0) and torch.all(out[2][left] == 0)
    # After 256 steps the seed has spread over its whole region, nearly evenly.
    for region, channel in ((left, out[1]), (right, out[2])):
        values = channel[region]
        assert values.min() > 0.5 * values.max()
    # The walk conserves the degree-weighted total: d^T T = 1^T A = d^T since A is symmetric.
    degree = dense_affinity_matrix(affinity, radius, 8.0).sum(dim=1).float()
    torch.testing.assert_close(
        out.reshape(3, -1) @ degree, scores.reshape(3, -1) @ degree, rtol=1e-5, atol=0
    )
    assert torch.equal(out[1:].argmax(dim=0)[left], torch.zeros(int(left.sum()), dtype=torch.long))
    assert torch.equal(out[1:].argmax(dim=0)[right], torch.ones(int(right.sum()), dtype=torch.long))


def test_constant_scores_stay_constant():
    affinity = random_affinity(10, 11, 5, seed=3)
    out = propagate(torch.full((2, 10, 11), 0.25), affinity, 5, RandomWalkParams())
    torch.testing.assert_close(out, torch.full((2, 10, 11), 0.25))


LARGE_GRID_SCRIPT = textwrap.dedent(
    """
    import json, resource, time
    import torch
    from wsss.neighbourhood import offsets, pair_valid
    from wsss.random_walk import RandomWalkParams, propagate, transition_matrix

    torch.set_num_threads(1)
    h, w, radius = 500, 375, 5  # a 2000 x 1500 image at stride 4
    affinity = torch.rand(len(offsets(radius)), h, w)
    scores = torch.rand(3, h, w)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    out = propagate(scores, affinity, radius, RandomWalkParams(logt=3))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    nnz = transition_matrix(affinity, radius, 8.0)._nnz()
    print(json.dumps({
        "seconds": seconds, "peak_delta": peak - before, "nnz": nnz,
        "pairs": int(pair_valid(h, w, radius).sum()), "finite": bool(out.isfinite().all()),
        "shape": list(out.shape),
    }))
    """
)


def test_large_grid_stays_sparse():
    done = subprocess.run(
        [sys.executable, "-c", LARGE_GRID_SCRIPT], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    n = 500 * 375
    dense_bytes = n * n * 4  # one N x N float32 matrix: 140 GB
    assert result["shape"] == [3, 500, 375] and result["finite"]
    assert result["nnz"] == n + 2 * result["pairs"] <= n * (2 * len(offsets(5)) + 1)
    # Linear memory: a few hundred bytes per stored entry at most, ~1% of one dense matrix.
    assert result["peak_delta"] < 100 * result["nnz"] < dense_bytes / 100
    assert result["seconds"] < 30


def test_upsample_maps_grid_cells_to_image_pixels():
    height, width, stride = 37, 50, 8
    grid_w = 7  # ceil(50 / 8)
    ramp = torch.arange(grid_w, dtype=torch.float32).expand(2, 5, grid_w)
    out = upsample(ramp, stride, (height, width))
    assert out.shape == (2, height, width)
    # Bilinear with half-pixel centres: pixel x samples grid position (x + 0.5) / s - 0.5.
    x = torch.arange(width, dtype=torch.float32)
    expected = ((x + 0.5) / stride - 0.5).clamp(0, grid_w - 1)
    torch.testing.assert_close(out[0, 17], expected)
    torch.testing.assert_close(out[1, 36], expected)
    torch.testing.assert_close(upsample(ramp, 1, (5, 7)), ramp)


def test_bad_inputs_raise_clear_errors():
    affinity = random_affinity(6, 5, 5)
    scores = torch.rand(2, 6, 5)
    params = RandomWalkParams()
    with pytest.raises(ValueError, match="P = 34 offsets for radius 5"):
        transition_matrix(affinity[:-1], 5, 8.0)
    with pytest.raises(ValueError, match="P = 4 offsets for radius 2"):
        propagate(scores, affinity, 2, params)
    too_big = affinity.clone()
    too_big[3, 2, 0] = 1.5
    with pytest.raises(ValueError, match=r"affinity\[3, 2, 0\] = 1.5 is not in \[0, 1\]"):
        transition_matrix(too_big, 5, 8.0)
    not_a_number = affinity.clone()
    not_a_number[0, 5, 3] = float("nan")
    with pytest.raises(ValueError, match=r"affinity\[0, 5, 3\] = nan"):
        propagate(scores, not_a_number, 5, params)
    with pytest.raises(ValueError, match=r"affinity grid \(6, 4\) does not match scores grid"):
        propagate(scores, affinity[:, :, :4], 5, params)
    with pytest.raises(ValueError, match=r"scores must have shape \(C, h, w\)"):
        propagate(scores[0], affinity, 5, params)
    with pytest.raises(ValueError, match=r"shape \(C, 5, 7\) for image size \(37, 50\)"):
        upsample(torch.zeros(2, 5, 6), 8, (37, 50))
    with pytest.raises(pydantic.ValidationError, match="beta"):
        RandomWalkParams(beta=0)
    with pytest.raises(pydantic.ValidationError, match="logt"):
        RandomWalkParams(logt=-1)
    with pytest.raises(pydantic.ValidationError, match="radius"):
        RandomWalkParams(radius=5)
    assert RandomWalkParams(logt=8).steps == 256


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_propagate_on_cuda_matches_cpu():
    affinity = random_affinity(40, 30, 5)
    scores = torch.rand(3, 40, 30)
    params = RandomWalkParams()
    out = propagate(scores.cuda(), affinity.cuda(), 5, params)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), propagate(scores, affinity, 5, params))
