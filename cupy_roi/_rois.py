"""RoI argument handling for every operator and every array kind (torch, NumPy, CuPy).

One place for: accepting ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` or a
list of ``[L_i, 4]`` boxes (image ``i``), converting them once to the
accumulation dtype, and checking them (shape, dtype, device, batch index range,
finiteness).

The value check needs the rows' values on the host. On the CPU that is free
and always done. On the GPU it would cost a device-to-host copy that waits for
all queued work, so it is opt-in there: :func:`roi_checks` (per thread) or the
environment variable ``CUPY_ROI_CHECK_ROIS=1`` (read at import: the default for every
thread);
it is skipped while a CUDA graph is being captured. Unchecked, the kernels
never read out of bounds for an invalid row: its outputs become NaN and its
gradients zero. Boxes given as a list get their batch index from their place
in the list, so on the GPU they are never checked.
"""
import contextlib
import os
import threading

import numpy as np

ENV_VAR = "CUPY_ROI_CHECK_ROIS"
_state = threading.local()


_DEFAULT = os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")  # read once, at import


def roi_checks_enabled():
    """Whether GPU calls in this thread check RoI values (and so synchronize)."""
    enabled = getattr(_state, "enabled", None)
    return _DEFAULT if enabled is None else enabled


def wants_value_check(rois, on_gpu):
    """Whether a call checks its RoI values: always on the CPU; on the GPU when
    turned on, and never for a list of boxes (batch indices come from the list)."""
    return not on_gpu or (roi_checks_enabled() and not isinstance(rois, (list, tuple)))


@contextlib.contextmanager
def roi_checks(enabled=True):
    """Context manager turning the GPU RoI value check on (or off) in this thread.

    >>> with cupy_roi.roi_checks(True):   # ValueError for a bad row; one sync per call
    ...     out = cupy_roi.ps_roi_align(x, rois, 7)
    """
    previous = getattr(_state, "enabled", None)
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = previous


def _kind(x):
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith("cupy"):
        return "cupy"
    return None


def _is_floating(x):
    if _kind(x) == "torch":
        return x.is_floating_point()
    return x.dtype.kind == "f" or str(x.dtype) == "bfloat16"


def _device(x):
    kind = _kind(x)
    if kind == "torch":
        return x.device
    if kind == "cupy":
        return ("cuda", x.device.id)
    return "cpu"


def accumulation_dtype_name(dtype_name):
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return "float64" if dtype_name == "float64" else "float32"


def roi_rows(rois, input, n_images, acc_dtype_name, columns=5):
    """``rois`` as a contiguous ``[K, columns]`` array of the accumulation dtype
    (5: axis-aligned boxes, 6: rotated ones), of the same kind and on the same
    device as ``input``. A list holds each image's ``[L, columns - 1]`` boxes.
    Raises TypeError/ValueError naming ``rois`` for anything else."""
    in_kind, in_device = _kind(input), _device(input)

    def check_piece(piece, what, width):
        if _kind(piece) != in_kind:
            raise TypeError(f"{what} must be a {in_kind} array like input, got {type(piece).__name__}")
        if _device(piece) != in_device:
            raise ValueError(f"{what} must be on the same device as input ({in_device}), "
                             f"got {_device(piece)}")
        if not _is_floating(piece):
            raise TypeError(f"{what} must have a floating dtype, got {piece.dtype}")
        if piece.ndim != 2 or piece.shape[1] != width:
            raise ValueError(f"{what} must have shape [K, {width}], got {tuple(piece.shape)}")

    if isinstance(rois, (list, tuple)):
        if len(rois) != n_images:
            raise ValueError(f"rois given as a list must hold one [L, {columns - 1}] box tensor per image: "
                             f"input has {n_images} images, rois has {len(rois)} entries")
        for i, boxes in enumerate(rois):
            check_piece(boxes, f"rois[{i}]", columns - 1)
        return _concat_boxes(rois, in_kind, acc_dtype_name, input, columns)
    check_piece(rois, "rois", columns)
    return _convert(rois, in_kind, acc_dtype_name)


def _convert(a, kind, dtype_name):
    if kind == "torch":
        import torch
        return a.to(dtype=getattr(torch, dtype_name), memory_format=torch.contiguous_format).contiguous()
    xp = _xp(kind)
    return xp.ascontiguousarray(a.astype(dtype_name, copy=False))


def _xp(kind):
    if kind == "cupy":
        import cupy
        return cupy
    return np


