"""Reference path in pure PyTorch: the CPU implementation and the GPU tests' oracle.

Vectorized and differentiable by autograd (w.r.t. the features, and for
PrRoIPool w.r.t. the box coordinates too). Computes in the accumulation dtype
(float32 for half types, float64 for float64), like the kernels.

RoIAlign, PSRoIPool and PrRoIPool are separable: each output is
``sum_{h,w} F[b, c_in, h, w] * Wy[k, i, h] * Wx[k, j, w]``, with per-RoI weight
matrices built from the same 1-d rules the kernels apply. RoIPool takes a max
and is computed bin by bin.
"""

import torch

from ._rois import accumulation_dtype_name


def _acc_dtype(dtype):
    return getattr(torch, accumulation_dtype_name(str(dtype).replace("torch.", "")))


def _per_image(input, rows, compute):
    """Stack ``compute(features_of_image, row_indices)`` over the images."""
    batch = rows[:, 0].long()
    parts, index = [], []
    for n in range(input.shape[0]):
        idx = (batch == n).nonzero().squeeze(1)
        if idx.numel():
            parts.append(compute(input[n], idx))
            index.append(idx)
    return parts, index


def _gather_back(parts, index, shape, like):
    if not parts and 0 in shape:  # K == 0: stay connected to the graph for zero gradients
        return like.reshape(-1)[:0].reshape(shape)
    out = like.new_zeros(shape)
    for part, idx in zip(parts, index):
        out = out.index_copy(0, idx, part)
    return out


def _separable(input, rows, wy, wx, position_sensitive):
    """out[k, c, i, j] = sum_{h,w} F[b_k, c_in(c, i, j), h, w] wy[k, i, h] wx[k, j, w]."""
    n, c, h, w = input.shape
    ph, pw = wy.shape[1], wx.shape[1]
    c_out = c // (ph * pw) if position_sensitive else c

    def compute(features, idx):
        if position_sensitive:
            f = features.reshape(c_out, ph, pw, h, w)
            t = torch.einsum("cijhw,kjw->kcijh", f, wx[idx])
            return torch.einsum("kcijh,kih->kcij", t, wy[idx])
        t = torch.einsum("chw,kjw->kchj", features, wx[idx])
        return torch.einsum("kchj,kih->kcij", t, wy[idx])

    parts, index = _per_image(input, rows, compute)
    return _gather_back(parts, index, (rows.shape[0], c_out, ph, pw), input)


def _bilinear_rows(coords, valid, size):
    """Weights [..., size] of torchvision's 1-d interpolation at ``coords``."""
    c = coords.clamp(min=0)
    low = c.floor()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    c = torch.where(at_edge, low, c)
    high = torch.where(at_edge, low, low + 1)
    frac = c - low
    weights = coords.new_zeros(coords.shape + (size,))
    v = valid.to(coords.dtype)
    weights.scatter_add_(-1, low.long().unsqueeze(-1), ((1 - frac) * v).unsqueeze(-1))
    weights.scatter_add_(-1, high.long().clamp(max=size - 1).unsqueeze(-1), (frac * v).unsqueeze(-1))
    return weights


def _align_axis(start, extent, bins, size, sampling_ratio):
    """RoIAlign weights [K, bins, size] along one axis (mean over samples folded in)."""
    bin_size = extent / bins
    if sampling_ratio > 0:
        grid = torch.full_like(extent, float(sampling_ratio))
    else:
        grid = torch.ceil(extent / bins).clamp(min=0)
    g_max = max(int(grid.max().item()) if grid.numel() else 1, 1)
    i = torch.arange(bins, dtype=extent.dtype, device=extent.device).view(1, bins, 1)
    s = torch.arange(g_max, dtype=extent.dtype, device=extent.device).view(1, 1, g_max)
    grid_ = grid.view(-1, 1, 1)
    coords = start.view(-1, 1, 1) + i * bin_size.view(-1, 1, 1) + (s + 0.5) * bin_size.view(-1, 1, 1) / grid_
    valid = (s < grid_) & (coords >= -1) & (coords <= size)
    coords = torch.where(valid, coords, torch.zeros_like(coords))
    weights = _bilinear_rows(coords, valid, size).sum(dim=2)
    return weights / grid.clamp(min=1).view(-1, 1, 1)


