"""Small cases for compute-sanitizer: every operator (rotated and multi-level
RoIAlign included), dtype and layout, forward
and backward (box gradients for PrRoIPool), atomic and deterministic, through
the torch ops and the CuPy array API, with invalid RoIs left unchecked (they
must read nothing).

    compute-sanitizer --tool memcheck  python tests/sanitize_cases.py
    compute-sanitizer --tool racecheck python tests/sanitize_cases.py

Not a pytest module: run it under the sanitizer, which reads its summary.
"""
import sys

import numpy as np
import torch

import cupy_roi
from cupy_roi import array_api

OPS = {
    "roi_align": lambda x, r: cupy_roi.roi_align(x, r, (2, 3), 0.5, 2, True),
    "roi_align adaptive": lambda x, r: cupy_roi.roi_align(x, r, (2, 3), 0.5, 0, False),
    # 9 bins a row, 2 x samples each: a wide RoI's 36 sample columns take the warp two passes
    "roi_align 2x9": lambda x, r: cupy_roi.roi_align(x, r, (2, 9), 0.5, 2, True),
    "ps_roi_align": lambda x, r: cupy_roi.ps_roi_align(x, r, (2, 3), 0.5, 2),
    "roi_pool": lambda x, r: cupy_roi.roi_pool(x, r, (2, 3), 0.5),
    "ps_roi_pool": lambda x, r: cupy_roi.ps_roi_pool(x, r, (2, 3), 0.5),
    "prroi_pool2d": lambda x, r: cupy_roi.prroi_pool2d(x, r, 2, 3, 0.5),
    # 9 bins a row: the sliver's columns meet more bins than a lane holds at once (several passes)
    "prroi_pool2d 3x9": lambda x, r: cupy_roi.prroi_pool2d(x, r, 3, 9, 0.5),
    "ps_prroi_pool": lambda x, r: cupy_roi.ps_prroi_pool(x, r, (2, 3), 0.5),
}


def rois(rng, n, h, w):
    good = [[rng.integers(0, n), *rng.uniform(-4, 2 * w, 2), *rng.uniform(2, 2.5 * w, 2)] for _ in range(6)]
    good += [[0, -30, -30, 3 * w, 3 * h], [n - 1, 2 * w + 5, 2 * h + 5, 2 * w + 9, 2 * h + 9],  # huge, outside
             [0, 3.2, 3.2, 3.2004, 3.2004]]  # a sliver
    bad = [[n, 1, 1, 5, 5], [-1, 1, 1, 5, 5], [0.5, 1, 1, 5, 5], [0, float("nan"), 1, 5, 5],
           [0, 1, 1, float("inf"), 5], [1e9, 1, 1, 5, 5]]
    return np.array(good + bad, dtype=np.float64)


def rotated_rows(rng, r):
    """Rotated rows from the [K, 5] rows: same batch indices (bad ones too),
    centres and sizes from the corners, angles of every quadrant."""
    cx, cy = (r[:, 1] + r[:, 3]) / 2, (r[:, 2] + r[:, 4]) / 2
    w, h = r[:, 3] - r[:, 1], r[:, 4] - r[:, 2]
    angle = rng.uniform(-4, 4, len(r))
    return np.stack([r[:, 0], cx, cy, w, h, angle], 1)


def layouts(x):
    yield "nchw", x
    yield "channels_last", x.to(memory_format=torch.channels_last)
    wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    yield "strided view", wide[..., ::2]


def main():
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    count = 0
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)  # the deterministic backward kernels
        try:
            count += torch_calls(rng)
        finally:
            torch.use_deterministic_algorithms(False)
    # work orders only large maps get by themselves: blocks of one channel (channel-major), and
    # blocks of four with four channels per thread in NCHW, eight in channels_last (the default
    # pass: 4 per thread in RoI-major NCHW order, 8 in channels_last; 24 channels)
    from cupy_roi import _rules

    # RoIAlign's forward and backward also in channels-last blocks of 8 (3 blocks), walking RoIs image by image
    # and the forward's plane mode (its NCHW and strided-view calls; a map of 16 columns: 16-byte copies)
    policy = (_rules._channel_block, _rules._group_target, _rules._channels_last_block, _rules._image_order,
              _rules._plane_pays)
    for block, per_thread in ((1, 1), (4, 8)):
        _rules._channel_block = lambda channels, *rest: block
        _rules._group_target = lambda channels_fastest: per_thread
        _rules._channels_last_block = lambda channels, *rest: -8
        _rules._image_order = lambda *rest: True
        _rules._plane_pays = lambda *rest: True
        try:
            count += torch_calls(rng)
            count += plane_calls(rng)
        finally:
            (_rules._channel_block, _rules._group_target, _rules._channels_last_block, _rules._image_order,
             _rules._plane_pays) = policy
    count += wide_calls(rng)
    count += shifted_channels_last_calls(rng)
    array_api_calls(rng)
    torch.cuda.synchronize()
    print(f"sanitize_cases: {count} torch forward+backward calls (2 backward modes, and 2 forced work orders, x 4 "
          f"dtypes x 3 layouts x ({len(OPS)} ops + rotated and multi-level RoIAlign); a wide map; shifted "
          "channels-last maps), array API "
          "calls in both modes, unchecked invalid RoIs: done")


