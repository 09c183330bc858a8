"""Rotated RoIAlign and multi-level (FPN) RoIAlign: CPU reference against
independent oracles and invariants (CI), kernels against the reference and
against torchvision.ops.MultiScaleRoIAlign (marked cuda)."""
import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch

import cupy_roi
from cupy_roi import array_api

from . import cases
from . import slow_reference as slow

rng = cases.rng
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def rotated_rows(g, k, n, h, w, scale, outside=True):
    """[K, 6] rows (batch, cx, cy, w, h, angle): every angle, small to large
    boxes, some partly or wholly off the map."""
    img_h, img_w = h / scale, w / scale
    lo = -0.3 if outside else 0.2
    hi = 1.3 if outside else 0.8
    cx = g.uniform(lo, hi, k) * img_w
    cy = g.uniform(lo, hi, k) * img_h
    bw = g.uniform(0.05, 0.9, k) * img_w
    bh = g.uniform(0.05, 0.9, k) * img_h
    angle = g.uniform(-2 * math.pi, 2 * math.pi, k)
    angle[:3] = [0.0, math.pi / 2, -math.pi]
    return np.stack([g.integers(0, n, k), cx, cy, bw, bh, angle], 1)


# ------------------------------------------------------------ rotated, CPU

@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("clockwise", [False, True])
def test_rotated_reference_matches_slow_oracle(aligned, sampling_ratio, clockwise):
    g = rng()
    x = g.standard_normal((2, 3, 9, 11))
    r = rotated_rows(g, 14, 2, 9, 11, 0.5)
    got = cupy_roi.roi_align_rotated(torch.tensor(x), torch.tensor(r), (3, 2), 0.5, sampling_ratio, aligned,
                                     clockwise)
    want = slow.roi_align_rotated(x, r, 3, 2, 0.5, sampling_ratio, aligned, clockwise)
    assert np.allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("aligned", [True, False])
def test_rotated_angle_zero_is_roi_align(aligned):
    g = rng()
    x = torch.tensor(g.standard_normal((3, 4, 12, 10)))
    r = rotated_rows(g, 20, 3, 12, 10, 0.25)
    r[:, 5] = 0
    # dyadic coordinates and bins (4 x 2: a third of a dyadic width is not dyadic, and a sample
    # that lands on the map's -1 edge in one form can round past it in the other): corners and
    # centre-size forms then give the same sample positions, to the bit
    r[:, 1:5] = np.round(r[:, 1:5] * 8) / 8
    if not aligned:  # boxes under one cell grow to 1x1 about their centre here, from their corner in roi_align
        r[:, 3:5] = np.maximum(r[:, 3:5], 1 / 0.25)
    rows = torch.tensor(r)
    corners = torch.stack([rows[:, 0], rows[:, 1] - rows[:, 3] / 2, rows[:, 2] - rows[:, 4] / 2,
                           rows[:, 1] + rows[:, 3] / 2, rows[:, 2] + rows[:, 4] / 2], 1)
    a = cupy_roi.roi_align_rotated(x, rows, (4, 2), 0.25, 2, aligned)
    b = cupy_roi.roi_align(x, corners, (4, 2), 0.25, 2, aligned)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


