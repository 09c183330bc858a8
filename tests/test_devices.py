"""Every operator, forward and backward, on every visible GPU, while the
current device is another one (where there are two or more GPUs) and on a
non-default stream of the data's device; results against the CPU reference.

These are the failures CuPy-on-PyTorch code classically has under one-process-
per-GPU training: kernels compiled for or launched on the current device rather
than the data's, streams of another device, illegal memory accesses on cuda:1.
"""
import numpy as np
import pytest
import torch

import cupy_roi
from cupy_roi import array_api

from . import cases

pytestmark = pytest.mark.cuda

SIZE = (3, 2)
SCALE = 0.5


def _devices():
    return list(range(torch.cuda.device_count()))


def _other(d):
    """A current device different from ``d`` where there is one."""
    return (d + 1) % torch.cuda.device_count()


def _reference(name, x, r, go):
    """Forward and gradients on the CPU in float64 (RoI gradients for PrRoIPool)."""
    xt = torch.tensor(x, requires_grad=True)
    coords = cases.OPS[name][0] == "prroi_pool"
    rt = torch.tensor(r, requires_grad=coords)
    out = cases.call(name, xt, rt, *SIZE, SCALE)
    out.backward(torch.tensor(go))
    return out.detach(), xt.grad, (rt.grad if coords else None)


def _run_on(name, x, r, go, device, current, stream):
    """The op on ``device`` with ``current`` as the current device and
    ``stream`` (of ``device``) as that device's current stream."""
    coords = cases.OPS[name][0] == "prroi_pool"
    xt = torch.tensor(x, device=device, requires_grad=True)
    rt = torch.tensor(r, device=device, requires_grad=coords)
    got = torch.tensor(go, device=device)
    torch.cuda.synchronize(device)
    # The sleep keeps the stream busy: work queued on the wrong stream would
    # read inputs early or be read back too soon. The current device is
    # switched only after the stream is set, since a stream's context may
    # itself make its device current.
    with torch.cuda.device(device), torch.cuda.stream(stream):
        torch.cuda._sleep(10_000_000)
        with torch.cuda.device(current):
            assert torch.cuda.current_device() == current
            out = cases.call(name, xt, rt, *SIZE, SCALE)
            out.backward(got)
    stream.synchronize()
    assert out.device == xt.device and xt.grad.device == xt.device
    return out.detach().cpu(), xt.grad.cpu(), (rt.grad.cpu() if coords else None)


def _check_every_device(name, current_of):
    g = cases.rng()
    x, r = cases.make(g, n=3, c_out=4, h=14, w=17, ph=SIZE[0], pw=SIZE[1], scale=SCALE,
                      ps=cases.OPS[name][1], k=30)
    shape = (r.shape[0], x.shape[1] // (SIZE[0] * SIZE[1]) if cases.OPS[name][1] else x.shape[1]) + SIZE
    go = g.standard_normal(shape)
    want = _reference(name, x, r, go)
    for d in _devices():
        device = torch.device("cuda", d)
        got = _run_on(name, x, r, go, device, current_of(d), torch.cuda.Stream(device=device))
        for a, b, what in zip(got, want, ("output", "grad input", "grad rois")):
            if b is not None:
                assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), f"{what} on cuda:{d}"


@pytest.mark.parametrize("name", sorted(cases.OPS))
def test_every_op_on_every_device_on_a_side_stream(name):
    _check_every_device(name, lambda d: d)


@pytest.mark.parametrize("name", sorted(cases.OPS))
def test_every_op_on_every_device_with_another_current_device(name):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: with one, the data's device is the current one")
    _check_every_device(name, _other)


def test_cupy_array_api_on_every_device():
    """The array API follows the data's device, not CuPy's current one, and
    takes that device's current stream."""
    import cupy

    g = cases.rng()
    x, r = cases.make(g, n=2, c_out=3, h=10, w=12, ph=2, pw=2, scale=SCALE, k=12)
    xt, rt = torch.tensor(x, requires_grad=True), torch.tensor(r, requires_grad=True)
    out_t = cases.call("prroi_pool", xt, rt, 2, 2, SCALE)
    go = g.standard_normal(tuple(out_t.shape))
    out_t.backward(torch.tensor(go))
    want = out_t.detach().numpy()
    for d in _devices():
        with cupy.cuda.Device(d):
            xc, rc, goc = cupy.asarray(x), cupy.asarray(r), cupy.asarray(go)
            # the copies ran on the legacy default stream, which a non-blocking
            # stream does not wait for: without this the kernels may read the
            # memory pool's previous contents (a NaN-poisoned output of an
            # earlier test gave NaN rows here once)
            cupy.cuda.get_current_stream().synchronize()
            stream = cupy.cuda.Stream(non_blocking=True)
        with cupy.cuda.Device(_other(d)):
            out = array_api.prroi_pool_forward(xc, rc, 2, SCALE, stream=stream)
            gi, gr = array_api.prroi_pool_backward(goc, xc, rc, 2, SCALE, stream=stream)
        stream.synchronize()
        assert out.device.id == d and gi.device.id == d and gr.device.id == d
        assert np.allclose(cupy.asnumpy(out), want, rtol=1e-10, atol=1e-12)
        assert np.allclose(cupy.asnumpy(gi), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
        assert np.allclose(cupy.asnumpy(gr), rt.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_stream_of_another_device_is_refused():
    import cupy

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: a stream of another device")
    with cupy.cuda.Device(1):
        foreign = cupy.cuda.Stream()
    with cupy.cuda.Device(0):
        x = cupy.ones((1, 1, 4, 4))
        r = cupy.asarray([[0, 0, 0, 2, 2.]])
        with pytest.raises(ValueError, match="stream must belong"):
            array_api.prroi_pool_forward(x, r, 2, 1.0, stream=foreign)


def test_module_on_every_device_with_other_current_device():
    """nn.Module use as a detector head: PrRoIPool2D and PSRoIAlign on cuda:d."""
    for d in _devices():
        device = torch.device("cuda", d)
        x = torch.randn(2, 2 * 9, 20, 20, device=device, requires_grad=True)
        r = torch.tensor([[0, 2, 3, 30, 25.], [1, 5, 5, 12, 39]], device=device, requires_grad=True)
        with torch.cuda.device(_other(d)):
            y = cupy_roi.PSRoIAlign(3, 0.5, 2)(x, r).sum() + cupy_roi.PrRoIPool2D(3, 3, 0.5)(x, r).sum()
            y.backward()
        torch.cuda.synchronize(device)
        assert torch.isfinite(x.grad).all() and torch.isfinite(r.grad).all()
        assert float(r.grad[:, 1:].abs().sum()) > 0