def torch_calls(rng):
    n, c, h, w = 2, 24, 7, 9
    r = rois(rng, n, h, w)
    count = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        base = torch.tensor(rng.standard_normal((n, c, h, w)), dtype=dtype, device="cuda")
        for name, op in OPS.items():
            for layout, x in layouts(base):
                x = x.detach().requires_grad_(True)
                rt = torch.tensor(r, device="cuda", dtype=torch.float32 if dtype != torch.float64 else dtype,
                                  requires_grad=name.endswith("prroi_pool") or name.startswith("prroi_pool2d"))
                out = op(x, rt)
                out.backward(torch.ones_like(out))
                count += 1
        # zero RoIs
        out = OPS["roi_align"](base.detach().requires_grad_(True), torch.zeros(0, 5, device="cuda"))
        out.sum().backward()
        acc = torch.float32 if dtype != torch.float64 else dtype
        rot = torch.tensor(rotated_rows(rng, r), device="cuda", dtype=acc)
        for layout, x in layouts(base):
            x = x.detach().requires_grad_(True)
            for aligned, clockwise in ((True, False), (False, True)):
                out = cupy_roi.roi_align_rotated(x, rot, (2, 3), 0.5, 0, aligned, clockwise)
                out.backward(torch.ones_like(out))
            # a pyramid: this layout, and a strided half-size view
            levels = [x, x[..., ::2, ::2]]
            for mapping in ("torchvision", "mmdet"):
                out = cupy_roi.multi_scale_roi_align(levels, torch.tensor(r, device="cuda", dtype=acc), (2, 3),
                                                     [0.5, 0.25], 0, True, mapping=mapping, canonical_scale=4,
                                                     finest_scale=2)
                out.backward(torch.ones_like(out))
            count += 4
    return count


def wide_calls(rng):
    """A map 80 columns wide: the warp-mode backwards' RoIs past 32 columns
    (RoIAlign's lanes over sample columns, in one pass or two, or 32 columns a pass;
    PrRoIPool's column chunks), both backward modes, float32 and float64, NCHW
    and a strided view."""
    n, c, h, w = 2, 8, 5, 80
    r = rois(rng, n, h, w)
    count = 0
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            for dtype in (torch.float32, torch.float64):
                base = torch.tensor(rng.standard_normal((n, c, h, w)), dtype=dtype, device="cuda")
                for layout, x in list(layouts(base))[::2]:
                    for name in ("roi_align", "roi_align adaptive", "roi_align 2x9", "prroi_pool2d",
                                 "prroi_pool2d 3x9"):
                        xg = x.detach().requires_grad_(True)
                        rt = torch.tensor(r, device="cuda", dtype=dtype, requires_grad=name.startswith("prroi"))
                        out = OPS[name](xg, rt)
                        out.backward(torch.ones_like(out))
                    xg = x.detach().requires_grad_(True)
                    out = cupy_roi.multi_scale_roi_align([xg, xg[..., ::2, ::2]], torch.tensor(r, device="cuda",
                                                                                               dtype=dtype),
                                                         (2, 3), [0.5, 0.25], 2, True, mapping="mmdet",
                                                         finest_scale=2)
                    out.backward(torch.ones_like(out))
                    count += 6
        finally:
            torch.use_deterministic_algorithms(False)
    return count