def test_rotated_quarter_turn_turns_the_grid():
    """A square turned by pi/2 (counter-clockwise) pools the same samples,
    its bin grid turned a quarter clockwise: out[i, j] = unturned[P-1-j, i]."""
    g = rng()
    x = torch.tensor(g.standard_normal((1, 3, 16, 16)))
    sq = torch.tensor([[0, 7.3, 8.1, 6.0, 6.0, 0.0]], dtype=torch.float64)
    turned = sq.clone()
    turned[0, 5] = math.pi / 2
    a = cupy_roi.roi_align_rotated(x, sq, 5, 1.0, 2)
    b = cupy_roi.roi_align_rotated(x, turned, 5, 1.0, 2)
    assert torch.allclose(torch.rot90(a, -1, (2, 3)), b, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(a, b)


def test_rotated_clockwise_negates_the_angle():
    g = rng()
    x = torch.tensor(g.standard_normal((2, 2, 10, 10)))
    r = torch.tensor(rotated_rows(g, 9, 2, 10, 10, 1.0))
    flipped = r.clone()
    flipped[:, 5] = -flipped[:, 5]
    a = cupy_roi.roi_align_rotated(x, r, 3, 1.0, 2, True, clockwise=True)
    b = cupy_roi.roi_align_rotated(x, flipped, 3, 1.0, 2, True, clockwise=False)
    assert torch.equal(a, b)


def test_detectron2_convention_by_conversion():
    """detectron2's rows (degrees, counter-clockwise, always half-pixel
    aligned) through the documented conversion, against the oracle reading
    degrees; and what counter-clockwise means on an image: on a map that
    grows downwards, a box turned by +90 degrees has its width axis pointing
    up, so its bins decrease along j."""
    g = rng()
    x = g.standard_normal((2, 3, 14, 12))
    d2 = rotated_rows(g, 10, 2, 14, 12, 1.0)
    d2[:, 5] = g.uniform(-180, 180, len(d2))
    ours = torch.tensor(d2)
    ours[:, 5] = torch.deg2rad(ours[:, 5])
    got = cupy_roi.roi_align_rotated(torch.tensor(x), ours, 3, 1.0, 2, aligned=True, clockwise=False)
    want = slow.roi_align_rotated(x, d2, 3, 3, 1.0, 2, True, False, degrees=True)
    assert np.allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)

    ramp = torch.arange(20, dtype=torch.float64).view(1, 1, 20, 1).expand(1, 1, 20, 20).contiguous()
    box = torch.tensor([[0, 10.0, 10.0, 8.0, 2.0, 90.0]], dtype=torch.float64)
    box[:, 5] = torch.deg2rad(box[:, 5])
    row = cupy_roi.roi_align_rotated(ramp, box, (1, 4), 1.0, 2)[0, 0, 0]
    assert (row[1:] < row[:-1]).all(), row


def test_rotated_gradcheck_and_list_of_boxes():
    g = rng()
    x = torch.tensor(g.standard_normal((2, 2, 7, 8)), requires_grad=True)
    r = rotated_rows(g, 6, 2, 7, 8, 0.8)
    rows = torch.tensor(r)
    assert torch.autograd.gradcheck(lambda t: cupy_roi.roi_align_rotated(t, rows, (2, 3), 0.8, 0, True), (x,))
    boxes = [torch.tensor(r[r[:, 0] == i, 1:]) for i in range(2)]
    ordered = torch.tensor(np.concatenate([r[r[:, 0] == i] for i in range(2)]))
    m = cupy_roi.RoIAlignRotated((2, 3), 0.8, 2)
    assert torch.equal(m(x, boxes), m(x, ordered))
    assert "RoIAlignRotated(output_size=(2, 3)" in repr(m)


def test_rotated_bad_arguments():
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"rois must have shape \[K, 6\]"):
        cupy_roi.roi_align_rotated(x, torch.zeros(3, 5), 2)
    with pytest.raises(ValueError, match=r"angle\) with an integral batch_index"):
        cupy_roi.roi_align_rotated(x, torch.tensor([[2.0, 1, 1, 2, 2, 0]]), 2)
    with pytest.raises(ValueError, match=r"rois\[0\] must have shape \[K, 5\]"):
        cupy_roi.roi_align_rotated(x, [torch.zeros(1, 4), torch.zeros(1, 5)], 2)
    assert cupy_roi.roi_align_rotated(x, torch.zeros(0, 6), 2).shape == (0, 3, 2, 2)


