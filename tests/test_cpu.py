"""CPU path: reference vs hand-worked cases, vs the independent slow
implementation, gradcheck, RoI formats, bad inputs, array API on NumPy."""
import numpy as np
import pytest
import torch

import cupy_roi
from cupy_roi import array_api

from . import cases



rng = cases.rng


# ---------------------------------------------------------------- hand-worked

def ramp(h, w):
    return torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)


def test_roi_align_hand_worked():
    # F = 4y + x is linear, so each bin's mean of samples is F at the bin centre
    out = cupy_roi.roi_align(ramp(4, 4), torch.tensor([[0, 0, 0, 4, 4.]], dtype=torch.float64), 2, 1.0, 2, True)
    assert torch.equal(out[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]], dtype=torch.float64))


def test_ps_roi_align_hand_worked():
    x = torch.arange(4, dtype=torch.float64).view(1, 4, 1, 1).expand(1, 4, 3, 3).contiguous() + 1
    out = cupy_roi.ps_roi_align(x, torch.tensor([[0, 0, 0, 3, 3.]], dtype=torch.float64), 2, 1.0, 2)
    assert torch.equal(out[0, 0], torch.tensor([[1., 2.], [3., 4.]], dtype=torch.float64))


def test_roi_pool_hand_worked():
    out = cupy_roi.roi_pool(ramp(4, 4), torch.tensor([[0, 0, 0, 3, 3.]], dtype=torch.float64), 2, 1.0)
    assert torch.equal(out[0, 0], torch.tensor([[5., 7.], [13., 15.]], dtype=torch.float64))


def test_ps_roi_pool_hand_worked():
    x = torch.arange(4, dtype=torch.float64).view(1, 4, 1, 1).expand(1, 4, 4, 4).contiguous() + 1
    out = cupy_roi.ps_roi_pool(x, torch.tensor([[0, 0, 0, 4, 4.]], dtype=torch.float64), 2, 1.0)
    assert torch.equal(out[0, 0], torch.tensor([[1., 2.], [3., 4.]], dtype=torch.float64))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype, corner, pool_want, ps_want", [
    (torch.float64, 0.49999999999999994, 0.0, 5.0),
    (torch.float32, 0.4999999701976776, 0.0, 0.0),  # the float just under 0.5
])
def test_pool_corners_a_hair_under_one_half(device, dtype, corner, pool_want, ps_want):
    """A box whose four corners sit just under 0.5 pools cell (0, 0) of a
    ramp if the corner rounds to 0 and cell (1, 1) = 5 if it rounds to 1.
    roi_pool rounds in the input's dtype, half away from zero, as C's round
    and torchvision do (floor(v + 0.5) gives 1: the sum rounds up to 1.0).
    ps_roi_pool rounds in float32 whatever the dtype, as torchvision's roundf
    does, so a float64 0.49999999999999994 becomes 0.5 and then 1."""
    x = ramp(4, 4).to(device=device, dtype=dtype)
    rows = torch.tensor([[0] + [corner] * 4], dtype=dtype, device=device)
    assert cupy_roi.roi_pool(x, rows, 1, 1.0).item() == pool_want
    assert cupy_roi.ps_roi_pool(x, rows, 1, 1.0).item() == ps_want


def test_prroi_pool_hand_worked():
    # one pixel of value 1: f = (1 - y)(1 - x) on [0, 1]^2, whose mean there is 1/4
    one = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    out = cupy_roi.prroi_pool2d(one, torch.tensor([[0, 0, 0, 1, 1.]], dtype=torch.float64), 1, 1, 1.0)
    assert out.item() == pytest.approx(0.25, abs=1e-15)
    # a linear map's mean over a bin is its value at the bin centre
    x = torch.arange(6, dtype=torch.float64).view(1, 1, 1, 6).expand(1, 1, 6, 6).contiguous()
    out = cupy_roi.prroi_pool2d(x, torch.tensor([[0, 1, 1, 3.5, 3]], dtype=torch.float64), 1, 1, 1.0)
    assert out.item() == pytest.approx(2.25, abs=1e-14)


# ------------------------------------------------- against the slow oracle

@pytest.mark.parametrize("name", sorted(cases.OPS))
@pytest.mark.parametrize("sampling_ratio,aligned", [(2, True), (-1, True), (0, False), (3, False)])
def test_reference_matches_slow_implementation(name, sampling_ratio, aligned):
    g = rng()
    for ph, pw, scale in [(3, 2, 0.5), (2, 2, 1.0), (1, 3, 0.25)]:
        x, r = cases.make(g, ph=ph, pw=pw, scale=scale, ps=cases.OPS[name][1], k=12)
        got = cases.call(name, torch.tensor(x), torch.tensor(r), ph, pw, scale, sampling_ratio, aligned)
        want = cases.slow(name, x, r, ph, pw, scale, sampling_ratio, aligned)
        assert np.allclose(got.numpy(), want, rtol=1e-10, atol=1e-12), name


