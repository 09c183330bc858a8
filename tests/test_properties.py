"""Property-based tests (hypothesis): random shapes, strides, dtypes, output
sizes, sampling ratios, scales and boxes (degenerate, inverted, tiny, huge,
partly or wholly outside the map, on every image of a batch).

* CPU: the reference path against the slow per-element oracle
  (``slow_reference.py``), forward, and backward through the oracle's
  directional derivatives (every backward is checked as ``<grad, v> =
  d/dt slow(x + t v) . grad_output``, exact for the linear ops);
* GPU (marked cuda): kernels against the reference path, the atomic and the
  deterministic backward against each other and each against itself
  (bitwise), and against torchvision where the semantics match;
* invariants on both: RoI order permutes the output rows (and, with the
  deterministic backward, leaves the input gradient's bits alone); per-image
  calls give the batch call's rows; a box moved by whole feature cells over a
  map moved by as many cells gives the same output.

Profiles (``conftest.py``): ``ci`` (the default, small) and ``gpu`` (larger;
``CUPY_ROI_HYPOTHESIS_PROFILE=gpu``). A failure prints its falsifying
example and a ``@reproduce_failure`` blob that replays it.
"""
import contextlib
import math

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, strategies as st  # noqa: E402

import cupy_roi  # noqa: E402

from . import cases, slow_reference  # noqa: E402

