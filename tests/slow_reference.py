"""Independent per-sample implementations in float64 NumPy loops, written from
DESIGN.md's formulas (not from the vectorized reference): the second oracle."""
import math

import numpy as np


def _bilinear(plane, y, x):
    h, w = plane.shape
    if y < -1 or y > h or x < -1 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * plane[y0, x0] + (1 - ly) * lx * plane[y0, x1]
            + ly * (1 - lx) * plane[y1, x0] + ly * lx * plane[y1, x1])


def _c_in(c, i, j, ph, pw, ps):
    return (c * ph + i) * pw + j if ps else c


def roi_align(x, rois, ph, pw, scale, sampling_ratio, aligned, ps):
    n, ch, h, w = x.shape
    c_out = ch // (ph * pw) if ps else ch
    out = np.zeros((len(rois), c_out, ph, pw))
    off = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois):
        sx, sy = x1 * scale - off, y1 * scale - off
        rw, rh = x2 * scale - off - sx, y2 * scale - off - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rh / ph), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rw / pw), 0)
        for c in range(c_out):
            for i in range(ph):
                for j in range(pw):
                    plane = x[int(b), _c_in(c, i, j, ph, pw, ps)]
                    s = 0.0
                    for iy in range(gh):
                        yy = sy + i * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            s += _bilinear(plane, yy, sx + j * bw + (ix + 0.5) * bw / gw)
                    out[k, c, i, j] = s / max(gh * gw, 1)
    return out


def _round(v):
    """Half away from zero, exactly (C's round; floor(v + 0.5) is not:
    0.49999999999999994 + 0.5 rounds to 1)."""
    whole = math.trunc(v)
    return whole + ((1 if v > 0 else -1) if abs(v - whole) >= 0.5 else 0)


def roi_pool(x, rois, ph, pw, scale, ps):
    n, ch, h, w = x.shape
    c_out = ch // (ph * pw) if ps else ch
    out = np.zeros((len(rois), c_out, ph, pw))
    for k, (b, x1, y1, x2, y2) in enumerate(rois):
        # PSRoIPool rounds in float32 (torchvision's roundf), RoIPool in float64
        rx1, ry1, rx2, ry2 = (_round(float(np.float32(v * scale)) if ps else v * scale)
                              for v in (x1, y1, x2, y2))
        extra = 0 if ps else 1
        rw, rh = max(rx2 - rx1 + extra, 1), max(ry2 - ry1 + extra, 1)
        lim_h, lim_w = (h - 1, w - 1) if ps else (h, w)
        for c in range(c_out):
            for i in range(ph):
                for j in range(pw):
                    h0 = min(max(math.floor(i * rh / ph) + ry1, 0), lim_h)
                    h1 = min(max(math.ceil((i + 1) * rh / ph) + ry1, 0), lim_h)
                    w0 = min(max(math.floor(j * rw / pw) + rx1, 0), lim_w)
                    w1 = min(max(math.ceil((j + 1) * rw / pw) + rx1, 0), lim_w)
                    if h1 <= h0 or w1 <= w0:
                        continue
                    patch = x[int(b), _c_in(c, i, j, ph, pw, ps), h0:h1, w0:w1]
                    out[k, c, i, j] = patch.mean() if ps else patch.max()
    return out


def _cell_integral(plane, hc, wc, y0, x0, y1, x1):
    """Integral of the bilinear surface over [y0, y1] x [x0, x1] inside the unit
    cell with top-left corner (hc, wc), zero padding: the original's per-cell form."""
    h, w = plane.shape

    def val(yy, xx):
        return plane[yy, xx] if 0 <= yy < h and 0 <= xx < w else 0.0

    a, bb, la, lb = x0 - wc, y0 - hc, x1 - wc, y1 - hc
    ix_lo = (la - 0.5 * la * la) - (a - 0.5 * a * a)   # integral of (1 - u)
    ix_hi = 0.5 * la * la - 0.5 * a * a                 # integral of u
    iy_lo = (lb - 0.5 * lb * lb) - (bb - 0.5 * bb * bb)
    iy_hi = 0.5 * lb * lb - 0.5 * bb * bb
    return (val(hc, wc) * ix_lo * iy_lo + val(hc, wc + 1) * ix_hi * iy_lo
            + val(hc + 1, wc) * ix_lo * iy_hi + val(hc + 1, wc + 1) * ix_hi * iy_hi)


def prroi_pool(x, rois, ph, pw, scale, ps):
    n, ch, h, w = x.shape
    c_out = ch // (ph * pw) if ps else ch
    out = np.zeros((len(rois), c_out, ph, pw))
    for k, (b, x1, y1, x2, y2) in enumerate(rois):
        bw = max(x2 * scale - x1 * scale, 0.0) / pw
        bh = max(y2 * scale - y1 * scale, 0.0) / ph
        if bw * bh <= 0:
            continue
        for c in range(c_out):
            for i in range(ph):
                for j in range(pw):
                    plane = x[int(b), _c_in(c, i, j, ph, pw, ps)]
                    ys, xs = y1 * scale + i * bh, x1 * scale + j * bw
                    ye, xe = ys + bh, xs + bw
                    s = 0.0
                    for hc in range(math.floor(ys), math.ceil(ye)):
                        for wc in range(math.floor(xs), math.ceil(xe)):
                            s += _cell_integral(plane, hc, wc, max(ys, hc), max(xs, wc),
                                                min(ye, hc + 1), min(xe, wc + 1))
                    out[k, c, i, j] = s / (bw * bh)
    return out


def roi_align_rotated(x, rois, ph, pw, scale, sampling_ratio, aligned, clockwise, degrees=False):
    """Rotated RoIAlign from its definition: each bin's samples laid on the
    box's own (height, width) axes around its centre, turned by the angle
    counter-clockwise on the image (y down: the box's width axis points to
    (cos a, -sin a) in (x, y)) unless ``clockwise``. ``degrees``: angles as
    detectron2 gives them."""
    n, ch, h, w = x.shape
    out = np.zeros((len(rois), ch, ph, pw))
    off = 0.5 if aligned else 0.0
    for k, (b, cx, cy, bw_, bh_, angle) in enumerate(rois):
        a = math.radians(angle) if degrees else angle
        a = -a if clockwise else a
        rw, rh = bw_ * scale, bh_ * scale
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        ccx, ccy = cx * scale - off, cy * scale - off
        width_axis = (math.cos(a), -math.sin(a))   # (dx, dy) of one unit along the box's width
        height_axis = (math.sin(a), math.cos(a))   # perpendicular, "down" the box
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rh / ph), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rw / pw), 0)
        for i in range(ph):
            for j in range(pw):
                pts = []
                for iy in range(gh):
                    v = -rh / 2 + (i + (iy + 0.5) / gh) * rh / ph
                    for ix in range(gw):
                        u = -rw / 2 + (j + (ix + 0.5) / gw) * rw / pw
                        pts.append((ccy + u * width_axis[1] + v * height_axis[1],
                                    ccx + u * width_axis[0] + v * height_axis[0]))
                for c in range(ch):
                    plane = x[int(b), c]
                    s = sum(_bilinear(plane, py, px) for py, px in pts)
                    out[k, c, i, j] = s / max(gh * gw, 1)
    return out