def test_rotated_array_api_on_numpy():
    g = rng()
    x = g.standard_normal((2, 3, 9, 9))
    r = rotated_rows(g, 7, 2, 9, 9, 1.0)
    out = array_api.roi_align_rotated_forward(x, r, 2, 1.0, 2)
    assert np.allclose(out, slow.roi_align_rotated(x, r, 2, 2, 1.0, 2, True, False), rtol=1e-10, atol=1e-12)
    go = g.standard_normal(out.shape)
    gi = array_api.roi_align_rotated_backward(go, r, x.shape, 2, 1.0, 2)
    xt = torch.tensor(x, requires_grad=True)
    cupy_roi.roi_align_rotated(xt, torch.tensor(r), 2, 1.0, 2).backward(torch.tensor(go))
    assert np.allclose(gi, xt.grad.numpy(), rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------ multi-level, CPU

STRIDES = (4, 8, 16, 32)


def pyramid(g, n=2, c=3, image=(128, 160), strides=STRIDES, dtype=np.float64):
    return [g.standard_normal((n, c, image[0] // s, image[1] // s)).astype(dtype) for s in strides]


def fpn_boxes(g, n, image, per_image):
    """Boxes from a few pixels to the whole image, per image; the first ones
    (16, 150, 300 and 600 pixels square) land on four different levels of both
    mappings when the image is large enough to hold them."""
    out = []
    for _ in range(n):
        size = np.exp(g.uniform(np.log(4), np.log(max(image)), (per_image, 2)))
        fixed = [v for v in (16.0, 150.0, 300.0, 600.0) if v <= max(image)][:per_image]
        size[:len(fixed)] = np.array(fixed)[:, None] * g.uniform(0.97, 1.03, (len(fixed), 1))
        x1 = g.uniform(-0.1, 0.9, per_image) * image[1]
        y1 = g.uniform(-0.1, 0.9, per_image) * image[0]
        out.append(np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], 1))
    return out


def fpn_level(box, mapping, levels, k_min=2, k_max=5):
    """The level of one box by the documented formulas, in Python floats."""
    s = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
    if mapping == "torchvision":
        return min(max(math.floor(4 + math.log2(s / 224) + 1e-6), k_min), k_max) - k_min
    return min(max(math.floor(math.log2(s / 56 + 1e-6)), 0), levels - 1)


def per_level_roi_align(feats, boxes, size, scales, sr, aligned, mapping):
    """Each box through roi_align on its level, one call per box."""
    rows = []
    for i, b in enumerate(boxes):
        for box in b:
            level = fpn_level(box, mapping, len(feats))
            r = torch.tensor([[float(i), *box]], dtype=feats[0].dtype)
            rows.append(cupy_roi.roi_align(feats[level], r, size, scales[level], sr, aligned))
    return torch.cat(rows)


@pytest.mark.parametrize("mapping", ["torchvision", "mmdet"])
@pytest.mark.parametrize("aligned", [False, True])
def test_multi_scale_matches_per_level_roi_align(mapping, aligned):
    g = rng()
    image = (512, 640)  # boxes of 4 to 640 pixels: every level of both mappings
    feats = [torch.tensor(f) for f in pyramid(g, c=2, image=image)]
    boxes = [torch.tensor(b) for b in fpn_boxes(g, 2, image, 12)]
    scales = [1 / s for s in STRIDES]
    got = cupy_roi.multi_scale_roi_align(feats, boxes, (3, 4), scales, 2, aligned, mapping=mapping)
    want = per_level_roi_align(feats, boxes, (3, 4), scales, 2, aligned, mapping)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)
    levels = {fpn_level(b, mapping, 4) for bb in boxes for b in bb.tolist()}
    assert len(levels) >= 3, levels  # the draw spans the pyramid


def test_multi_scale_module_like_torchvision():
    """Scale inference from feature and image sizes, featmap_names kept in
    x's order, a single level through plain roi_align, inverted boxes zero."""
    g = rng()
    image = (384, 512)
    feats = [torch.tensor(f) for f in pyramid(g, image=image, strides=(4, 8, 16))]
    x = OrderedDict([("p2", feats[0]), ("skip", torch.zeros(2, 3, 5, 5)), ("p3", feats[1]), ("p4", feats[2])])
    boxes = [torch.tensor(b) for b in fpn_boxes(g, 2, image, 6)]
    boxes[1][0] = torch.tensor([50.0, 10.0, 20.0, 60.0])  # x2 < x1: NaN level
    m = cupy_roi.MultiScaleRoIAlign(["p4", "p3", "p2"], 2, 2)
    out = m(x, boxes, [(380, 500), image])
    assert m.scales == [0.25, 0.125, 0.0625]
    assert out.shape == (12, 3, 2, 2)
    assert torch.count_nonzero(out[6]) == 0 and torch.count_nonzero(out[:6]) > 0
    rows = [(i, b) for i, bb in enumerate(boxes) for b in bb.tolist()]
    for k, (i, b) in enumerate(rows):
        if k == 6:
            continue
        level = min(max(math.floor(4 + math.log2(math.sqrt((b[2] - b[0]) * (b[3] - b[1])) / 224) + 1e-6), 2), 4) - 2
        want = cupy_roi.roi_align(feats[level], torch.tensor([[i, *b]], dtype=torch.float64), 2,
                                  m.scales[level], 2, False)
        assert torch.allclose(out[k:k + 1], want, rtol=1e-12, atol=1e-13), k
    single = cupy_roi.MultiScaleRoIAlign(["p3"], 2, 2)
    assert torch.equal(single(x, boxes, [image, image]),
                       cupy_roi.roi_align(feats[1], boxes, 2, 0.125, 2, False))
    assert "MultiScaleRoIAlign(featmap_names=['p4', 'p3', 'p2']" in repr(m)


def test_multi_scale_gradcheck_every_level():
    g = rng()
    image = (32, 32)
    feats = [torch.tensor(f, requires_grad=True) for f in pyramid(g, c=2, image=image, strides=(4, 8, 16))]
    boxes = [torch.tensor([[1.0, 2.0, 9.0, 8.0], [0.0, 0.0, 36.0, 40.0]]),
             torch.tensor([[3.0, 3.0, 20.0, 27.0], [5.0, 1.0, 7.0, 4.0]])]
    boxes = [b.double() for b in boxes]
    scales = [0.25, 0.125, 0.0625]

    def fn(*levels):
        return cupy_roi.multi_scale_roi_align(list(levels), boxes, 2, scales, 2, mapping="mmdet", finest_scale=8)

    assert torch.autograd.gradcheck(fn, tuple(feats))
    out = fn(*feats)
    out.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_multi_scale_bad_arguments():
    f = [torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 8, 8)]
    boxes = [torch.zeros(1, 4), torch.zeros(1, 4)]
    with pytest.raises(ValueError, match=r"features\[1\] must have the \(N, C\)"):
        cupy_roi.multi_scale_roi_align([f[0], torch.zeros(2, 4, 8, 8)], boxes, 2, [0.25, 0.125])
    with pytest.raises(ValueError, match="one scale per level"):
        cupy_roi.multi_scale_roi_align(f, boxes, 2, [0.25])
    with pytest.raises(ValueError, match="1 to 8 pyramid levels"):
        cupy_roi.multi_scale_roi_align(f * 5, boxes, 2, [0.25] * 10)
    with pytest.raises(ValueError, match="mapping must be one of"):
        cupy_roi.multi_scale_roi_align(f, boxes, 2, [0.25, 0.125], mapping="nearest")
    with pytest.raises(TypeError, match=r"features\[1\] must have the dtype and device"):
        cupy_roi.multi_scale_roi_align([f[0], f[1].double()], boxes, 2, [0.25, 0.125])
    with pytest.raises(ValueError, match="image_shapes must not be empty"):
        cupy_roi.MultiScaleRoIAlign(["a", "b"], 2, 2)({"a": f[0], "b": f[1]}, boxes, [])
    out = cupy_roi.multi_scale_roi_align(f, [torch.zeros(0, 4), torch.zeros(0, 4)], 2, [0.25, 0.125])
    assert out.shape == (0, 3, 2, 2)