ALIGNED_OPS = ["roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "prroi_pool", "ps_prroi_pool"]
ALL_OPS = ALIGNED_OPS + ["roi_align_rotated"]
BOX_KINDS = ("inside", "partial", "outside", "degenerate", "inverted", "tiny", "huge")


class Problem:
    """One random call: an operator, its arguments, features drawn from a seed
    and RoI rows in image coordinates."""

    def __init__(self, name, n, c, h, w, ph, pw, scale, sampling_ratio, aligned, clockwise, rows, seed):
        self.name, self.n, self.c, self.h, self.w = name, n, c, h, w
        self.ph, self.pw, self.scale = ph, pw, scale
        self.sampling_ratio, self.aligned, self.clockwise = sampling_ratio, aligned, clockwise
        self.rows, self.seed = rows, seed

    @property
    def ps(self):
        return self.name.startswith("ps_")

    @property
    def k(self):
        return len(self.rows)

    def features(self):
        return np.random.default_rng(self.seed).standard_normal((self.n, self.c, self.h, self.w))

    def grad_output(self, shape):
        return np.random.default_rng(self.seed + 1).standard_normal(shape)

    def __repr__(self):
        return (f"Problem({self.name}, x=({self.n}, {self.c}, {self.h}, {self.w}), out=({self.ph}, {self.pw}), "
                f"scale={self.scale}, sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, "
                f"clockwise={self.clockwise}, seed={self.seed}, rows={self.rows.tolist()})")


def run(p, x, rows, deterministic=False):
    """The cupy_roi operator of ``p`` on torch tensors."""
    if p.name == "roi_align_rotated":
        return cupy_roi.roi_align_rotated(x, rows, (p.ph, p.pw), p.scale, p.sampling_ratio, p.aligned, p.clockwise,
                                          deterministic=deterministic)
    return cases.call(p.name, x, rows, p.ph, p.pw, p.scale, p.sampling_ratio, p.aligned, deterministic)


def slow(p, x, rows):
    """The slow per-element oracle, float64 NumPy."""
    if p.name == "roi_align_rotated":
        return slow_reference.roi_align_rotated(x, rows, p.ph, p.pw, p.scale, p.sampling_ratio, p.aligned,
                                                p.clockwise)
    return cases.slow(p.name, x, rows, p.ph, p.pw, p.scale, p.sampling_ratio, p.aligned)


# ---------------------------------------------------------------- strategies

@st.composite
def axis_box(draw, h, w, kinds):
    """(x1, y1, x2, y2) in feature coordinates, of one of ``kinds``."""
    kind = draw(st.sampled_from(kinds))
    u = [draw(st.floats(0, 1)) for _ in range(4)]
    side = []
    for extent, a, b in ((w, u[0], u[2]), (h, u[1], u[3])):
        if kind == "inside":  # within [1, extent - 2]: no sample or bin reaches the border
            # at least 0.01 wide: a box a few ulps wide is a different box once
            # its coordinates are shifted and rounded again
            lo = 1 + a * max(extent - 3.01, 0)
            side.append((lo, lo + 0.01 + b * max(extent - 2.01 - lo, 0)))
        elif kind == "partial":
            lo = -0.5 * extent + a * 1.5 * extent
            side.append((lo, lo + 0.2 * extent + b * extent))
        elif kind == "outside":
            lo = extent + 1 + a * extent if b < 0.5 else -2 - a * extent - extent
            side.append((lo, lo + 0.1 + b * extent))
        elif kind == "degenerate":
            lo = a * extent
            side.append((lo, lo if b < 0.5 else lo + b))
        elif kind == "inverted":
            lo = a * extent
            side.append((lo, lo - 0.01 - 2 * b))
        elif kind == "tiny":
            lo = -0.5 + a * extent
            side.append((lo, lo + 1e-3 + 0.2 * b))
        else:  # huge
            side.append((-a * 3 * extent - 1, extent + b * 3 * extent + 1))
    return side[0][0], side[1][0], side[0][1], side[1][1]


@st.composite
def rotated_box(draw, h, w, inside):
    """(cx, cy, bw, bh, angle) in feature coordinates."""
    if inside:  # every sample of the box within [1, extent - 2]
        radius = draw(st.floats(0.05, max(0.05, (min(h, w) - 4) / 2 - 0.5)))
        aspect = draw(st.floats(0.2, 1.0))
        bw, bh = 2 * radius * math.sqrt(1 / (1 + aspect ** 2)), 2 * radius * aspect * math.sqrt(1 / (1 + aspect ** 2))
        cx = draw(st.floats(1 + radius + 0.5, max(1 + radius + 0.5, w - 2 - radius - 0.5)))
        cy = draw(st.floats(1 + radius + 0.5, max(1 + radius + 0.5, h - 2 - radius - 0.5)))
    else:
        cx = draw(st.floats(-0.5 * w, 1.5 * w))
        cy = draw(st.floats(-0.5 * h, 1.5 * h))
        bw = draw(st.sampled_from([0.0, 1e-3]) | st.floats(0, 1.5 * w))
        bh = draw(st.sampled_from([0.0, 1e-3]) | st.floats(0, 1.5 * h))
    return cx, cy, bw, bh, draw(st.floats(-3.5, 3.5))


@st.composite
def problems(draw, names=ALL_OPS, inside=False, min_k=0, max_k=6, scales=None):
    """A Problem; ``inside``: every box well inside the map (for the translation invariant)."""
    name = draw(st.sampled_from(names))
    ps = name.startswith("ps_")
    n = draw(st.integers(1, 3))
    ph, pw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    c = draw(st.integers(1, 2)) * ph * pw if ps else draw(st.integers(1, 3))
    low = 7 if inside else 1
    h, w = draw(st.integers(low, 12)), draw(st.integers(low, 12))
    scale = draw(scales if scales is not None else (st.sampled_from([1.0, 0.5, 0.25]) | st.floats(0.1, 2.0)))
    sampling_ratio = draw(st.integers(-1, 3))
    aligned, clockwise = draw(st.booleans()), draw(st.booleans())
    k = draw(st.integers(min_k, max_k))
    rows = []
    for _ in range(k):
        b = draw(st.integers(0, n - 1))
        if name == "roi_align_rotated":
            cx, cy, bw, bh, angle = draw(rotated_box(h, w, inside))
            rows.append([b, cx / scale, cy / scale, bw / scale, bh / scale, angle])
        else:
            box = draw(axis_box(h, w, ("inside",) if inside else BOX_KINDS))
            rows.append([b] + [v / scale for v in box])
    cols = 6 if name == "roi_align_rotated" else 5
    rows = np.array(rows, dtype=np.float64).reshape(k, cols)
    return Problem(name, n, c, h, w, ph, pw, scale, sampling_ratio, aligned, clockwise, rows,
                   draw(st.integers(0, 2 ** 31)))


def _close(got, want, rtol, atol):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    bad = ~np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    assert not bad.any(), f"{bad.sum()} of {bad.size} differ; worst {np.abs(got - want)[bad].max()}"


# ---------------------------------------------------------------- CPU: reference vs the slow oracle

@given(problems())
def test_reference_forward_matches_oracle(p):
    x = p.features()
    got = run(p, torch.tensor(x), torch.tensor(p.rows))
    _close(got.numpy(), slow(p, x, p.rows), 1e-10, 1e-12)


def _directional(p, x, rows, dx=None, drows=None, eps=1e-6):
    """Central difference of the slow oracle along (dx, drows)."""
    def at(t):
        return slow(p, x + t * dx if dx is not None else x, rows + t * drows if drows is not None else rows)
    return (at(eps) - at(-eps)) / (2 * eps)


@given(problems())
def test_reference_backward_matches_oracle(p):
    """<grad_input, v> equals the oracle's derivative along v, against a random
    grad_output (exact for the linear ops; RoIPool's max is linear near x with
    distinct values, which random normal features have)."""
    x = p.features()
    xt = torch.tensor(x, requires_grad=True)
    out = run(p, xt, torch.tensor(p.rows))
    go = p.grad_output(tuple(out.shape))
    out.backward(torch.tensor(go))
    grad = xt.grad.numpy() if xt.grad is not None else np.zeros_like(x)
    v = np.random.default_rng(p.seed + 2).standard_normal(x.shape)
    lhs = float((grad * v).sum())
    rhs = float((_directional(p, x, p.rows, dx=v) * go).sum())
    assert lhs == pytest.approx(rhs, rel=1e-6, abs=1e-7)


@given(problems(names=["prroi_pool", "ps_prroi_pool"], max_k=4))
def test_reference_prroi_coordinate_gradients_match_oracle(p):
    """The box-coordinate gradient of PrRoIPool along a random direction,
    against central differences of the oracle; rows whose bins are under
    1e-3 cells (or inverted: a kink at zero area) are held still."""
    x = p.features()
    rt = torch.tensor(p.rows, requires_grad=True)
    out = run(p, torch.tensor(x), rt)
    go = p.grad_output(tuple(out.shape))
    out.backward(torch.tensor(go))
    grad = rt.grad.numpy() if rt.grad is not None else np.zeros_like(p.rows)
    d = np.random.default_rng(p.seed + 3).standard_normal(p.rows.shape)
    d[:, 0] = 0
    feat = p.rows[:, 1:] * p.scale
    thin = ((feat[:, 2] - feat[:, 0]) / p.pw < 1e-3) | ((feat[:, 3] - feat[:, 1]) / p.ph < 1e-3)
    d[thin] = 0
    lhs = float((grad * d).sum())
    rhs = float((_directional(p, x, p.rows, drows=d, eps=1e-7) * go).sum())
    # central differences err by O(eps / bin size) where a bin edge crosses a
    # kink of the bilinear surface (a grid line): hence the absolute term
    sizes = np.concatenate([(feat[:, 2] - feat[:, 0]) / p.pw, (feat[:, 3] - feat[:, 1]) / p.ph])
    smallest = min(1.0, float(sizes[sizes >= 1e-3].min(initial=1.0)))
    fd_error = 1e-7 * float(np.abs(go).sum()) * float(np.abs(x).max(initial=0)) * float(
        np.abs(d).max(initial=0)) / smallest
    assert abs(lhs - rhs) <= 1e-4 * float(np.abs(grad * d).sum()) + fd_error + 1e-12


# ---------------------------------------------------------------- invariants (any device)

def _invariant_devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _tensor(a, device):
    return torch.tensor(a, device=device)


@pytest.mark.parametrize("device", _invariant_devices())
@given(p=problems(min_k=1), order_seed=st.integers(0, 2 ** 31))
def test_roi_order_permutes_output_rows(device, p, order_seed):
    """Permuted RoIs give permuted rows, bitwise; with the deterministic
    backward the input gradient is bitwise the same (its integer sums do not
    depend on order), and PrRoIPool's box gradients permute with the rows."""
    perm = torch.tensor(np.random.default_rng(order_seed).permutation(p.k), device=device)
    x = p.features()
    outs, grads, box_grads = [], [], []
    go = None
    for order in (None, perm):
        rows = _tensor(p.rows, device)
        rows = rows if order is None else rows[order]
        xt = _tensor(x, device).requires_grad_(True)
        rt = rows.requires_grad_(p.name in ("prroi_pool", "ps_prroi_pool"))
        out = run(p, xt, rt, deterministic=True)
        if go is None:
            go = torch.tensor(p.grad_output(tuple(out.shape)), device=device)
        out.backward(go if order is None else go[order])  # each row keeps its gradient
        outs.append(out.detach())
        grads.append(xt.grad)
        box_grads.append(rt.grad)
    same = torch.equal if device == "cuda" else (lambda a, b: torch.allclose(a, b, rtol=1e-12, atol=1e-12))
    # kernels compute each row alone: bitwise; the CPU reference may vectorize differently
    assert same(outs[0][perm], outs[1])
    assert same(grads[0], grads[1])
    if box_grads[0] is not None:
        assert same(box_grads[0][perm], box_grads[1])


@pytest.mark.parametrize("device", _invariant_devices())
@given(p=problems(min_k=1))
def test_per_image_calls_give_the_batch_rows(device, p):
    x = p.features()
    whole = run(p, _tensor(x, device), _tensor(p.rows, device))
    for b in range(p.n):
        mine = p.rows[:, 0] == b
        if not mine.any():
            continue
        rows = p.rows[mine].copy()
        rows[:, 0] = 0
        alone = run(p, _tensor(x[b:b + 1], device), _tensor(rows, device))
        mine_rows = whole[torch.tensor(np.flatnonzero(mine), device=device)]
        if device == "cuda":  # each output element is computed alone: bitwise
            assert torch.equal(alone, mine_rows)
        else:
            assert torch.allclose(alone, mine_rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", _invariant_devices())
@given(p=problems(inside=True, min_k=1, scales=st.sampled_from([1.0, 0.5, 0.25])),
       shift=st.tuples(st.integers(0, 4), st.integers(0, 4)))
def test_whole_cell_translation(device, p, shift):
    """A map shifted right and down by (dx, dy) cells (zeros in front) and boxes
    shifted by as many cells give the same output. Boxes stay inside the map,
    where no bin or sample reaches a border (PrRoIPool's zero padding would
    allow any box)."""
    dx, dy = shift
    x = p.features()
    moved = np.zeros((p.n, p.c, p.h + dy, p.w + dx))
    moved[:, :, dy:, dx:] = x
    rows = p.rows.copy()
    rows[:, 1] += dx / p.scale
    rows[:, 2] += dy / p.scale
    if p.name != "roi_align_rotated":
        rows[:, 3] += dx / p.scale
        rows[:, 4] += dy / p.scale
    a = run(p, _tensor(x, device), _tensor(p.rows, device))
    b = run(p, _tensor(moved, device), _tensor(rows, device))
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- GPU: kernels vs reference, atomic vs deterministic

LAYOUTS = ("contiguous", "channels_last", "strided")
DTYPES = {"float64": (torch.float64, 1e-10), "float32": (torch.float32, 2e-5), "float16": (torch.float16, 4e-3),
          "bfloat16": (torch.bfloat16, 3e-2)}


def _laid_out(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider map
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@contextlib.contextmanager
def _denormals_flushed(on):
    """CPU float arithmetic with denormals flushed to zero (inputs and
    results), as in the kernels' single-precision arithmetic: CuPy compiles
    them with -ftz=true, and a user's option cannot turn that off."""
    if not (on and torch.set_flush_denormal(True)):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _found(name, x_shape, scale, row):
    """A case the GPU profile once found, kept as an explicit example."""
    n, c, h, w = x_shape
    return Problem(name, n, c, h, w, 1, 1, scale, 0, False, False, np.array([row], dtype=np.float64), 0)


@pytest.mark.cuda
@given(p=problems(), layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from(sorted(DTYPES)))
# corners scaled to -0.49999997 and 0.49999997 in float32: the reference's
# floor(|v| + 0.5) rounded them away from 0, the kernel's round() did not
@example(p=_found("roi_pool", (1, 1, 1, 1), 1.90625,
                  [0.0, -0.26229508196721313, 0.26229508196721313, -0.2617704918032787, 0.26281967213114754]),
         layout="contiguous", dtype="bfloat16")
# a box FLT_MIN high: half of it, the bin height, is a denormal the kernels
# flush to 0, so adaptive sampling takes no samples; the float32 reference
# took one until it flushed denormals too
@example(p=Problem("roi_align_rotated", 1, 1, 1, 1, 2, 1, 1.0, 0, True, False,
                   np.array([[0.0, 0.0, 0.0, 0.001, 1.1754943508222875e-38, 0.0]]), 0),
         layout="contiguous", dtype="bfloat16")
def test_kernels_match_reference(p, layout, dtype):
    """Forward and both backwards of the kernels against the CPU reference on
    the dtype-rounded input and on the boxes as the kernels read them (float32
    rows for every type but float64). The sampling ops' reference runs in the
    kernels' accumulation dtype: their outputs jump where a box side crosses a
    multiple of the bins (adaptive sample counts) or a rounding point, so the
    box must be scaled as the kernel scales it to land on the same side.
    PrRoIPool is continuous in its boxes and its kernels keep thin bins more
    precise than a float32 reference: its reference runs in float64. A float32
    reference flushes denormals, as the kernels' float32 arithmetic does. The
    deterministic backward is bitwise repeatable and agrees with the atomic one."""
    tdtype, tol = DTYPES[dtype]
    rows_dtype = torch.float64 if tdtype == torch.float64 else torch.float32
    acc = torch.float64 if p.name in ("prroi_pool", "ps_prroi_pool") else rows_dtype
    xq = torch.tensor(p.features()).to(tdtype)
    ref_x = xq.to(acc).clone().requires_grad_(True)  # a copy: xq itself when tdtype is float64
    ref_rows = torch.tensor(p.rows).to(rows_dtype).to(acc)
    with _denormals_flushed(acc == torch.float32):
        want = run(p, ref_x, ref_rows)
        go = torch.tensor(p.grad_output(tuple(want.shape))).to(tdtype)
        want.backward(go.to(acc))
    scale = 1.0 + float(want.detach().abs().nan_to_num().max()) if want.numel() else 1.0
    grads = []
    for deterministic in (False, True, True):
        x = _laid_out(xq.cuda(), layout).requires_grad_(True)
        out = run(p, x, torch.tensor(p.rows, device="cuda"), deterministic=deterministic)
        assert out.dtype == tdtype
        _close(out.detach().double().cpu(), want.detach(), tol, tol * scale)
        out.backward(go.cuda())
        assert x.grad.dtype == tdtype and x.grad.shape == x.shape
        grads.append(x.grad.detach().double().cpu())
    gscale = 1.0 + float(ref_x.grad.abs().max()) if ref_x.grad.numel() else 1.0
    for g in grads:
        _close(g, ref_x.grad, tol, tol * gscale)
    assert torch.equal(grads[1], grads[2])


@pytest.mark.cuda
@given(p=problems(names=["roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool"]))
# a float64 corner scaled to -0.49999999999999994: torchvision's ps_roi_pool
# rounds it with roundf (to -1 by way of float -0.5); a double round gives 0
@example(p=_found("ps_roi_pool", (1, 1, 2, 2), 0.9377398260526455,
                  [0.0, -0.5331969338496769, -0.5331969338496769, -0.5321305399819776, -0.5321305399819776]))
def test_kernels_match_torchvision(p):
    """torchvision.ops where the semantics match: ps_roi_align computes
    aligned=True; ps_roi_pool's backward disagrees with its own forward where a
    bin touches the last row or column, so only its forward is compared."""
    tv = pytest.importorskip("torchvision.ops")
    x = p.features()
    if p.name == "roi_pool":  # distinct values: ties make the argmax arbitrary
        x = np.random.default_rng(p.seed).permutation(x.size).reshape(x.shape).astype(np.float64)
    xa = torch.tensor(x, device="cuda", requires_grad=True)
    xb = torch.tensor(x, device="cuda", requires_grad=True)
    rows = torch.tensor(p.rows, device="cuda")
    size = (p.ph, p.pw)
    if p.name == "roi_align":
        b = tv.roi_align(xb, rows, size, p.scale, p.sampling_ratio, p.aligned)
    elif p.name == "ps_roi_align":
        p.aligned = True
        b = tv.ps_roi_align(xb, rows, size, p.scale, p.sampling_ratio)
    elif p.name == "roi_pool":
        b = tv.roi_pool(xb, rows, size, p.scale)
    else:
        b = tv.ps_roi_pool(xb, rows, size, p.scale)
    a = run(p, xa, rows, deterministic=True)
    assert torch.isfinite(a).all()
    # torchvision's ps_roi_align divides by a sample count of 0 for an empty
    # box with adaptive sampling (0/0); ours, like its roi_align, gives 0
    rows_tv = torch.isfinite(b.detach()).flatten(1).all(1)
    assert torch.allclose(a[rows_tv], b[rows_tv], rtol=1e-9, atol=1e-10)
    if not rows_tv.all():
        assert p.name == "ps_roi_align" and (a[~rows_tv] == 0).all()
        return
    if p.name == "ps_roi_pool" or p.k == 0:
        return
    go = torch.tensor(p.grad_output(tuple(a.shape)), device="cuda")
    a.backward(go)
    b.backward(go)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
