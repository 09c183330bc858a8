"""GPU tests (marked cuda): kernels vs the float64 reference, vs torchvision,
half types, gradcheck, poisoned outputs, streams, layouts, CuPy array API."""
import threading

import numpy as np
import pytest
import torch

import cupy_roi
from cupy_roi import _kernels, array_api

from . import cases

pytestmark = pytest.mark.cuda
DEV = "cuda"


rng = cases.rng


def ref_call(name, x, r, ph, pw, scale, sr=2, aligned=True):
    """The reference path run on the CPU in float64."""
    return cases.call(name, torch.tensor(x), torch.tensor(r), ph, pw, scale, sr, aligned)


CONFIGS = [  # (ph, pw, scale, sampling_ratio, aligned)
    (3, 2, 0.5, 2, True), (2, 3, 1.0, -1, True), (4, 4, 0.25, 0, False), (1, 5, 0.125, 3, False), (7, 7, 0.5, 2, True)]


@pytest.mark.parametrize("name", sorted(cases.OPS))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_reference_float64(name, cfg):
    ph, pw, scale, sr, aligned = cfg
    g = rng()
    for _ in range(3):
        x, r = cases.make(g, n=4, c_out=3, h=int(g.integers(5, 20)), w=int(g.integers(5, 20)), ph=ph, pw=pw,
                          scale=scale, ps=cases.OPS[name][1], k=25)
        got = cases.call(name, torch.tensor(x, device=DEV), torch.tensor(r, device=DEV), ph, pw, scale, sr, aligned)
        want = ref_call(name, x, r, ph, pw, scale, sr, aligned)
        assert torch.allclose(got.cpu(), want, rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("name", sorted(cases.OPS))
@pytest.mark.parametrize("layout", ["channels_last", "strided_view"])
def test_layouts_match_contiguous(name, layout):
    g = rng()
    ps = cases.OPS[name][1]
    x, r = cases.make(g, n=3, c_out=8, h=12, w=14, ph=2, pw=2, ps=ps, k=20)
    xt = torch.tensor(x, device=DEV)
    if layout == "channels_last":
        xv = xt.to(memory_format=torch.channels_last)
    else:  # a non-contiguous view: every other column of a wider map
        wide = torch.zeros(3, x.shape[1], 12, 28, dtype=torch.float64, device=DEV)
        wide[..., ::2] = xt
        xv = wide[..., ::2]
    xv.requires_grad_(True)
    xt.requires_grad_(True)
    rt = torch.tensor(r, device=DEV)
    a, b = cases.call(name, xt, rt, 2, 2, 0.5), cases.call(name, xv, rt, 2, 2, 0.5)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(a)
    a.backward(go)
    b.backward(go)
    assert torch.allclose(xt.grad, xv.grad, rtol=1e-10, atol=1e-12)
    if layout == "channels_last":
        assert b.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------ vs torchvision

def _tv(name, x, r, ph, pw, scale, sr, aligned):
    import torchvision.ops as tv
    if name == "roi_align":
        return tv.roi_align(x, r, (ph, pw), scale, sr, aligned)
    if name == "ps_roi_align":
        return tv.ps_roi_align(x, r, (ph, pw), scale, sr)
    if name == "roi_pool":
        return tv.roi_pool(x, r, (ph, pw), scale)
    return tv.ps_roi_pool(x, r, (ph, pw), scale)


@pytest.mark.parametrize("name", ["roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_matches_torchvision(name, cfg):
    pytest.importorskip("torchvision")
    ph, pw, scale, sr, aligned = cfg
    if name == "ps_roi_align":
        aligned = True  # what torchvision computes
    g = rng()
    kinds = ("inside", "partial", "outside", "huge")
    if name == "ps_roi_pool":  # torchvision's backward disagrees with its forward at the last row/column
        kinds = ("inside",)
    for _ in range(3):
        h, w = int(g.integers(8, 24)), int(g.integers(8, 24))
        x, r = cases.make(g, n=3, c_out=4, h=h, w=w, ph=ph, pw=pw, scale=scale, ps=name.startswith("ps"),
                          k=30, kinds=kinds)
        if name == "ps_roi_pool":
            r[:, 1:] = np.clip(r[:, 1:], 0, (min(h, w) - 3) / scale)
        if name == "roi_pool":  # distinct values: ties would make the argmax arbitrary
            x = g.permutation(x.size).reshape(x.shape).astype(np.float64)
        xa = torch.tensor(x, device=DEV, requires_grad=True)
        xb = torch.tensor(x, device=DEV, requires_grad=True)
        rt = torch.tensor(r, device=DEV)
        a = cases.call(name, xa, rt, ph, pw, scale, sr, aligned)
        b = _tv(name, xb, rt, ph, pw, scale, sr, aligned)
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)
        go = torch.randn_like(a)
        a.backward(go)
        b.backward(go)
        assert torch.allclose(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------ half types

@pytest.mark.parametrize("name", sorted(cases.OPS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_low_precision(name, dtype, tol):
    g = rng()
    x, r = cases.make(g, n=2, c_out=16, h=20, w=24, ph=3, pw=3, ps=cases.OPS[name][1], k=30,
                      kinds=("inside", "partial", "huge"))
    xq = torch.tensor(x).to(dtype)  # compare on the rounded input
    want = ref_call(name, xq.double().numpy(), r, 3, 3, 0.5)
    xg = xq.to(DEV).requires_grad_(True)
    got = cases.call(name, xg, torch.tensor(r, device=DEV, dtype=torch.float32), 3, 3, 0.5)
    assert got.dtype == dtype
    assert cases.rel_err(got, want) < tol
    go = torch.randn(got.shape, dtype=torch.float64)
    got.backward(go.to(DEV, dtype))
    xr = xq.double().requires_grad_(True)
    ref_call_t = cases.call(name, xr, torch.tensor(r), 3, 3, 0.5)
    ref_call_t.backward(go.to(dtype).double())
    assert xg.grad.dtype == dtype and cases.rel_err(xg.grad, xr.grad) < tol


# ------------------------------------------------------------ gradients

@pytest.mark.parametrize("name", sorted(cases.OPS))
def test_gradcheck_features(name):
    g = rng()
    x, r = cases.make(g, n=2, c_out=2, h=6, w=7, ph=2, pw=2, k=5, ps=cases.OPS[name][1])
    if name == "roi_pool":
        x = g.permutation(x.size).reshape(x.shape) / x.size
    x = torch.tensor(x, device=DEV, requires_grad=True)
    rt = torch.tensor(r, device=DEV)
    assert torch.autograd.gradcheck(lambda t: cases.call(name, t, rt, 2, 2, 0.5), (x,))


@pytest.mark.parametrize("ps", [False, True])
def test_gradcheck_prroi_coordinates(ps):
    g = rng()
    x, _ = cases.make(g, n=2, c_out=2, h=6, w=7, ph=2, pw=2, ps=ps)
    r = np.array([[1, -1.3, 2.6, 9.7, 11.4], [0, 3.2, 1.7, 7.9, 6.1], [1, 10.3, 8.6, 15.2, 13.7],
                  [0, 4.1, 4.6, 5.4, 5.3]])
    x = torch.tensor(x, device=DEV, requires_grad=True)
    batch = torch.tensor(r[:, :1], device=DEV)
    coords = torch.tensor(r[:, 1:], device=DEV, requires_grad=True)
    fn = cupy_roi.ps_prroi_pool if ps else (lambda a, b, s, sc: cupy_roi.prroi_pool2d(a, b, 2, 2, sc))
    assert torch.autograd.gradcheck(lambda a, b: fn(a, torch.cat([batch, b], 1), (2, 2), 0.5), (x, coords))


@pytest.mark.parametrize("ps", [False, True])
def test_prroi_coordinate_gradient_matches_reference(ps):
    g = rng()
    x, r = cases.make(g, n=3, c_out=5, h=15, w=17, ph=3, pw=3, ps=ps, k=40)
    go = g.standard_normal((40, 5, 3, 3))
    grads = []
    for dev in ("cpu", DEV):
        xt = torch.tensor(x, device=dev, requires_grad=True)
        rt = torch.tensor(r, device=dev, requires_grad=True)
        fn = cupy_roi.ps_prroi_pool if ps else (lambda a, b, s, sc: cupy_roi.prroi_pool2d(a, b, 3, 3, sc))
        fn(xt, rt, (3, 3), 0.5).backward(torch.tensor(go, device=dev))
        grads.append((xt.grad.cpu(), rt.grad.cpu()))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-10)
    assert torch.all(grads[1][1][:, 0] == 0)


def test_golden_prroi_pool_data_on_gpu():
    d = cases.testdata()
    f = torch.tensor(np.load(d / "features.npy"), device=DEV, requires_grad=True)
    r = torch.tensor(np.load(d / "rois.npy"), device=DEV, requires_grad=True)
    out = cupy_roi.PrRoIPool2D(2, 2, 0.5)(f, r)
    out.sum().backward()
    assert np.allclose(out.detach().cpu().numpy(), np.load(d / "real_outputs.npy"), rtol=1e-5, atol=1e-6)
    assert np.allclose(f.grad.cpu().numpy(), np.load(d / "gradients0.npy"), rtol=1e-5, atol=1e-6)
    assert np.allclose(r.grad.cpu().numpy(), np.load(d / "gradients1.npy"), rtol=1e-5, atol=1e-6)


def test_prroi_degenerate_boxes_on_gpu():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    r = torch.tensor([[0, 1, 1, 1, 3.], [0, 2, 2, 4, 2], [0, 40, 40, 50, 50], [0, 3, 3, 1, 1]],
                     dtype=torch.float64, device=DEV, requires_grad=True)
    out = cupy_roi.prroi_pool2d(x, r, 2, 2, 1.0)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(r.grad, torch.zeros_like(r.grad)) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("size", [(7, 7), (40, 33), (3, 65), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_prroi_large_maps_boxes_and_bin_counts(size):
    """Bins spanning many column chunks and rows, and many bins per RoI, on
    NCHW and channels_last maps (which the kernel reads with and without the
    unit-column-stride path)."""
    g = rng()
    ph, pw = size
    x, r = cases.make(g, n=2, c_out=3, h=int(g.integers(60, 90)), w=int(g.integers(60, 90)), ph=ph, pw=pw,
                      scale=0.5, k=30)
    xt, rt = torch.tensor(x, device=DEV), torch.tensor(r, device=DEV)
    got = cupy_roi.prroi_pool2d(xt, rt, ph, pw, 0.5)
    want = cupy_roi.prroi_pool2d(torch.tensor(x), torch.tensor(r), ph, pw, 0.5)
    assert torch.allclose(got.cpu(), want, rtol=1e-10, atol=1e-12)
    x32, r32 = xt.float(), rt.float()
    nchw = cupy_roi.prroi_pool2d(x32, r32, ph, pw, 0.5)
    nhwc = cupy_roi.prroi_pool2d(x32.to(memory_format=torch.channels_last), r32, ph, pw, 0.5)
    assert torch.allclose(nchw, nhwc, rtol=1e-6, atol=1e-6)
    # against float64 on the same rounded inputs, bins down to a thousandth of a pixel
    want32 = cupy_roi.prroi_pool2d(x32.double().cpu(), r32.double().cpu(), ph, pw, 0.5)
    assert cases.rel_err(nchw, want32) < PRROI_FLOAT32_BOUND


PRROI_FLOAT32_BOUND = 1e-5  # relative error of float32 kernels against float64 (issue 9)


@pytest.mark.parametrize("bin_px", [1e-3, 1e-2, 1e-1, 1.0, 7.5, "map"], ids=str)
@pytest.mark.parametrize("ps", [False, True])
def test_prroi_float32_precision(bin_px, ps):
    """Forward, feature gradient and box gradient of the float32 kernels within
    PRROI_FLOAT32_BOUND of float64 on the same float32-rounded inputs, for bins
    from a thousandth of a pixel to the whole map."""
    g = rng()
    n, c_out, h, w, ph, pw, scale = 2, 4, int(g.integers(40, 70)), int(g.integers(40, 70)), 3, 3, 0.5
    c = c_out * ph * pw if ps else c_out
    x32 = torch.tensor(g.standard_normal((n, c, h, w)), dtype=torch.float32)
    r32 = torch.tensor(cases.thin_bin_rois(g, 40, n, h, w, ph, pw, scale, bin_px), dtype=torch.float32)
    go = torch.tensor(g.standard_normal((40, c_out, ph, pw)), dtype=torch.float32)
    fn = cupy_roi.ps_prroi_pool if ps else (lambda a, b, size, sc: cupy_roi.prroi_pool2d(a, b, *size, sc))
    results = []
    for x, r, dev in ((x32, r32, DEV), (x32.double(), r32.double(), "cpu")):
        xt = x.to(dev).requires_grad_(True)
        rt = r.to(dev).requires_grad_(True)
        out = fn(xt, rt, (ph, pw), scale)
        out.backward(go.to(dev, out.dtype))
        results.append((out.detach().cpu(), xt.grad.cpu(), rt.grad.cpu()[:, 1:]))
    (out, gx, gr), (want, want_gx, want_gr) = results
    assert out.dtype == torch.float32
    assert cases.rel_err(out, want) < PRROI_FLOAT32_BOUND
    assert cases.rel_err(gx, want_gx) < PRROI_FLOAT32_BOUND
    assert cases.rel_err(gr, want_gr) < PRROI_FLOAT32_BOUND


# ------------------------------------------------------------ plumbing

@pytest.mark.parametrize("name", sorted(cases.OPS))
def test_poisoned_outputs_are_fully_written(name):
    import cupy
    g = rng()
    family, ps = cases.OPS[name]
    x, r = cases.make(g, n=2, c_out=4, h=9, w=10, ph=2, pw=3, ps=ps, k=15)
    xc, rc = cupy.asarray(x), cupy.asarray(r)
    for layout in ("nchw", "nhwc"):
        shape = (15, 4, 2, 3)
        out = cupy.full(shape, cupy.nan) if layout == "nchw" else \
            cupy.full((15, 2, 3, 4), cupy.nan).transpose(0, 3, 1, 2)
        if family == "roi_align":
            array_api.roi_align_forward(xc, rc, (2, 3), 0.5, 2, True, ps, out=out)
        elif family == "roi_pool":
            argmax = cupy.full(shape, -7, dtype=cupy.int32)
            array_api.roi_pool_forward(xc, rc, (2, 3), 0.5, ps, out=out, argmax=None if ps else argmax)
            if not ps:
                assert not bool((argmax == -7).any())
        else:
            array_api.prroi_pool_forward(xc, rc, (2, 3), 0.5, ps, out=out)
        assert not bool(cupy.isnan(out).any())
        want = ref_call(name, x, r, 2, 3, 0.5)
        assert np.allclose(cupy.asnumpy(out), want.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(cases.OPS))
def test_non_default_stream(name):
    g = rng()
    x, r = cases.make(g, n=4, c_out=6, h=30, w=40, ph=3, pw=3, ps=cases.OPS[name][1], k=200)
    want = ref_call(name, x, r, 3, 3, 0.5)
    s = torch.cuda.Stream()
    xt = torch.tensor(x, device=DEV, requires_grad=True)
    rt = torch.tensor(r, device=DEV)
    with torch.cuda.stream(s):
        torch.cuda._sleep(20_000_000)  # keep the stream busy: a wrong stream would read too early
        out = cases.call(name, xt, rt, 3, 3, 0.5)
        out.sum().backward()
    s.synchronize()
    assert torch.allclose(out.cpu(), want, rtol=1e-10, atol=1e-12)
    assert xt.grad is not None and torch.isfinite(xt.grad).all()


def test_multibatch_shuffled_order_matches_per_image():
    g = rng()
    x, r = cases.make(g, n=6, c_out=10, h=30, w=40, ph=7, pw=7, scale=1 / 16, ps=True, k=60)
    xt, rt = torch.tensor(x, device=DEV), torch.tensor(r, device=DEV)
    out = cupy_roi.ps_roi_align(xt, rt, 7, 1 / 16, 2)
    for n in range(6):
        sel = rt[:, 0] == n
        single = rt[sel].clone()
        single[:, 0] = 0
        assert torch.allclose(out[sel], cupy_roi.ps_roi_align(xt[n:n + 1], single, 7, 1 / 16, 2), atol=1e-12)


@pytest.mark.parametrize("name", sorted(cases.OPS))
def test_zero_rois_on_gpu(name):
    x = torch.randn(2, 12, 5, 5, device=DEV, requires_grad=True)
    out = cases.call(name, x, torch.zeros(0, 5, device=DEV), 2, 2, 1.0)
    assert out.shape[0] == 0
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


@pytest.mark.parametrize("name", sorted(cases.OPS))
def test_bad_rois_on_gpu(name):
    x = torch.randn(2, 8, 5, 5, device=DEV, requires_grad=True)
    before = x.detach().clone()
    bad = torch.tensor([[2, 0, 0, 3, 3.], [0, 1, 1, 2, 2], [0.5, 1, 1, 4, 4], [1, float("nan"), 0, 2, 2],
                        [-1, 0, 0, 1, 1]], device=DEV)
    with pytest.raises(ValueError, match="device"):
        cases.call(name, x, bad.cpu(), 2, 2, 1.0)
    with cupy_roi.roi_checks(True), pytest.raises(ValueError, match="rois: 4 of 5 rows are invalid"):
        cases.call(name, x, bad, 2, 2, 1.0)
    # by default nothing synchronizes: the bad rows read nothing, give NaN and no gradient
    out = cases.call(name, x, bad, 2, 2, 1.0)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    valid = torch.tensor([False, True, False, False, False])
    assert torch.isnan(out[~valid]).all() and torch.isfinite(out[valid]).all()
    assert torch.isfinite(x.grad).all()
    want = torch.zeros_like(x)
    xr = x.detach().clone().requires_grad_(True)
    cases.call(name, xr, bad[valid], 2, 2, 1.0).sum().backward()
    assert torch.allclose(x.grad, xr.grad)  # only the valid row contributes
    assert torch.equal(x.detach(), before) and not torch.equal(x.grad, want)


def test_roi_check_environment_variable():
    import subprocess
    import sys

    code = ("import torch, cupy_roi\n"
            "x = torch.randn(1, 4, 5, 5, device='cuda')\n"
            "r = torch.tensor([[3, 0, 0, 2, 2.]], device='cuda')\n"
            "try:\n    cupy_roi.roi_align(x, r, 2)\nexcept ValueError as e:\n    print('raised', e)\n"
            "else:\n    print('no check')\n")
    for value, expected in (("1", "raised rois: 1 of 1 rows are invalid"), ("", "no check")):
        env = dict(__import__("os").environ, CUPY_ROI_CHECK_ROIS=value)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert expected in res.stdout, res.stdout + res.stderr


def test_default_calls_do_not_synchronize():
    """With a long sleep queued on the current stream, forward and backward of
    every operator return to the host while the GPU is still asleep: nothing
    waited for the device."""
    g = rng()
    calls = []
    for name in sorted(cases.OPS):
        x, r = cases.make(g, n=2, c_out=4, h=12, w=14, ph=2, pw=2, ps=cases.OPS[name][1], k=9)
        xt = torch.tensor(x, device=DEV, dtype=torch.float32, requires_grad=True)
        rt = torch.tensor(r, device=DEV, dtype=torch.float32, requires_grad=name.endswith("prroi_pool"))
        calls.append((name, xt, rt))
    for name, xt, rt in calls:  # compile and load every kernel first: loading may synchronize
        cases.call(name, xt, rt, 2, 2, 0.5).sum().backward()
    torch.cuda.synchronize()
    asleep = torch.cuda.Event()
    torch.cuda._sleep(3_000_000_000)  # about 1.5-2 s of GPU clock
    asleep.record()
    for name, xt, rt in calls:
        out = cases.call(name, xt, rt, 2, 2, 0.5)
        out.backward(torch.ones_like(out))
    still_asleep = not asleep.query()
    torch.cuda.synchronize()
    assert still_asleep, "an operator synchronized with the device"


def test_cuda_graph_capture_and_replay():
    """Forward and backward captured in a CUDA graph, replayed on new data."""
    g = rng()
    x, r = cases.make(g, n=2, c_out=2, h=12, w=14, ph=2, pw=2, ps=True, k=11, kinds=("inside", "partial"))
    xs = torch.tensor(x, device=DEV, requires_grad=True)
    rs = torch.tensor(r, device=DEV, requires_grad=True)

    def step():
        y = cupy_roi.ps_roi_align(xs, rs, 2, 0.5, 2) .sum() + cupy_roi.ps_prroi_pool(xs, rs, 2, 0.5).sum() \
            + cupy_roi.ps_roi_pool(xs, rs, 2, 0.5).sum()
        y.backward()
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            xs.grad = rs.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    xs.grad = rs.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    x2, r2 = cases.make(g, n=2, c_out=2, h=12, w=14, ph=2, pw=2, ps=True, k=11, kinds=("inside", "partial"))
    with torch.no_grad():
        xs.copy_(torch.tensor(x2))
        rs.copy_(torch.tensor(r2))
    graph.replay()
    torch.cuda.synchronize()
    xe = torch.tensor(x2, requires_grad=True)
    re = torch.tensor(r2, requires_grad=True)
    ye = cupy_roi.ps_roi_align(xe, re, 2, 0.5, 2).sum() + cupy_roi.ps_prroi_pool(xe, re, 2, 0.5).sum() \
        + cupy_roi.ps_roi_pool(xe, re, 2, 0.5).sum()
    ye.backward()
    assert torch.allclose(y.cpu(), ye.detach(), rtol=1e-10)
    assert torch.allclose(xs.grad.cpu(), xe.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(rs.grad.cpu(), re.grad, rtol=1e-9, atol=1e-10)


def test_deterministic_mode_uses_reference():
    g = rng()
    x, r = cases.make(g, ph=2, pw=2)
    xt = torch.tensor(x, device=DEV, requires_grad=True)
    rt = torch.tensor(r, device=DEV)
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            xt.grad = None
            cupy_roi.roi_align(xt, rt, 2, 0.5, 2, True).sum().backward()
            grads.append(xt.grad.clone())
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])


def test_first_call_from_many_threads():
    _kernels._functions.clear()
    x = torch.randn(2, 8, 9, 9, device=DEV)
    r = torch.tensor([[0, 1, 1, 7, 7.], [1, 0, 2, 5, 8]], device=DEV)
    want = cupy_roi.prroi_pool2d(x.cpu(), r.cpu(), 2, 2, 1.0)
    _kernels._functions.clear()
    results, errors = [], []

    def work():
        try:
            results.append(cupy_roi.prroi_pool2d(x, r, 2, 2, 1.0).cpu())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    assert all(torch.allclose(res, want, atol=1e-5) for res in results)


def test_cupy_array_api():
    import cupy
    g = rng()
    x, r = cases.make(g, n=3, c_out=5, h=12, w=13, ph=3, pw=3, ps=True, k=20)
    xc, rc = cupy.asarray(x), cupy.asarray(r)
    out = array_api.ps_roi_align_forward(xc, rc, 3, 0.5, 2)
    assert isinstance(out, cupy.ndarray)
    assert np.allclose(cupy.asnumpy(out), ref_call("ps_roi_align", x, r, 3, 3, 0.5).numpy(), atol=1e-12)
    go = g.standard_normal(out.shape)
    gi = array_api.ps_roi_align_backward(cupy.asarray(go), rc, x.shape, 3, 0.5, 2)
    xt = torch.tensor(x, requires_grad=True)
    cupy_roi.ps_roi_align(xt, torch.tensor(r), 3, 0.5, 2).backward(torch.tensor(go))
    assert np.allclose(cupy.asnumpy(gi), xt.grad.numpy(), atol=1e-12)
    gi, gr = array_api.prroi_pool_backward(cupy.asarray(go), xc, rc, 3, 0.5, True)
    xt = torch.tensor(x, requires_grad=True)
    rt = torch.tensor(r, requires_grad=True)
    cupy_roi.ps_prroi_pool(xt, rt, 3, 0.5).backward(torch.tensor(go))
    assert np.allclose(cupy.asnumpy(gi), xt.grad.numpy(), atol=1e-12)
    assert np.allclose(cupy.asnumpy(gr), rt.grad.numpy(), atol=1e-9)
    # list-of-boxes RoIs work on CuPy too
    listed = [rc[rc[:, 0] == i, 1:] for i in range(3)]
    order = np.argsort(r[:, 0], kind="stable")
    assert cupy.allclose(array_api.ps_roi_align_forward(xc, listed, 3, 0.5, 2), out[cupy.asarray(order)])


def test_array_api_takes_dlpack_producers():
    """torch tensors (and JAX arrays where JAX is installed) go in without a
    copy; CuPy results come back to torch without a copy."""
    import cupy
    g = rng()
    x, r = cases.make(g, n=2, c_out=3, h=10, w=12, ph=2, pw=2, k=9)
    want = ref_call("prroi_pool", x, r, 2, 2, 0.5).numpy()
    xt, rt = torch.tensor(x, device=DEV), torch.tensor(r, device=DEV)
    out = array_api.prroi_pool_forward(xt, rt, 2, 0.5)
    assert isinstance(out, cupy.ndarray) and np.allclose(cupy.asnumpy(out), want, atol=1e-12)
    back = torch.from_dlpack(out)
    assert back.data_ptr() == out.data.ptr and back.device == xt.device
    gi, gr = array_api.prroi_pool_backward(back, xt, rt, 2, 0.5)
    assert gi.shape == x.shape and gr.shape == r.shape
    assert np.allclose(cupy.asnumpy(gi), _reference_feature_grad(x, r, cupy.asnumpy(out)), atol=1e-10)
    # CPU tensors take the NumPy (reference) path
    cpu = array_api.prroi_pool_forward(torch.tensor(x), torch.tensor(r), 2, 0.5)
    assert isinstance(cpu, np.ndarray) and np.allclose(cpu, want, atol=1e-12)
    import os
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU's memory to torch
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if gpus:  # JAX holds float32 unless x64 is enabled
        xj = jax.device_put(jnp.asarray(x, dtype=jnp.float32), gpus[0])
        rj = jax.device_put(jnp.asarray(r, dtype=jnp.float32), gpus[0])
        outj = array_api.prroi_pool_forward(xj, rj, 2, 0.5)
        assert isinstance(outj, cupy.ndarray) and cases.rel_err(cupy.asnumpy(outj), want) < 1e-5


def _reference_feature_grad(x, r, grad_output):
    xt = torch.tensor(x, requires_grad=True)
    cupy_roi.prroi_pool2d(xt, torch.tensor(r), 2, 2, 0.5).backward(torch.tensor(grad_output))
    return xt.grad.numpy()


def test_torch_compile_traces_ops():
    x = torch.randn(2, 18, 10, 10, device=DEV, requires_grad=True)
    r = torch.tensor([[0, 1, 1, 7, 7.], [1, 0, 2, 5, 8]], device=DEV, requires_grad=True)

    def f(a, b):
        return cupy_roi.ps_prroi_pool(a, b, 3, 1.0).sum() + cupy_roi.roi_align(a, b, 2, 1.0, 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=False)
    got = compiled(x, r)
    got.backward()
    gx, gr = x.grad.clone(), r.grad.clone()
    x.grad = r.grad = None
    want = f(x, r)
    want.backward()
    assert torch.allclose(got, want) and torch.allclose(gx, x.grad) and torch.allclose(gr, r.grad)


def test_example_runs_on_gpu():
    import runpy
    import pathlib
    runpy.run_path(str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "example.py"),
                   run_name="__main__")