def test_multi_scale_array_api_on_numpy():
    g = rng()
    feats = pyramid(g, image=(64, 64), strides=(4, 8))
    boxes = fpn_boxes(g, 2, (64, 64), 5)
    rows = np.concatenate([np.concatenate([np.full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
    out = array_api.multi_scale_roi_align_forward(feats, rows, 2, [0.25, 0.125], 2, mapping="mmdet",
                                                  finest_scale=16)
    ft = [torch.tensor(f, requires_grad=True) for f in feats]
    want = cupy_roi.multi_scale_roi_align(ft, torch.tensor(rows), 2, [0.25, 0.125], 2, mapping="mmdet",
                                          finest_scale=16)
    assert np.allclose(out, want.detach().numpy(), rtol=1e-12, atol=1e-13)
    go = g.standard_normal(out.shape)
    grads = array_api.multi_scale_roi_align_backward(go, rows, [f.shape for f in feats], 2, [0.25, 0.125], 2,
                                                     mapping="mmdet", finest_scale=16)
    want.backward(torch.tensor(go))
    for a, b in zip(grads, ft):
        assert np.allclose(a, b.grad.numpy(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_rotated_and_multi_scale(device):
    g = rng()
    x = torch.tensor(g.standard_normal((2, 3, 12, 12)), device=device, requires_grad=True)
    r = torch.tensor(rotated_rows(g, 7, 2, 12, 12, 1.0, outside=False), device=device)
    feats = [torch.tensor(f, device=device, requires_grad=True) for f in pyramid(g, image=(64, 64))]
    boxes = [torch.tensor(b, device=device) for b in fpn_boxes(g, 2, (64, 64), 4)]
    scales = [1 / s for s in STRIDES]

    def model(x, r, feats, boxes):
        return (cupy_roi.roi_align_rotated(x, r, 3, 1.0, 2).square().sum()
                + cupy_roi.multi_scale_roi_align(feats, boxes, 2, scales, 2).square().sum())

    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x, r, feats, boxes)
    y.backward()
    got = [x.grad.clone()] + [f.grad.clone() for f in feats]
    for t in [x] + feats:
        t.grad = None
    want = model(x, r, feats, boxes)
    want.backward()
    assert torch.allclose(y, want, rtol=1e-10)
    for a, t in zip(got, [x] + feats):
        assert torch.allclose(a, t.grad, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------ GPU

@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_rotated_kernel_matches_reference(layout):
    g = rng()
    for sr, aligned, clockwise in ((2, True, False), (0, False, True), (1, True, True)):
        x = g.standard_normal((3, 5, 13, 17))
        r = rotated_rows(g, 30, 3, 13, 17, 0.5)
        xt = torch.tensor(x, device="cuda")
        if layout == "channels_last":
            xt = xt.to(memory_format=torch.channels_last)
        elif layout == "strided":
            wide = torch.zeros(3, 5, 13, 34, dtype=torch.float64, device="cuda")
            wide[..., ::2] = xt
            xt = wide[..., ::2]
        xt.requires_grad_(True)
        out = cupy_roi.roi_align_rotated(xt, torch.tensor(r, device="cuda"), (3, 4), 0.5, sr, aligned, clockwise)
        xc = torch.tensor(x, requires_grad=True)
        want = cupy_roi.roi_align_rotated(xc, torch.tensor(r), (3, 4), 0.5, sr, aligned, clockwise)
        assert torch.allclose(out.cpu(), want, rtol=1e-10, atol=1e-12)
        go = torch.tensor(g.standard_normal(out.shape))
        out.backward(go.cuda())
        want.backward(go)
        assert torch.allclose(xt.grad.cpu(), xc.grad, rtol=1e-10, atol=1e-12)
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_new_ops_low_precision(dtype, tol):
    g = rng()
    x = g.standard_normal((2, 4, 16, 16))
    r = rotated_rows(g, 12, 2, 16, 16, 1.0)
    out = cupy_roi.roi_align_rotated(torch.tensor(x, device="cuda", dtype=dtype), torch.tensor(r, device="cuda"), 3)
    want = cupy_roi.roi_align_rotated(torch.tensor(x), torch.tensor(r), 3)
    assert out.dtype == dtype
    assert cases.rel_err(out, want) < tol
    feats = pyramid(g, image=(64, 96))
    boxes = fpn_boxes(g, 2, (64, 96), 10)
    scales = [1 / s for s in STRIDES]
    out = cupy_roi.multi_scale_roi_align([torch.tensor(f, device="cuda", dtype=dtype) for f in feats],
                                         [torch.tensor(b, device="cuda", dtype=torch.float32) for b in boxes], 2,
                                         scales, 2)
    want = cupy_roi.multi_scale_roi_align([torch.tensor(f) for f in feats],
                                          [torch.tensor(b, dtype=torch.float32).double() for b in boxes], 2,
                                          scales, 2)
    assert out.dtype == dtype
    assert cases.rel_err(out, want) < tol


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_multi_scale_matches_torchvision_module(dtype, channels_last, sampling_ratio):
    """Element by element against torchvision.ops.MultiScaleRoIAlign,
    forward and the gradient of every level, on an FPN-shaped pyramid."""
    tv = pytest.importorskip("torchvision")
    g = rng()
    image = (200, 272)
    names = ["p2", "p3", "p4", "p5"]
    feats = pyramid(g, n=2, c=8, image=image)
    boxes = fpn_boxes(g, 2, image, 64)

    def run(module):
        x = OrderedDict()
        for name, f in zip(names, feats):
            t = torch.tensor(f, device="cuda", dtype=dtype)
            if channels_last:
                t = t.to(memory_format=torch.channels_last)
            x[name] = t.requires_grad_(True)
        b = [torch.tensor(v, device="cuda", dtype=dtype) for v in boxes]
        out = module(x, b, [image, image])
        out.backward(go)
        return out, [x[n].grad for n in names]

    go = torch.tensor(g.standard_normal((128, 8, 7, 7)), device="cuda", dtype=dtype)
    ours, ours_grads = run(cupy_roi.MultiScaleRoIAlign(names, 7, sampling_ratio))
    theirs, their_grads = run(tv.ops.MultiScaleRoIAlign(names, 7, sampling_ratio))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert torch.equal(ours == 0, theirs == 0)  # same level for every box
    assert torch.allclose(ours, theirs, **tol), (ours - theirs).abs().max()
    for a, b in zip(ours_grads, their_grads):
        assert torch.allclose(a, b, **tol), (a - b).abs().max()
    if dtype == torch.float32:  # report how close: the closing note quotes it
        print(f"max |ours - torchvision| forward {(ours - theirs).abs().max().item():.3g}, grad "
              f"{max((a - b).abs().max().item() for a, b in zip(ours_grads, their_grads)):.3g}")


@pytest.mark.cuda
@pytest.mark.parametrize("mapping", ["torchvision", "mmdet"])
def test_multi_scale_kernel_matches_reference(mapping):
    g = rng()
    feats = pyramid(g, n=3, c=4, image=(96, 128))
    boxes = fpn_boxes(g, 3, (96, 128), 15)
    boxes[1][0] = [40.0, 10.0, 20.0, 60.0]  # inverted: NaN level, zero row
    scales = [1 / s for s in STRIDES]
    fc = [torch.tensor(f, device="cuda", requires_grad=True) for f in feats]
    fr = [torch.tensor(f, requires_grad=True) for f in feats]
    out = cupy_roi.multi_scale_roi_align(fc, [torch.tensor(b, device="cuda") for b in boxes], (2, 3), scales, 0,
                                         True, mapping=mapping)
    want = cupy_roi.multi_scale_roi_align(fr, [torch.tensor(b) for b in boxes], (2, 3), scales, 0, True,
                                          mapping=mapping)
    assert torch.allclose(out.cpu(), want, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(out[15]) == 0
    go = torch.tensor(g.standard_normal(out.shape))
    out.backward(go.cuda())
    want.backward(go)
    for a, b in zip(fc, fr):
        assert torch.allclose(a.grad.cpu(), b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
def test_new_ops_invalid_rows_and_empty_on_gpu():
    x = torch.randn(2, 3, 8, 8, device="cuda", requires_grad=True)
    bad = torch.tensor([[2.0, 4, 4, 3, 3, 0.1], [0.5, 4, 4, 3, 3, 0], [0, float("nan"), 4, 3, 3, 0],
                        [1, 4, 4, 3, 3, 0.2]], device="cuda")
    out = cupy_roi.roi_align_rotated(x, bad, 2)
    assert torch.isnan(out[:3]).all() and torch.isfinite(out[3]).all()
    out.nan_to_num().sum().backward()
    assert torch.isfinite(x.grad).all()
    with cupy_roi.roi_checks(True), pytest.raises(ValueError, match="3 of 4 rows are invalid"):
        cupy_roi.roi_align_rotated(x, bad, 2)
    feats = [torch.randn(2, 3, 16, 16, device="cuda"), torch.randn(2, 3, 8, 8, device="cuda")]
    rows = torch.tensor([[5.0, 1, 1, 9, 9], [1, 1, 1, 9, 9]], device="cuda")
    out = cupy_roi.multi_scale_roi_align(feats, rows, 2, [0.25, 0.125])
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    assert cupy_roi.roi_align_rotated(x, torch.zeros(0, 6, device="cuda"), 2).shape == (0, 3, 2, 2)
    assert cupy_roi.multi_scale_roi_align(feats, torch.zeros(0, 5, device="cuda"), 2, [0.25, 0.125]).shape == (
        0, 3, 2, 2)


@pytest.mark.cuda
def test_new_ops_in_cuda_graph():
    g = rng()
    x = torch.tensor(g.standard_normal((2, 3, 12, 12)), device="cuda", requires_grad=True)
    r = torch.tensor(rotated_rows(g, 7, 2, 12, 12, 1.0), device="cuda")
    feats = [torch.tensor(f, device="cuda", requires_grad=True) for f in pyramid(g, image=(64, 64))]
    rows = torch.tensor(np.concatenate([np.concatenate([np.full((4, 1), i), b], 1)
                                        for i, b in enumerate(fpn_boxes(g, 2, (64, 64), 4))]), device="cuda")
    scales = [1 / s for s in STRIDES]

    def step():
        y = cupy_roi.roi_align_rotated(x, r, 3).sum() + cupy_roi.multi_scale_roi_align(feats, rows, 2, scales).sum()
        y.backward()
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    for t in [x] + feats:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    new_r = torch.tensor(rotated_rows(g, 7, 2, 12, 12, 1.0), device="cuda")
    r.copy_(new_r)
    graph.replay()
    torch.cuda.synchronize()
    got = [y.item(), x.grad.clone()] + [f.grad.clone() for f in feats]
    for t in [x] + feats:
        t.grad = None
    want = step()
    assert got[0] == pytest.approx(want.item(), rel=1e-10)
    for a, t in zip(got[1:], [x] + feats):
        assert torch.allclose(a, t.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
def test_new_ops_cupy_array_api():
    import cupy

    g = rng()
    x = g.standard_normal((2, 3, 10, 12))
    r = rotated_rows(g, 9, 2, 10, 12, 1.0)
    out = array_api.roi_align_rotated_forward(cupy.asarray(x), cupy.asarray(r), 3, 1.0, 2)
    assert isinstance(out, cupy.ndarray)
    assert np.allclose(out.get(), array_api.roi_align_rotated_forward(x, r, 3, 1.0, 2), rtol=1e-10, atol=1e-12)
    go = g.standard_normal(out.shape)
    gi = array_api.roi_align_rotated_backward(cupy.asarray(go), cupy.asarray(r), x.shape, 3, 1.0, 2)
    assert np.allclose(gi.get(), array_api.roi_align_rotated_backward(go, r, x.shape, 3, 1.0, 2), rtol=1e-10,
                       atol=1e-12)
    feats = pyramid(g, image=(64, 64))
    rows = np.concatenate([np.concatenate([np.full((5, 1), i), b], 1)
                           for i, b in enumerate(fpn_boxes(g, 2, (64, 64), 5))])
    scales = [1 / s for s in STRIDES]
    out = array_api.multi_scale_roi_align_forward([cupy.asarray(f) for f in feats], cupy.asarray(rows), 2, scales)
    assert np.allclose(out.get(), array_api.multi_scale_roi_align_forward(feats, rows, 2, scales), rtol=1e-10,
                       atol=1e-12)
    go = g.standard_normal(out.shape)
    grads = array_api.multi_scale_roi_align_backward(cupy.asarray(go), cupy.asarray(rows), [f.shape for f in feats],
                                                     2, scales)
    want = array_api.multi_scale_roi_align_backward(go, rows, [f.shape for f in feats], 2, scales)
    for a, b in zip(grads, want):
        assert np.allclose(a.get(), b, rtol=1e-10, atol=1e-12)


def test_rotated_scripts():
    g = rng()
    x = torch.tensor(g.standard_normal((2, 3, 8, 8)))
    r = torch.tensor(rotated_rows(g, 5, 2, 8, 8, 1.0))
    want = cupy_roi.roi_align_rotated(x, r, 2, 1.0, 2)
    with warnings.catch_warnings():  # newer PyTorch deprecates TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        fn = torch.jit.script(cupy_roi.roi_align_rotated)
        module = torch.jit.script(cupy_roi.RoIAlignRotated(2, 1.0, 2))
    assert torch.allclose(fn(x, r, [2, 2], 1.0, 2, True, False), want, rtol=1e-12, atol=1e-13)
    assert torch.allclose(module(x, r), want, rtol=1e-12, atol=1e-13)