def test_golden_prroi_pool_data():
    d = cases.testdata()
    f = torch.tensor(np.load(d / "features.npy"), dtype=torch.float64, requires_grad=True)
    r = torch.tensor(np.load(d / "rois.npy"), dtype=torch.float64, requires_grad=True)
    out = cupy_roi.prroi_pool2d(f, r, 2, 2, 0.5)
    out.sum().backward()
    assert np.allclose(out.detach().numpy(), np.load(d / "real_outputs.npy"), rtol=1e-5, atol=1e-6)
    assert np.allclose(f.grad.numpy(), np.load(d / "gradients0.npy"), rtol=1e-5, atol=1e-6)
    assert np.allclose(r.grad.numpy(), np.load(d / "gradients1.npy"), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- gradients

@pytest.mark.parametrize("name", sorted(cases.OPS))
def test_gradcheck_features(name):
    g = rng()
    x, r = cases.make(g, n=2, c_out=2, h=6, w=7, ph=2, pw=2, k=5, ps=cases.OPS[name][1])
    if name == "roi_pool":  # distinct values keep the max unique (piecewise-linear op)
        x = g.permutation(x.size).reshape(x.shape) / x.size
    x = torch.tensor(x, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cases.call(name, t, torch.tensor(r), 2, 2, 0.5), (x,))


@pytest.mark.parametrize("ps", [False, True])
def test_gradcheck_prroi_coordinates(ps):
    g = rng()
    x, _ = cases.make(g, n=2, c_out=2, h=6, w=7, ph=2, pw=2, ps=ps)
    # fractional corners on both sides of pixel centres, crossing the border
    r = np.array([[1, -1.3, 2.6, 9.7, 11.4], [0, 3.2, 1.7, 7.9, 6.1], [1, 10.3, 8.6, 15.2, 13.7]])
    x = torch.tensor(x, requires_grad=True)
    batch, coords = torch.tensor(r[:, :1]), torch.tensor(r[:, 1:], requires_grad=True)
    fn = cupy_roi.ps_prroi_pool if ps else (lambda a, b, s, sc: cupy_roi.prroi_pool2d(a, b, 2, 2, sc))
    # the batch-index column stays fixed: gradcheck must not perturb it
    assert torch.autograd.gradcheck(lambda a, b: fn(a, torch.cat([batch, b], 1), (2, 2), 0.5), (x, coords))


def test_prroi_degenerate_boxes():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    r = torch.tensor([[0, 1, 1, 1, 3.], [0, 2, 2, 4, 2], [0, 40, 40, 50, 50], [0, 3, 3, 1, 1]],
                     dtype=torch.float64, requires_grad=True)
    out = cupy_roi.prroi_pool2d(x, r, 2, 2, 1.0)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(r.grad).all() and torch.isfinite(x.grad).all()
    assert torch.equal(r.grad, torch.zeros_like(r.grad))


# ----------------------------------------------------------------- RoI formats

@pytest.mark.parametrize("name", sorted(cases.OPS))
def test_list_and_rows_agree(name):
    g = rng()
    x, r = cases.make(g, n=3, ps=cases.OPS[name][1], k=9)
    x, r = torch.tensor(x), torch.tensor(r)
    order = torch.argsort(r[:, 0], stable=True)
    listed = [r[r[:, 0] == i, 1:] for i in range(3)]
    a = cases.call(name, x, r[order], 3, 2, 0.5)
    b = cases.call(name, x, listed, 3, 2, 0.5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(cases.OPS))
def test_zero_rois(name):
    x = torch.randn(2, 12, 5, 5, dtype=torch.float64, requires_grad=True)
    out = cases.call(name, x, torch.zeros(0, 5, dtype=torch.float64), 2, 2, 1.0)
    c_out = 3 if cases.OPS[name][1] else 12
    assert out.shape == (0, c_out, 2, 2)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


# ----------------------------------------------------------------- bad input

BAD = [
    ("batch index", torch.tensor([[2, 0, 0, 3, 3.]]), ValueError, "rois"),
    ("negative batch", torch.tensor([[-1, 0, 0, 3, 3.]]), ValueError, "rois"),
    ("fractional batch", torch.tensor([[0.5, 0, 0, 3, 3.]]), ValueError, "rois"),
    ("nan", torch.tensor([[0, float("nan"), 0, 3, 3.]]), ValueError, "rois"),
    ("inf", torch.tensor([[0, 0, 0, float("inf"), 3.]]), ValueError, "rois"),
    ("shape", torch.tensor([[0, 0, 3, 3.]]), ValueError, "rois"),
    ("1-d", torch.tensor([0, 0, 0, 3, 3.]), ValueError, "rois"),
    ("int dtype", torch.tensor([[0, 0, 0, 3, 3]]), TypeError, "rois"),
    ("list length", [torch.tensor([[0, 0, 3, 3.]])], ValueError, "rois"),
    ("list shape", [torch.tensor([[0, 0, 3.]]), torch.zeros(0, 4)], ValueError, "rois[0]"),
    ("numpy rois", np.array([[0, 0, 0, 3, 3.]]), TypeError, "rois"),
]


@pytest.mark.parametrize("name", sorted(cases.OPS))
@pytest.mark.parametrize("what,rois,error,word", BAD, ids=[b[0] for b in BAD])
def test_bad_rois(name, what, rois, error, word):
    x = torch.randn(2, 8, 5, 5)
    before = x.clone()
    snapshot = rois.clone() if isinstance(rois, torch.Tensor) else None
    with pytest.raises(error, match=word.replace("[", r"\[").replace("]", r"\]")):
        cases.call(name, x, rois, 2, 2, 1.0)
    assert torch.equal(x, before)
    if snapshot is not None:
        assert torch.equal(rois, snapshot, ) or torch.isnan(snapshot).any()


@pytest.mark.parametrize("name", sorted(cases.OPS))
def test_bad_input(name):
    rois = torch.tensor([[0, 0, 0, 3, 3.]])
    with pytest.raises(ValueError, match="input"):
        cases.call(name, torch.randn(8, 5, 5), rois, 2, 2, 1.0)
    with pytest.raises(TypeError, match="input"):
        cases.call(name, torch.ones(1, 8, 5, 5, dtype=torch.int32), rois, 2, 2, 1.0)
    with pytest.raises(ValueError, match="output_size"):
        cases.call(name, torch.randn(1, 8, 5, 5), rois, 0, 2, 1.0)


@pytest.mark.parametrize("name", ["ps_roi_align", "ps_roi_pool", "ps_prroi_pool"])
def test_position_sensitive_channel_count(name):
    with pytest.raises(ValueError, match="channels"):
        cases.call(name, torch.randn(1, 10, 5, 5), torch.tensor([[0, 0, 0, 3, 3.]]), 2, 2, 1.0)


def test_channel_block_rule():
    """The GPU work order's block of channels (_rules.channel_block): a divisor
    of the channel count whose planes of every image fit in a third of L2;
    all channels (RoI-major order) where the map fits or where one RoI's bins
    of a channel fill under a 32-byte sector. Results never depend on it
    (test_cuda forces every block); this pins the choice."""
    from cupy_roi._rules import _channel_block

    l2 = 50 * 2 ** 20
    mask_rcnn = 16 * 200 * 272 * 4  # one float32 channel of 16 images: 3.5 MB
    assert _channel_block(256, mask_rcnn, l2, 7 * 7 * 4) == 4
    assert _channel_block(256, 2 * 50 * 68 * 4, l2, 7 * 7 * 4) == 256  # the whole map fits
    assert _channel_block(256, mask_rcnn, l2, 2 * 2 * 4) == 256  # 16-byte bins: no blocks
    assert _channel_block(21, 49 * 8 * 38 * 63 * 4, l2, 7 * 7 * 4) == 3  # R-FCN: 49 input planes a channel
    assert _channel_block(7, 10 * mask_rcnn, l2, 7 * 7 * 4) == 1  # not even one channel fits
    for c in range(1, 70):
        for per_channel in (1, 10 ** 5, 10 ** 6, 10 ** 7):
            b = _channel_block(c, per_channel, l2, 64)
            assert 1 <= b <= c and c % b == 0


def test_roialign_forward_work_order_rules(monkeypatch):
    """The RoIAlign forward's two large-map rules, its launches recorded
    instead of run. Channels-last blocks (_rules.channels_last_block): -B, B a
    divisor of the channels and a multiple of 8 whose planes of one image fit
    in a third of L2, where the whole map does not; else 0. Image order
    (_rules.roi_order_bytes): a workspace of int32[k] for plain RoIAlign on a
    map of several images past a third of L2, filled by roi_image_order
    before the forward, whose last argument it is. Results never depend on
    either (test_cuda forces both); this pins the choice."""
    from cupy_roi import _kernels, _rules
    from cupy_roi._rules import _channels_last_block

    l2 = 50 * 2 ** 20
    monkeypatch.setitem(_kernels._properties, (0, "l2CacheSize"), l2)  # an H100's L2; no GPU asked
    plane = 200 * 272 * 4  # one float32 Mask R-CNN plane of one image
    assert _channels_last_block(256, 16 * 256 * plane, plane, l2, 8) == -64
    assert _channels_last_block(256, 16 * 256 * plane // 2, plane // 2, l2, 8) == -128  # half types
    assert _channels_last_block(256, 2 * 256 * 50 * 68 * 4, 50 * 68 * 4, l2, 8) == 0  # the whole map fits
    assert _channels_last_block(12, 16 * 12 * 10 * plane, 10 * plane, l2, 8) == 0  # no multiple of 8 below 12
    for c in range(1, 70):
        for per_channel in (1, 10 ** 5, 10 ** 6, 10 ** 7):
            b = _channels_last_block(c, 10 ** 9, per_channel, l2, 8)
            assert b == 0 or (b < 0 and -b % 8 == 0 and c % b == 0 and -b < c)
    mask_rcnn = (16, 256, 200, 272)
    assert _rules.roi_order_bytes(0, "float32", False, mask_rcnn, 8192) == 4 * 8192
    assert _rules.roi_order_bytes(0, "float32", True, mask_rcnn, 8192) == 0  # position-sensitive
    assert _rules.roi_order_bytes(0, "float32", False, (2, 256, 50, 68), 1024) == 0  # fits L2
    assert _rules.roi_order_bytes(0, "float32", False, (1, 256, 800, 1088), 512) == 0  # one image
    assert _rules.roi_order_bytes(0, "float32", False, mask_rcnn, 1) == 0

    launched = []
    monkeypatch.setattr(_rules, "_run", lambda family, kernel, device, stream, scalar, ps, total, args, **kw:
                        launched.append((kernel, args, kw)))
    n, c, h, w = mask_rcnn
    nhwc = (c * h * w, 1, w * c, c)
    out = (7, (49 * c, 1, 7 * c, c))
    _rules.roi_align_forward(0, 0, "float32", False, (11, nhwc), mask_rcnn, 22, 8192, (7, 7), 0.25, 2, False, out,
                             33)
    (order, order_args, order_kw), (forward, args, kw) = launched
    assert order == "roi_image_order" and order_args == (22, 8192, n, 33, 0)
    assert order_kw == {"blocks": 1, "threads": 1024}
    assert forward == "roi_align_forward" and args[-1] == 33 and args[16] == -64 and kw["cpt"] == 8
    launched.clear()
    _rules.roi_align_forward(0, 0, "float32", False, (11, nhwc), mask_rcnn, 22, 8192, (7, 7), 0.25, 2, False, out)
    assert [name for name, _, _ in launched] == ["roi_align_forward"] and launched[0][1][-1] == 0


def test_roialign_forward_plane_rule(monkeypatch):
    """Where the RoIAlign forward takes its plane mode (_rules.forward_plane:
    a block per image and channel, the plane in shared memory): plain
    RoIAlign on an NCHW-like map past a third of L2 in a float type but
    float64, a fixed sampling grid of 1, 2 or 4 with at most 32 samples an
    axis, a plane and a zero row within the device's shared memory, enough
    samples a map cell; its workspace (order, image starts, geometry table)
    and its three launches, recorded instead of run. test_cuda checks its
    results."""
    from cupy_roi import _kernels, _rules

    monkeypatch.setitem(_kernels._properties, (0, "l2CacheSize"), 50 << 20)  # an H100's; no GPU asked
    monkeypatch.setitem(_kernels._properties, (0, "sharedMemPerBlockOptin"), 227 << 10)
    mask_rcnn, k = (16, 256, 200, 272), 8192
    n, c, h, w = mask_rcnn
    nchw, nhwc = (c * h * w, h * w, w, 1), (c * h * w, 1, w * c, c)

    def plane(scalar="float32", ps=False, strides=nchw, shape=mask_rcnn, size=(7, 7), sr=2, rois=k):
        return _rules.forward_plane(0, scalar, ps, strides, shape, size, sr, rois)

    assert plane() == 201 * 272 * 4 and plane("float16") == plane("bfloat16") == 201 * 272 * 2
    assert plane(size=(14, 14)) and plane(sr=1) and plane(sr=4, size=(8, 8))
    assert plane(strides=(c * h * 300, h * 300, 300, 1)) == 201 * 272 * 4  # a view of wider rows
    assert plane(shape=(16, 256, 200, 270)) == 201 * 272 * 4  # rows padded to 16 bytes
    assert not plane("float64")
    assert not plane(ps=True, size=(7, 7))
    assert not plane(strides=nhwc)  # channels-last: the flat grid's vectors
    assert not plane(strides=(c * h * w * 2, h * w * 2, w * 2, 2))  # columns not adjacent
    assert not plane(sr=0) and not plane(sr=-1) and not plane(sr=3) and not plane(sr=8, size=(2, 2))
    assert not plane(sr=4, size=(9, 9))  # 36 samples an axis
    assert not plane(shape=(2, 256, 50, 68), rois=1024)  # fits L2
    assert not plane(rois=100)  # few samples a cell: the copies would not pay
    # _rules.PLANE_MIN_SAMPLES_PER_CELL, as measured: 512 RoIs an image at 7x7 (1.84 samples a
    # cell) in both float types; 256 in float32 only; 128 at 14x14 (1.84) in float16 only
    assert plane(rois=4096) and not plane("float16", rois=4096)
    assert plane("float16", size=(14, 14), rois=2048) and not plane(size=(14, 14), rois=2048)
    assert not plane(rois=0)
    assert not plane(shape=(2, 256, 300, 272))  # a plane past shared memory
    assert not plane(shape=(5000, 4, 200, 272))  # more images than roi_image_order takes
    # two parts an image in roi_plane_order, 4097 parts at most: 2048 images
    assert plane(shape=(2048, 4, 200, 272), rois=300000) and not plane(shape=(2049, 4, 200, 272), rois=300000)
    table_at = -(-4 * (k + 2 * n + 2) // 16) * 16  # the order, then where each image's two parts begin
    slots_at = table_at + 1040 * k  # the table, then each RoI's bucket and rank
    counts_at = -(-(slots_at + 8 * k) // 16) * 16  # then the RoIs of each bucket (128 a part) and of each part
    assert _rules.roi_align_forward_workspace(0, "float32", False, nchw, mask_rcnn, (7, 7), 2, k) == (
        counts_at + 4 * (2 * n + 1) * 129)
    assert _rules.roi_align_forward_workspace(0, "float32", False, nhwc, mask_rcnn, (7, 7), 2, k) == 4 * k

    launches = []
    monkeypatch.setattr(_kernels, "get_function", lambda family, kernel, *rest: kernel)
    monkeypatch.setattr(_kernels, "launch", lambda fn, blocks, stream, args, **kw:
                        launches.append((fn, blocks, args, kw)))
    out = (7, (49 * c, 49, 7, 1))
    work = 1 << 20
    _rules.roi_align_forward(0, 0, "float32", False, (11, nchw), mask_rcnn, 22, k, (7, 7), 0.25, 2, False, out, work)
    table, slots, counts, split = work + table_at, work + slots_at, work + counts_at, h // 3
    zero, geometry, order, (forward, blocks, args, kw) = launches
    assert zero == ("zero_ints", -(-33 * 129 // 256), (counts, 33 * 129), {})  # counts before the geometry's atomics
    assert geometry == ("roi_align_plane_geometry", 32 * k // 256,  # a warp a RoI
                        (22, k, n, h, w, 272 * 4, 4, 7, 7, 0.25, 2, False, table, 0, 0, split, slots, counts), {})
    assert order == ("roi_plane_order", 32 * k // 256, (slots, k, 2 * n + 1, counts, work), {"threads": 256})
    assert forward == "roi_align_forward_plane" and blocks == n * c
    assert args == (11, n, h, w, *nchw, k, 7, 7, 2, 272, split, work, table, 7, *out[1])
    assert kw == {"threads": 1024, "shared": 201 * 272 * 4}


def test_roialign_backward_work_order_rules(monkeypatch):
    """The RoIAlign backward's modes, launches recorded instead of run. A
    channels-last buffer: 8 channels a thread (cpt) where they divide the
    channels, in channels-last blocks sized for the buffer's element (float
    accumulation: 64 channels of Mask R-CNN's map; int64 fixed point for the
    deterministic backward: 32), the order workspace filled first and passed
    last; float64 (one channel a thread) and channels that 4 but not 8
    divide (4 a thread): no blocks. NCHW: the warp mode, with the order too;
    the torch op's NCHW backward takes a channels-last buffer instead where
    the RoIs go image by image (_rules.backward_channels_last)."""
    from cupy_roi import _kernels, _rules

    monkeypatch.setitem(_kernels._properties, (0, "l2CacheSize"), 50 * 2 ** 20)  # an H100's L2; no GPU asked
    launched = []
    monkeypatch.setattr(_rules, "_run", lambda family, kernel, device, stream, scalar, ps, total, args, **kw:
                        launched.append((kernel, total, args, kw)))
    grad = (11, (49 * 256, 49, 7, 1))

    def backward(scalar, shape, layout, max_grad=0, order=0):
        n, c, h, w = shape
        strides = (c * h * w, 1, w * c, c) if layout == "nhwc" else (c * h * w, h * w, w, 1)
        launched.clear()
        _rules.roi_align_backward(0, 0, scalar, False, grad, shape, 22, 8192, (7, 7), 0.25, 2, False,
                                  (44, strides), max_grad, order)
        *first, (kernel, total, args, kw) = launched
        assert kernel == "roi_align_backward" and args[-1] == order and args[-2] == max_grad
        assert [f[0] for f in first] == (["roi_image_order"] if order else [])
        return args[13], args[14], kw.get("cpt", 1), total  # channel block, channels per warp

    mask_rcnn = (16, 256, 200, 272)
    k = 8192
    assert backward("float32", mask_rcnn, "nhwc") == (-64, 0, 8, k * 256 * 49)
    assert backward("float16", mask_rcnn, "nhwc") == (-64, 0, 8, k * 256 * 49)  # float accumulation
    assert backward("float32", mask_rcnn, "nhwc", max_grad=55, order=33) == (-32, 0, 8, k * 256 * 49)
    assert backward("float64", mask_rcnn, "nhwc") == (0, 0, 1, k * 256 * 49)
    assert backward("float32", (16, 12, 200, 272), "nhwc") == (0, 0, 4, k * 12 * 49)
    assert backward("float32", (2, 256, 50, 68), "nhwc") == (0, 0, 8, k * 256 * 49)  # fits L2
    block, per_warp, cpt, total = backward("float32", mask_rcnn, "nchw", max_grad=55, order=33)
    assert block > 0 and per_warp == 4 and cpt == 1 and total == k * 256 // 4 * 32
    # the multi-level backward: the same modes, by the finest level
    for layout, expect in (("nhwc", (-64, 0, 8)), ("nchw", (4, 4, 1))):
        shapes = [mask_rcnn, (16, 256, 100, 136)]
        views = [(44 + i, (c * h * w, 1, w * c, c) if layout == "nhwc" else (c * h * w, h * w, w, 1))
                 for i, (n, c, h, w) in enumerate(shapes)]
        launched.clear()
        _rules.multi_scale_roi_align_backward(0, 0, "float32", grad, views, shapes, [0.25, 0.125], 22, k, (7, 7),
                                              (1, 224.0, 4, 2, 3), 2, False, 0, 33)
        (order, _, order_args, _), (kernel, total, args, kw) = launched
        assert order == "roi_image_order" and order_args == (22, k, 16, 33, 0)
        assert kernel == "multi_scale_roi_align_backward" and args[-1] == 33
        assert (args[-4], args[-3], kw["cpt"]) == expect  # channel block, channels per warp, per thread
    # the torch op's NCHW backward adds into a channels-last buffer where the RoIs go image by image
    for scalar in ("float32", "float16", "bfloat16"):
        assert _rules.backward_channels_last(0, scalar, False, mask_rcnn, k, False)
    assert not _rules.backward_channels_last(0, "float32", False, mask_rcnn, k, True)  # deterministic
    assert not _rules.backward_channels_last(0, "float64", False, mask_rcnn, k, False)
    assert not _rules.backward_channels_last(0, "float32", True, mask_rcnn, k, False)  # position-sensitive
    assert not _rules.backward_channels_last(0, "float32", False, (16, 12, 200, 272), k, False)
    assert not _rules.backward_channels_last(0, "float32", False, (2, 256, 50, 68), k, False)  # fits L2


def test_roialign_backward_tile_rule(monkeypatch):
    """Where the RoIAlign backward gathers by tiles (_rules.backward_tiles:
    a block sums its 8 x 8 pixels and 256 channels, then writes them): plain
    RoIAlign, float types but float64, not deterministic, a fixed sampling
    grid of at most 32 samples an axis, channels a multiple of 4, maps past
    a third of L2 of at most 32767 pixels a side; a caller's accumulation
    buffer only where it has the gradient's type (float32). Its workspace
    (order, image starts, geometry table in pixel units, and a channels-last
    copy of grad_output unless it is one) and its launches, recorded instead
    of run. test_cuda checks its results."""
    from cupy_roi import _kernels, _rules

    monkeypatch.setitem(_kernels._properties, (0, "l2CacheSize"), 50 << 20)  # an H100's; no GPU asked
    mask_rcnn, k = (16, 256, 200, 272), 8192
    n, c, h, w = mask_rcnn

    def tiles(scalar="float32", ps=False, shape=mask_rcnn, size=(7, 7), sr=2, rois=k, det=False):
        return _rules.backward_tiles(0, scalar, ps, shape, size, sr, rois, det)

    assert tiles() and tiles("float16") and tiles("bfloat16") and tiles(size=(14, 14)) and tiles(sr=3)
    assert tiles(shape=(16, 12, 200, 272)) and tiles(sr=4, size=(8, 8))
    assert not tiles("float64") and not tiles(ps=True) and not tiles(det=True)
    assert not tiles(sr=0) and not tiles(sr=-1) and not tiles(sr=4, size=(9, 9))  # adaptive; 36 samples
    assert not tiles(shape=(16, 258, 200, 272))  # channels not a multiple of 4
    assert not tiles(shape=(2, 256, 50, 68), rois=1024)  # fits L2
    assert not tiles(shape=(1, 4, 40000, 100)) and not tiles(rois=0)
    assert not tiles(shape=(5000, 4, 200, 272))  # more images than roi_image_order takes
    assert not tiles(shape=(4096, 1024, 8000, 8000))  # 2^31 blocks or more
    g_nchw, g_nhwc = (49 * c, 49, 7, 1), (49 * c, 1, 7 * c, c)
    table = -(-4 * (k + 2 * n + 2) // 16) * 16  # the forward's order and table, then each RoI's reach
    for scalar, item in (("float32", 4), ("float16", 2)):
        nbytes = _rules.roi_align_backward_workspace(0, scalar, False, g_nhwc, mask_rcnn, (7, 7), 2, k, fresh=True)
        assert nbytes == table + 1040 * k + 8 * k
        nbytes = _rules.roi_align_backward_workspace(0, scalar, False, g_nchw, mask_rcnn, (7, 7), 2, k, fresh=True)
        assert nbytes == table + 1040 * k + 8 * k + k * c * 49 * item
    # the array API's accumulation buffer is float for the half types: the atomics then
    assert _rules.roi_align_backward_workspace(0, "float16", False, g_nhwc, mask_rcnn, (7, 7), 2, k) == 4 * k
    assert _rules.roi_align_backward_workspace(0, "float32", False, g_nhwc, mask_rcnn, (7, 7), 2, k, True) == 4 * k

    launched = []
    monkeypatch.setattr(_rules, "_run", lambda family, kernel, device, stream, scalar, ps, total, args, **kw:
                        launched.append((kernel, total, args, kw)))
    work, nhwc = 1 << 20, (c * h * w, 1, w * c, c)
    for grad, fresh in (((11, g_nchw), True), ((11, g_nhwc), False)):
        launched.clear()
        _rules.roi_align_backward(0, 0, "float32", False, grad, mask_rcnn, 22, k, (7, 7), 0.25, 2, True,
                                  (44, nhwc), 0, work, fresh)
        names = [launch[0] for launch in launched]
        reach = table + 1040 * k
        reach, copy = work + reach, reach + 8 * k
        if grad[1] == g_nchw:
            assert names[0] == "tile_gradient_channels_last"
            assert launched[0][2] == (11, *g_nchw, k, c, 7, 7, work + copy)
            names = names[1:]
            grad = (work + copy, g_nhwc)
        assert names == ["roi_image_order", "roi_align_plane_geometry", "roi_align_backward_tiles"]
        *_, (_, geometry_total, geometry, _), (_, total, args, kw) = launched
        assert geometry == (22, k, n, h, w, 1, 1, 7, 7, 0.25, 2, True, work + table, work, reach, 0, 0, 0)  # pixels
        blocks = n * 25 * 34
        assert total == blocks * 256 and kw == {"blocks": blocks, "threads": 256, "shared": 73728}
        assert args == (*grad[0:1], *grad[1], k, c, 7, 7, 2, work, work + table, reach, 44, n, h, w, *nhwc,
                        0 if fresh else 1)


def test_prroi_backward_launches_by_mode(monkeypatch):
    """Which kernels PrRoIPool's backward launches (_rules.prroi_pool_backward,
    its launches recorded instead of run): with float atomics the box
    gradients go to prroi_pool_coords, the scatter kernels get no coordinate
    buffer; the deterministic backward never launches prroi_pool_coords (its
    sums would then follow the scheduling and the GPU's channel block) but
    sums per warp or block and adds the parts in order (prroi_pool_coords_sum)."""
    from cupy_roi import _kernels, _rules

    monkeypatch.setitem(_kernels._properties, (0, "l2CacheSize"), 50 << 20)  # an H100's L2; no GPU asked
    launched = []
    monkeypatch.setattr(_rules, "_run", lambda family, kernel, device, stream, scalar, ps, total, args, **kw:
                        launched.append((kernel, args, kw)))
    n, c_out, h, w, size, k = 2, 16, 20, 24, (3, 3), 7
    nchw, nhwc = (c_out * h * w, h * w, w, 1), (c_out * h * w, 1, w * c_out, c_out)

    def backward(x_strides, ps=False, grad_rows=0, max_grad=0, partials=0):
        launched.clear()
        c = c_out * 9 if ps else c_out
        strides = tuple(s * c // c_out for s in x_strides) if ps else x_strides
        _rules.prroi_pool_backward(0, 0, "float32", ps, (11, (c_out * 9, 9, 3, 1)), (22, strides), (n, c, h, w),
                                   33, k, size, 0.5, (44, strides), grad_rows, max_grad, partials)
        return [name for name, _, _ in launched]

    assert backward(nchw, grad_rows=55) == ["prroi_pool_backward_warp", "prroi_pool_coords"]
    assert launched[0][1][-1] == 0  # the scatter sums no coordinates
    assert launched[1][1][-1] == 55 and launched[1][2]["cpt"] == 8
    assert backward(nchw) == ["prroi_pool_backward_warp"]
    assert backward(nchw, grad_rows=55, max_grad=66, partials=77) == ["prroi_pool_backward_warp",
                                                                      "prroi_pool_coords_sum"]
    assert launched[0][1][-1] == 77 and launched[1][1] == (77, k, c_out // 4, 55)
    assert backward(nhwc, grad_rows=55) == ["prroi_pool_backward", "prroi_pool_coords"]
    assert launched[0][1][18] == 0 and launched[1][2]["cpt"] == 8  # want_coords off in the block mode
    assert backward(nhwc, grad_rows=55, max_grad=66, partials=77) == ["prroi_pool_backward", "prroi_pool_coords_sum"]
    assert launched[0][1][18] == 1 and launched[0][1][-2] == 77
    assert backward(nchw, ps=True, grad_rows=55) == ["prroi_pool_backward", "prroi_pool_coords"]
    assert launched[1][2]["cpt"] == 1


def test_channels_per_thread_rule():
    """Output channels per thread of the grouped forwards
    (_rules.channels_per_thread): 8 where channels are walked fastest, 4 with
    channel blocks, or 4 where 8 does not divide the channels or the block;
    else 1, and 1 for position-sensitive pooling and float64. Results never
    depend on it (test_cuda forces every value); this pins the choice."""
    from cupy_roi._rules import channels_per_thread

    assert channels_per_thread("float32", False, 256, 0) == 8  # channels_last
    assert channels_per_thread("float16", False, 256, 0) == 8
    assert channels_per_thread("float32", False, 256, 4) == 4  # Mask R-CNN map: blocks of 4 channels
    assert channels_per_thread("bfloat16", False, 256, 256) == 4  # RoI-major
    assert channels_per_thread("float32", False, 256, 2) == 1  # a group never spans two blocks
    assert channels_per_thread("float32", False, 36, 0) == 4
    assert channels_per_thread("float32", False, 12, 0) == 4
    assert channels_per_thread("float32", False, 21, 3) == 1
    assert channels_per_thread("float64", False, 256, 0) == 1
    assert channels_per_thread("float32", True, 256, 4) == 1
    # PrRoIPool's coordinate kernel aims for 8 in either order, within the block
    assert channels_per_thread("float32", False, 256, 256, target=8) == 8
    assert channels_per_thread("float32", False, 256, 4, target=8) == 4
    assert channels_per_thread("float32", False, 12, 12, target=8) == 4
    for c in range(1, 70):
        for block in [0] + [b for b in range(1, c + 1) if c % b == 0]:
            cpt = channels_per_thread("float32", False, c, block)
            assert cpt in (1, 4, 8) and c % cpt == 0 and block % cpt == 0


def test_channels_per_warp_rule():
    """The RoIAlign and PrRoIPool backwards' work mode (_rules.channels_per_warp):
    a warp per RoI and 4, 2 or 1 channels (dividing the channels; the block is
    rounded up to a multiple, warp_channel_block) for plain pooling over
    channel blocks (RoIAlign: with at most WARP_BINS bins per axis); else 0,
    a thread per bin (position-sensitive, channels fastest, RoIAlign's larger
    grids). Results do not depend on it (test_cuda's small-bin and coordinate
    tests cover both modes against the reference); this pins the choice, and
    the bound matches the kernel's register arrays."""
    from cupy_roi import _kernels
    from cupy_roi._rules import WARP_BINS, WARP_CHANNELS, channels_per_warp, warp_channel_block

    assert channels_per_warp("roi_align", False, (7, 7), 256, 256) == 4
    assert channels_per_warp("roi_align", False, (14, 14), 4, 256) == 4
    # the block does not decide (the call's shape does)
    assert channels_per_warp("roi_align", False, (7, 7), 2, 256) == 4
    assert channels_per_warp("roi_align", False, (7, 7), 1, 6) == 2
    assert channels_per_warp("roi_align", False, (7, 7), 3, 3) == 1
    assert channels_per_warp("roi_align", False, (7, 7), 0, 256) == 0  # channels last
    assert channels_per_warp("roi_align", True, (7, 7), 10, 10) == 0  # position-sensitive
    assert channels_per_warp("roi_align", False, (16, 16), 8, 8) == 4
    assert channels_per_warp("roi_align", False, (17, 3), 8, 8) == 0
    assert channels_per_warp("prroi_pool", False, (17, 3), 8, 8) == 4  # a lane holds only the bins it meets
    assert channels_per_warp("prroi_pool", True, (7, 7), 10, 10) == 0
    # ... it fits the block instead, which still divides the channels
    assert [warp_channel_block(b, w) for b, w in ((2, 4), (3, 2), (1, 2), (256, 4), (5, 0))] == [4, 6, 2, 256, 5]
    common = (_kernels.source_dir() / "roi_common.cuh").read_text()
    assert f"constexpr int kWarpBins = {WARP_BINS};" in common
    assert f"constexpr int kWarpChannels = {WARP_CHANNELS[0]};" in common
    assert f"constexpr int kBlockThreads = {_kernels.BLOCK};" in common


def test_seed_module_shapes_and_check():
    m = cupy_roi.PSROIAlign(spatial_scale=1 / 16, roi_size=7, sampling_ratio=2, pooled_dim=10)
    x = torch.randn(4, 490, 30, 40)
    rois = torch.tensor(cases.boxes(rng(), 6, 4, 30, 40, 1 / 16), dtype=torch.float32)
    assert m(x, rois).shape == (6, 10, 7, 7)
    assert "roi_size=7" in repr(m)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(4, 49, 30, 40), rois)
    tv_style = cupy_roi.PSRoIAlign((7, 7), 1 / 16, 2)
    assert torch.equal(tv_style(x, rois), m(x, rois))


def test_modules_match_functions():
    g = rng()
    x, r = cases.make(g, ph=2, pw=2, ps=True)
    x, r = torch.tensor(x), torch.tensor(r)
    assert torch.equal(cupy_roi.RoIAlign(2, 0.5, 2, True)(x, r), cupy_roi.roi_align(x, r, 2, 0.5, 2, True))
    assert torch.equal(cupy_roi.RoIPool(2, 0.5)(x, r), cupy_roi.roi_pool(x, r, 2, 0.5))
    assert torch.equal(cupy_roi.PSRoIPool(2, 0.5)(x, r), cupy_roi.ps_roi_pool(x, r, 2, 0.5))
    assert torch.equal(cupy_roi.PrRoIPool2D(2, 2, 0.5)(x, r), cupy_roi.prroi_pool2d(x, r, 2, 2, 0.5))
    assert torch.equal(cupy_roi.PSPrRoIPool2D(2, 2, 0.5)(x, r), cupy_roi.ps_prroi_pool(x, r, 2, 0.5))
    from cupy_roi.functional import prroi_pool2d
    assert prroi_pool2d is cupy_roi.prroi_pool2d


def test_half_types_on_cpu_follow_float64():
    """float32, float16 and bfloat16 against float64. The half types' bound is
    their rounding; float32's is the sample positions': they are worked out in
    float32 (RoI rows and grid), about 2e-6 px off near coordinate 30, which
    moves an output by that times the map's slope. Over 1000 draws the
    relative error reached 1.04e-6 (the old bound was 1e-6: seed
    4674283396884765055 failed), so float32 gets 4e-6."""
    g = rng()
    x, r = cases.make(g, k=6, kinds=("inside", "partial"))
    want = cupy_roi.roi_align(torch.tensor(x), torch.tensor(r), (3, 2), 0.5, 2)
    for dtype, tol in [(torch.float32, 4e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]:
        got = cupy_roi.roi_align(torch.tensor(x).to(dtype), torch.tensor(r), (3, 2), 0.5, 2)
        assert got.dtype == dtype and cases.rel_err(got, want) < tol


def test_channels_last_and_views_on_cpu():
    g = rng()
    x, r = cases.make(g, ps=True, ph=2, pw=2)
    x, r = torch.tensor(x), torch.tensor(r)
    want = cupy_roi.ps_prroi_pool(x, r, 2, 0.5)
    assert torch.allclose(cupy_roi.ps_prroi_pool(x.to(memory_format=torch.channels_last), r, 2, 0.5), want)


# ------------------------------------------------------------ array API (NumPy)

def test_array_api_numpy_matches_torch():
    g = rng()
    x, r = cases.make(g, ph=2, pw=2, ps=True, k=7)
    out = array_api.ps_roi_align_forward(x, r, 2, 0.5, 2)
    assert np.array_equal(out, cupy_roi.ps_roi_align(torch.tensor(x), torch.tensor(r), 2, 0.5, 2).numpy())
    go = g.standard_normal(out.shape)
    gi = array_api.ps_roi_align_backward(go, r, x.shape, 2, 0.5, 2)
    xt = torch.tensor(x, requires_grad=True)
    cupy_roi.ps_roi_align(xt, torch.tensor(r), 2, 0.5, 2).backward(torch.tensor(go))
    assert np.allclose(gi, xt.grad.numpy())

    out, argmax = array_api.roi_pool_forward(x, r, 2, 0.5)
    go = g.standard_normal(out.shape)
    gi = array_api.roi_pool_backward(go, r, argmax, x.shape, 2, 0.5)
    xt = torch.tensor(x, requires_grad=True)
    cupy_roi.roi_pool(xt, torch.tensor(r), 2, 0.5).backward(torch.tensor(go))
    assert np.allclose(gi, xt.grad.numpy())

    out = array_api.prroi_pool_forward(x, r, 2, 0.5)
    gi, gr = array_api.prroi_pool_backward(g.standard_normal(out.shape), x, r, 2, 0.5)
    assert gi.shape == x.shape and gr.shape == r.shape and np.all(gr[:, 0] == 0)


@pytest.mark.parametrize("name", ["roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool"])
def test_no_box_gradient_where_torchvision_has_none(name):
    """RoIAlign and RoIPool give no gradient to the boxes, on the CPU as on the
    GPU and in torchvision; only PrRoIPool differentiates its boxes."""
    g = rng()
    x, r = cases.make(g, ps=cases.OPS[name][1], ph=2, pw=2)
    xt, rt = torch.tensor(x, requires_grad=True), torch.tensor(r, requires_grad=True)
    cases.call(name, xt, rt, 2, 2, 0.5).sum().backward()
    assert rt.grad is None and xt.grad is not None