def _concat_boxes(boxes, kind, dtype_name, like, columns):
    if kind == "torch":
        return _concat_torch_boxes(boxes, dtype_name, like, columns)
    xp = _xp(kind)
    parts = [xp.concatenate([xp.full((b.shape[0], 1), float(i), dtype=dtype_name),
                             b.astype(dtype_name)], axis=1) for i, b in enumerate(boxes)]
    if not parts:
        return xp.empty((0, columns), dtype=dtype_name)
    return xp.ascontiguousarray(xp.concatenate(parts, axis=0))


def _concat_torch_boxes(boxes, dtype_name, like, columns):
    """The rows of a list of box tensors in a few tensor operations whatever
    the number of images (host time, not GPU time, is what a list's per-image
    operations cost): the boxes in one concatenation and one converting copy,
    the batch indices from one broadcast copy when every image has as many
    boxes (a detector's sampled proposals), else one fill per image.
    Differentiable w.r.t. the boxes (PrRoIPool's box gradients)."""
    import torch

    dtype = getattr(torch, dtype_name)
    counts = [b.shape[0] for b in boxes]
    total = sum(counts)
    if not total:  # no rows; the concatenation keeps empty boxes' autograd link
        flat = torch.cat(boxes, 0).to(dtype) if boxes else torch.empty((0, columns - 1), dtype=dtype,
                                                                        device=like.device)
        return torch.cat([flat[:, :1], flat], 1)
    rows = torch.empty((total, columns), dtype=dtype, device=like.device)
    rows[:, 1:] = torch.cat(boxes, 0)
    n, per_image = len(counts), counts[0]
    if counts.count(per_image) == n:
        rows[:, 0].view(n, per_image).copy_(torch.arange(n, dtype=dtype, device=like.device)[:, None]
                                            .expand(n, per_image))
    else:
        start = 0
        for i, count in enumerate(counts):
            if count:
                rows[start:start + count, 0].fill_(i)
            start += count
    return rows


def _bad_row_count(rows, n_images):
    """Number of rows with a batch index outside [0, n_images), a non-integral
    batch index, or a non-finite coordinate, as a 0-d array of the rows' kind."""
    kind = _kind(rows)
    if kind == "torch":
        import torch
        b = rows[:, 0]
        bad = (b < 0) | (b >= n_images) | (b != torch.floor(b)) | ~torch.isfinite(rows).all(dim=1)
        return bad.sum()
    if kind == "cupy" and rows.shape[1] == 5:
        return _cupy_bad_rows()(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4],
                                rows.dtype.type(n_images))
    xp = _xp(kind)
    b = rows[:, 0]
    bad = (b < 0) | (b >= n_images) | (b != xp.floor(b)) | ~xp.isfinite(rows).all(axis=1)
    return bad.sum()


_cupy_kernel = []


def _cupy_bad_rows():
    """One fused reduction kernel (created once; CuPy compiles it per device)."""
    if not _cupy_kernel:
        import cupy

        _cupy_kernel.append(cupy.ReductionKernel(
            "T batch, T x1, T y1, T x2, T y2, T n_images", "int32 bad",
            "(batch < 0 || batch >= n_images || batch != floor(batch) || !isfinite(x1) || "
            "!isfinite(y1) || !isfinite(x2) || !isfinite(y2)) ? 1 : 0",
            "a + b", "bad = a", "0", "cupy_roi_bad_rows"))
    return _cupy_kernel[0]


def check_roi_values(rows, n_images):
    """Raise ValueError if any row is invalid (one device-to-host copy on a
    GPU), unless a CUDA graph is being captured. Callers decide whether to
    check (see the module docstring)."""
    if rows.shape[0] == 0 or _capturing(rows):
        return
    bad = int(_bad_row_count(rows, n_images))
    if bad:
        row = "(batch_index, x1, y1, x2, y2)" if rows.shape[1] == 5 else "(batch_index, cx, cy, w, h, angle)"
        raise ValueError(
            f"rois: {bad} of {rows.shape[0]} rows are invalid: every row must be "
            f"{row} with an integral batch_index in [0, {n_images}) and finite coordinates")


def _capturing(rows):
    kind = _kind(rows)
    if kind == "torch" and rows.is_cuda:
        import torch
        return torch.cuda.is_current_stream_capturing()
    if kind == "cupy":
        import cupy
        return cupy.cuda.get_current_stream().is_capturing()
    return False