def roi_align(input, rows, output_size, spatial_scale, sampling_ratio, aligned, position_sensitive):
    ph, pw = output_size
    x = input.to(_acc_dtype(input.dtype))
    r = rows.to(x.dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (r[:, i] * spatial_scale - offset for i in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    wy = _align_axis(y1, roi_h, ph, x.shape[2], sampling_ratio)
    wx = _align_axis(x1, roi_w, pw, x.shape[3], sampling_ratio)
    return _separable(x, r, wy, wx, position_sensitive).to(input.dtype)


def _round_half_away(v):
    # exact: floor(|v| + 0.5) rounds 0.49999997 up, since the sum rounds to 1
    whole = torch.trunc(v)
    return whole + torch.sign(v) * ((v - whole).abs() >= 0.5).to(v.dtype)


def _pool_bins(r, spatial_scale, ph, pw, height, width, position_sensitive):
    """Integer bin bounds [K, bins] per axis, as the roi_pool kernels compute them."""
    # PSRoIPool rounds in float32 whatever the dtype, as torchvision's roundf does
    round_dtype = torch.float32 if position_sensitive else r.dtype
    rx1, ry1, rx2, ry2 = (_round_half_away((r[:, i] * spatial_scale).to(round_dtype)).to(r.dtype)
                          for i in range(1, 5))
    extra = 0.0 if position_sensitive else 1.0
    roi_w = (rx2 - rx1 + extra).clamp(min=1)
    roi_h = (ry2 - ry1 + extra).clamp(min=1)
    lim_h = height - 1 if position_sensitive else height
    lim_w = width - 1 if position_sensitive else width

    def axis(start, extent, bins, lim):
        k = torch.arange(bins, dtype=r.dtype, device=r.device).view(1, -1)
        b = (extent / bins).view(-1, 1)
        lo = (torch.floor(k * b) + start.view(-1, 1)).clamp(0, lim)
        hi = (torch.ceil((k + 1) * b) + start.view(-1, 1)).clamp(0, lim)
        return lo, hi

    return axis(ry1, roi_h, ph, lim_h), axis(rx1, roi_w, pw, lim_w)


def _membership(lo, hi, size):
    pos = torch.arange(size, dtype=lo.dtype, device=lo.device)
    return (pos >= lo.unsqueeze(-1)) & (pos < hi.unsqueeze(-1))


def roi_pool(input, rows, output_size, spatial_scale, position_sensitive, return_argmax=False):
    """RoIPool (max; with ``return_argmax`` also the ``h * W + w`` of each
    maximum, -1 for an empty bin) or PSRoIPool (mean)."""
    ph, pw = output_size
    x = input.to(_acc_dtype(input.dtype))
    r = rows.to(x.dtype)
    h, w = x.shape[2], x.shape[3]
    (y_lo, y_hi), (x_lo, x_hi) = _pool_bins(r, spatial_scale, ph, pw, h, w, position_sensitive)
    my, mx = _membership(y_lo, y_hi, h), _membership(x_lo, x_hi, w)
    if position_sensitive:
        wy = my.to(x.dtype) / (y_hi - y_lo).clamp(min=1).unsqueeze(-1)
        wx = mx.to(x.dtype) / (x_hi - x_lo).clamp(min=1).unsqueeze(-1)
        return _separable(x, r, wy, wx, True).to(input.dtype)

    def compute(features, idx):
        c = features.shape[0]
        flat = features.reshape(1, c, h * w)
        rows_out = []
        for i in range(ph):
            cols = []
            for j in range(pw):
                mask = (my[idx, i, :, None] & mx[idx, j, None, :]).reshape(-1, 1, h * w)
                vals = flat.masked_fill(~mask, float("-inf"))
                best, at = vals.max(dim=2)  # first maximum, like the kernel
                nonempty = mask.any(dim=2)
                best = torch.where(nonempty, best, torch.zeros_like(best))
                cols.append(torch.stack([best, torch.where(nonempty, at, -1).to(best.dtype)]))
            rows_out.append(torch.stack(cols, dim=-1))
        return torch.stack(rows_out, dim=-2)

    parts, index = _per_image(x, r, compute)
    shape = (r.shape[0], x.shape[1], ph, pw)
    out = _gather_back([p[0] for p in parts], index, shape, x).to(input.dtype)
    if not return_argmax:
        return out
    argmax = _gather_back([p[1].detach() for p in parts], index, shape, x.detach())
    return out, argmax.long()


def _tent_cdf(t):
    """integral_{-inf}^{t} max(0, 1 - |u|) du."""
    t = t.clamp(-1, 1)
    return torch.where(t <= 0, 0.5 * (t + 1) ** 2, 1 - 0.5 * (1 - t) ** 2)


def _precise_axis(start, extent, bins, size):
    """Exact integrals [K, bins, size] of each grid point's tent over each bin."""
    bin_size = extent.clamp(min=0) / bins
    k = torch.arange(bins, dtype=start.dtype, device=start.device).view(1, -1, 1)
    lo = start.view(-1, 1, 1) + k * bin_size.view(-1, 1, 1)
    hi = lo + bin_size.view(-1, 1, 1)
    pos = torch.arange(size, dtype=start.dtype, device=start.device).view(1, 1, -1)
    return _tent_cdf(hi - pos) - _tent_cdf(lo - pos), bin_size


def prroi_pool(input, rows, output_size, spatial_scale, position_sensitive):
    ph, pw = output_size
    x = input.to(_acc_dtype(input.dtype))
    r = rows.to(x.dtype)
    x1, y1, x2, y2 = (r[:, i] * spatial_scale for i in range(1, 5))
    wy, bin_h = _precise_axis(y1, y2 - y1, ph, x.shape[2])
    wx, bin_w = _precise_axis(x1, x2 - x1, pw, x.shape[3])
    area = (bin_h * bin_w).view(-1, 1, 1, 1)
    has_area = area > 0
    integral = _separable(x, r, wy, wx, position_sensitive)
    out = torch.where(has_area, integral / torch.where(has_area, area, torch.ones_like(area)),
                      torch.zeros_like(integral))
    return out.to(input.dtype)




def _bilinear_gather(features, y, x, valid):
    """torchvision's bilinear interpolation of ``features`` [C, H, W] at points
    ``y``, ``x`` (any shape S), zero where ``valid`` is false or a point lies
    beyond one pixel outside the map: [C, *S]."""
    c, h, w = features.shape
    inside = valid & (y >= -1) & (y <= h) & (x >= -1) & (x <= w)
    y = torch.where(inside, y.clamp(min=0), torch.zeros_like(y))
    x = torch.where(inside, x.clamp(min=0), torch.zeros_like(x))
    y0, x0 = y.floor().clamp(max=h - 1), x.floor().clamp(max=w - 1)
    y = torch.where(y0 >= h - 1, y0, y)
    x = torch.where(x0 >= w - 1, x0, x)
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    ly, lx = y - y0, x - x0
    flat = features.reshape(c, h * w)
    total = 0
    for yi, wy in ((y0, 1 - ly), (y1, ly)):
        for xi, wx in ((x0, 1 - lx), (x1, lx)):
            at = (yi * w + xi).long().reshape(-1)
            total = total + flat[:, at].reshape((c,) + y.shape) * (wy * wx * inside)
    return total


def roi_align_rotated(input, rows, output_size, spatial_scale, sampling_ratio, aligned, clockwise):
    """Rotated RoIAlign (mmcv semantics); ``rows`` [K, 6] are
    ``(batch_index, cx, cy, w, h, theta)``, theta in radians."""
    ph, pw = output_size
    x = input.to(_acc_dtype(input.dtype))
    r = rows.to(x.dtype)
    offset = 0.5 if aligned else 0.0
    cx, cy = r[:, 1] * spatial_scale - offset, r[:, 2] * spatial_scale - offset
    roi_w, roi_h = r[:, 3] * spatial_scale, r[:, 4] * spatial_scale
    theta = -r[:, 5] if clockwise else r[:, 5]
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)

    def axis(extent, bins):  # sample offsets from the centre [K, bins, G] and their validity
        size = extent / bins
        grid = (torch.full_like(extent, float(sampling_ratio)) if sampling_ratio > 0
                else torch.ceil(extent / bins).clamp(min=0))
        g_max = max(int(grid.max().item()) if grid.numel() else 1, 1)
        i = torch.arange(bins, dtype=x.dtype).view(1, bins, 1)
        s = torch.arange(g_max, dtype=x.dtype).view(1, 1, g_max)
        k = (-1, 1, 1)
        at = -extent.view(k) / 2 + i * size.view(k) + (s + 0.5) * size.view(k) / grid.view(k)
        return at, s < grid.view(k), grid

    yy, vy, gy = axis(roi_h, ph)
    xx, vx, gx = axis(roi_w, pw)
    cos, sin = torch.cos(theta).view(-1, 1, 1, 1, 1), torch.sin(theta).view(-1, 1, 1, 1, 1)
    yy, xx = yy[:, :, None, :, None], xx[:, None, :, None, :]  # [K, ph, pw, Gy, Gx]
    y = yy * cos - xx * sin + cy.view(-1, 1, 1, 1, 1)
    xs = yy * sin + xx * cos + cx.view(-1, 1, 1, 1, 1)
    valid = vy[:, :, None, :, None] & vx[:, None, :, None, :]
    count = (gy * gx).clamp(min=1).view(-1, 1, 1, 1)

    def compute(features, idx):
        vals = _bilinear_gather(features, y[idx], xs[idx], valid[idx])  # [C, k, ph, pw, Gy, Gx]
        return vals.sum(dim=(-2, -1)).transpose(0, 1) / count[idx]

    parts, index = _per_image(x, r, compute)
    return _gather_back(parts, index, (r.shape[0], x.shape[1], ph, pw), x).to(input.dtype)


def pyramid_levels(rows, mode, s0, lvl0, lo, hi):
    """Level index of each row [K] (int64; -1 where the level is NaN), by the
    tensor operations of torchvision's LevelMapper (mode 1) or mmdetection's
    mapping (mode 2), in the rows' dtype; mode 0: every row on level 0."""
    if mode == 0:
        return torch.zeros(rows.shape[0], dtype=torch.int64, device=rows.device)
    s = torch.sqrt((rows[:, 3] - rows[:, 1]) * (rows[:, 4] - rows[:, 2]))
    if mode == 1:
        t = torch.floor(lvl0 + torch.log2(s / s0) + torch.tensor(1e-6, dtype=s.dtype))
    else:
        t = torch.floor(torch.log2(s / s0 + 1e-6))
    level = torch.clamp(t, min=lo, max=hi).to(torch.int64) - lo
    return torch.where(torch.isnan(t), torch.full_like(level, -1), level)


def multi_scale_roi_align(features, rows, output_size, spatial_scales, sampling_ratio, aligned, mapping):
    """Multi-level RoIAlign: each row pooled from the level ``mapping``
    (:func:`cupy_roi._rules.level_mapping`'s tuple) gives it; rows without a
    level stay zero."""
    ph, pw = output_size
    acc = _acc_dtype(features[0].dtype)
    r = rows.to(acc)
    levels = pyramid_levels(r, *mapping)
    out = features[0].new_zeros((r.shape[0], features[0].shape[1], ph, pw), dtype=acc)
    for level, (f, scale) in enumerate(zip(features, spatial_scales)):
        idx = (levels == level).nonzero().squeeze(1)
        if idx.numel():
            part = roi_align(f, r[idx], output_size, scale, sampling_ratio, aligned, False)
            out = out.index_copy(0, idx, part.to(acc))
        else:  # stay connected: a level without boxes gets a zero gradient, not None
            out = out + f.reshape(-1)[:0].sum().to(acc)
    return out.to(features[0].dtype)
