"""Argument rules shared by the two front ends (torch ops and the array API):
sizes, channel counts, shape checks, layouts, launch shapes, and each kernel's
argument list, from plain integers. Nothing here touches an array, so the two
front ends cannot drift apart and neither pays for the other's objects.

A *view* is ``(device pointer, strides in elements)`` of an ``(N, C, H, W)``
array (or ``(K, C, ph, pw)`` for outputs).
"""
from . import _kernels


def output_size_pair(output_size):
    if isinstance(output_size, int):
        ph = pw = output_size
    else:
        try:
            ph, pw = (int(v) for v in output_size)
        except (TypeError, ValueError):
            try:  # NumPy and other integer scalars
                ph = pw = int(output_size.__index__())
            except (AttributeError, TypeError):
                raise ValueError(f"output_size must be an int or a pair (ph, pw), got {output_size!r}") from None
    if ph <= 0 or pw <= 0:
        raise ValueError(f"output_size must be positive, got {(ph, pw)}")
    return ph, pw


def channels_out(channels, output_size, position_sensitive):
    if not position_sensitive:
        return channels
    ph, pw = output_size
    if channels % (ph * pw):
        raise ValueError(f"input: position-sensitive pooling needs channels divisible by "
                         f"ph * pw = {ph * pw}, got {channels} channels")
    return channels // (ph * pw)


def check_shape4(shape, name="input"):
    if len(shape) != 4:
        raise ValueError(f"{name} must be 4-d (N, C, H, W), got shape {tuple(shape)}")
    if shape[2] <= 0 or shape[3] <= 0:
        raise ValueError(f"{name} must have a non-empty spatial size, got shape {tuple(shape)}")


def channels_fastest(strides, shape):
    """Iterate channels fastest when the channel stride is the smallest one:
    consecutive threads then touch consecutive addresses of a channels-last map."""
    s1, s2, s3 = abs(strides[1]), abs(strides[2]), abs(strides[3])
    return shape[1] > 1 and s1 <= s2 and s1 <= s3


# ---------------------------------------------------------------------------
# launches: (device, stream handle, scalar type name, position-sensitive) first,
# then the op's sizes and views, in the order of the kernel's parameters.
# Backward kernels walk the bins in the order of the gradient buffer's layout:
# their atomics, not their reads, decide how well memory accesses coalesce.

def _run(family, kernel, device, stream, scalar, ps, total, args, blocks=None):
    if total == 0:
        return
    fn = _kernels.get_function(family, kernel, scalar, ps, device)
    _kernels.launch(fn, blocks or _kernels.blocks_for(total), stream, args)


def roi_align_forward(device, stream, scalar, ps, x, shape, rows, k, size, scale, sampling_ratio, aligned, out):
    n, c, h, w = shape
    ph, pw = size
    c_out = c // (ph * pw) if ps else c
    _run("roi_align", "roi_align_forward", device, stream, scalar, ps, k * c_out * ph * pw, (
        x[0], n, h, w, *x[1], rows, k, c_out, ph, pw, scale, sampling_ratio, aligned,
        channels_fastest(x[1], shape), out[0], *out[1]))


def roi_align_backward(device, stream, scalar, ps, grad, size_in, rows, k, size, scale, sampling_ratio, aligned,
                       grad_input):
    n, c, h, w = size_in
    ph, pw = size
    c_out = c // (ph * pw) if ps else c
    _run("roi_align", "roi_align_backward", device, stream, scalar, ps, k * c_out * ph * pw, (
        grad[0], *grad[1], rows, k, c_out, ph, pw, scale, sampling_ratio, aligned,
        channels_fastest(grad_input[1], size_in), grad_input[0], n, h, w, *grad_input[1]))


def roi_pool_forward(device, stream, scalar, ps, x, shape, rows, k, size, scale, out, argmax):
    """``argmax``: pointer to a contiguous int32 ``(K, C, ph, pw)`` (0 for PSRoIPool)."""
    n, c, h, w = shape
    ph, pw = size
    c_out = c // (ph * pw) if ps else c
    _run("roi_pool", "roi_pool_forward", device, stream, scalar, ps, k * c_out * ph * pw, (
        x[0], n, h, w, *x[1], rows, k, c_out, ph, pw, scale, channels_fastest(x[1], shape),
        out[0], *out[1], argmax))


def roi_pool_backward(device, stream, scalar, ps, grad, size_in, rows, k, size, scale, argmax, grad_input):
    n, c, h, w = size_in
    ph, pw = size
    c_out = c // (ph * pw) if ps else c
    _run("roi_pool", "roi_pool_backward", device, stream, scalar, ps, k * c_out * ph * pw, (
        grad[0], *grad[1], rows, k, c_out, ph, pw, scale, channels_fastest(grad_input[1], size_in),
        argmax, grad_input[0], n, h, w, *grad_input[1]))


def prroi_pool_forward(device, stream, scalar, ps, x, shape, rows, k, size, scale, out):
    n, c, h, w = shape
    ph, pw = size
    c_out = c // (ph * pw) if ps else c
    _run("prroi_pool", "prroi_pool_forward", device, stream, scalar, ps, k * c_out * ph * pw, (
        x[0], n, h, w, *x[1], rows, k, c_out, ph, pw, scale, channels_fastest(x[1], shape), out[0], *out[1]))


def prroi_backward_grid(k, per_roi, target_blocks=4096):
    """Blocks per RoI (chunks) so that the grid fills the GPU while each block's
    coordinate-gradient reduction still covers many output elements."""
    max_chunks = max(1, -(-per_roi // _kernels.BLOCK))
    chunks = min(max_chunks, max(1, -(-target_blocks // max(k, 1))))
    return chunks, max(1, min(k * chunks, 1 << 22))


def prroi_pool_backward(device, stream, scalar, ps, grad, x, shape, rows, k, size, scale, grad_input, grad_rows):
    """``grad_rows``: pointer to a zero-filled ``[K, 5]`` accumulation buffer, or
    0 for no coordinate gradients."""
    n, c, h, w = shape
    ph, pw = size
    c_out = c // (ph * pw) if ps else c
    chunks, blocks = prroi_backward_grid(k, c_out * ph * pw)
    _run("prroi_pool", "prroi_pool_backward", device, stream, scalar, ps, k * c_out * ph * pw, (
        grad[0], *grad[1], x[0], *x[1], rows, k, c_out, ph, pw, scale, channels_fastest(x[1], shape), chunks,
        int(grad_rows != 0), grad_input[0], n, h, w, *grad_input[1], grad_rows), blocks=blocks)