def plane_calls(rng):
    """The RoIAlign forward's plane mode and the backward's tile mode (forced
    by the caller; the other forced calls take the tile mode too) on a map
    whose rows copy 16 bytes at a time in every dtype, through the torch op
    and the array API, sampling grids of 2 (14x14: two passes over the bin
    columns) and 4."""
    import cupy

    n, c, h, w = 3, 4, 6, 16
    r = rois(rng, n - 1, h, w)  # image n - 1: no RoI
    count = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.tensor(rng.standard_normal((n, c, h, w)), dtype=dtype, device="cuda").requires_grad_(True)
        rt = torch.tensor(r, device="cuda", dtype=torch.float32)
        for size, sr in (((14, 14), 2), ((2, 3), 4)):
            out = cupy_roi.roi_align(x, rt, size, 0.5, sr, False)
            out.backward(torch.ones_like(out))
            if dtype != torch.bfloat16:
                array_api.roi_align_forward(cupy.from_dlpack(x.detach()), cupy.from_dlpack(rt), size, 0.5, sr)
            if dtype == torch.float32:  # the backward's tile mode, adding into the caller's grad_input
                go = cupy.asarray(rng.standard_normal((len(r), c) + size), dtype=cupy.float32)
                array_api.roi_align_backward(go, cupy.from_dlpack(rt), (n, c, h, w), size, 0.5, sr)
            count += 1
    # the tile backward's two channel blocks of 256, the second's lanes' second runs of 4 past the last channel
    x = torch.tensor(rng.standard_normal((n, 260, h, w)), dtype=torch.float32, device="cuda").requires_grad_(True)
    out = cupy_roi.roi_align(x, rt, (2, 3), 0.5, 4, False)
    out.backward(torch.ones_like(out))
    # 130 images: roi_image_order's counters shared by all its warps (past 128 images); most
    # images without a RoI (tile blocks that skip to their write-out)
    many = 130
    x = torch.tensor(rng.standard_normal((many, c, h, w)), dtype=torch.float32, device="cuda").requires_grad_(True)
    rt = torch.tensor(rois(rng, many, h, w), device="cuda", dtype=torch.float32)
    out = cupy_roi.roi_align(x, rt, (2, 3), 0.5, 2, True)
    out.backward(torch.ones_like(out))
    return count + 2


def shifted_channels_last_calls(rng):
    """Channels-last strides one element past a 16-byte boundary: the
    RoIAlign forward's vector groups must fall back to element loads (the
    layouts above start aligned and take them)."""
    n, c, h, w = 2, 24, 7, 9
    r = torch.tensor(rois(rng, n, h, w), device="cuda", dtype=torch.float32)
    count = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        shifted = torch.zeros(n * h * w * c + 1, dtype=dtype, device="cuda")[1:].view(n, h, w, c).permute(0, 3, 1, 2)
        shifted.copy_(torch.tensor(rng.standard_normal((n, c, h, w)), dtype=dtype, device="cuda"))
        x = shifted.requires_grad_(True)
        out = OPS["roi_align"](x, r)
        out.backward(torch.ones_like(out))
        count += 1
    return count


def array_api_calls(rng):
    import cupy

    n, c, h, w = 2, 12, 7, 9
    r = rois(rng, n, h, w)
    xc = cupy.asarray(rng.standard_normal((n, c, h, w)))
    rc = cupy.asarray(r)
    rot = cupy.asarray(rotated_rows(rng, r))
    for det in (False, True):
        out = array_api.ps_roi_align_forward(xc, rc, (2, 3), 0.5, 2)
        array_api.ps_roi_align_backward(out, rc, xc.shape, (2, 3), 0.5, 2, deterministic=det)
        out, argmax = array_api.roi_pool_forward(xc, rc, (2, 3), 0.5)
        array_api.roi_pool_backward(out, rc, argmax, xc.shape, (2, 3), 0.5, deterministic=det)
        out = array_api.prroi_pool_forward(xc, rc, (2, 3), 0.5, True)
        array_api.prroi_pool_backward(out, xc, rc, (2, 3), 0.5, True, deterministic=det)
        out = array_api.roi_align_rotated_forward(xc, rot, (2, 3), 0.5)
        array_api.roi_align_rotated_backward(out, rot, xc.shape, (2, 3), 0.5, deterministic=det)
        out = array_api.multi_scale_roi_align_forward([xc, xc[..., ::2, ::2]], rc, 2, [0.5, 0.25], mapping="mmdet",
                                                      finest_scale=2)
        array_api.multi_scale_roi_align_backward(out, rc, [xc.shape, xc[..., ::2, ::2].shape], 2, [0.5, 0.25],
                                                 mapping="mmdet", finest_scale=2, deterministic=det)
    cupy.cuda.Device().synchronize()


if __name__ == "__main__":
    main()
