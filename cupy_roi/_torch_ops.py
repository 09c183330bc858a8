"""Torch operators: CUDA tensors go to the array API (zero-copy CuPy views of
PyTorch-allocated memory, on PyTorch's current stream); CPU tensors, and CUDA
tensors under ``torch.use_deterministic_algorithms(True)``, go to the reference
path, whose autograd gives the backward.

The CUDA operators are registered with ``torch.library.custom_op`` (where this
PyTorch has it) so that ``torch.compile`` can trace them; older PyTorch gets
the same functions wrapped in a ``torch.autograd.Function``.
"""
import numpy as np
import torch

from . import _reference, _rois, array_api

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
                 torch.int32: np.int32, torch.bfloat16: np.uint16}
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------
# tensors to CuPy, without copies

def as_cupy(t):
    """Zero-copy CuPy view of a CUDA tensor (bfloat16 as uint16 bits)."""
    import cupy

    dtype = _NUMPY_DTYPES[t.dtype]
    if t.numel() == 0:
        with cupy.cuda.Device(t.device.index):
            return cupy.empty(tuple(t.shape), dtype)
    item = t.element_size()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    mem = cupy.cuda.UnownedMemory(t.data_ptr(), extent * item, t, t.device.index)
    return cupy.ndarray(tuple(t.shape), dtype, cupy.cuda.MemoryPointer(mem, 0),
                        strides=tuple(s * item for s in t.stride()))


def _scalar_type(t):
    return "bfloat16" if t.dtype == torch.bfloat16 else None


_streams = {}  # (device index, cudaStream_t) -> cupy.cuda.ExternalStream


def _stream(t):
    """CuPy's handle on PyTorch's current stream of ``t``'s device (cached: it
    only wraps the pointer, so a reused pointer still names the right stream)."""
    key = (t.device.index, torch.cuda.current_stream(t.device).cuda_stream)
    stream = _streams.get(key)
    if stream is None:
        import warnings

        import cupy

        with warnings.catch_warnings():  # CuPy 14 prefers Stream.from_external, absent from older CuPy
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = cupy.cuda.ExternalStream(key[1], key[0])
        stream = _streams.setdefault(key, stream)
    return stream


def _memory_format(like):
    """Outputs and gradients follow a channels-last input's layout."""
    if like.dim() == 4 and array_api._channels_fastest(like.stride(), like.shape):
        return torch.channels_last
    return torch.contiguous_format


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(shape, like, dtype=None):
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=_memory_format(like))


def _zeros(shape, like, dtype):
    return _empty(shape, like, dtype).zero_()


def _out_shape(input, rows, ph, pw, ps):
    c_out = input.shape[1] // (ph * pw) if ps else input.shape[1]
    return (rows.shape[0], c_out, ph, pw)


def _array_kwargs(t):
    return {"stream": _stream(t), "scalar_type": _scalar_type(t)}


def _backward_context():
    """Backward ops get the rows their forward already checked: no second check."""
    return _rois.roi_checks(False)


# ---------------------------------------------------------------------------
# CUDA implementations (real tensors in, PyTorch-allocated tensors out)

def _roi_align_fwd(input: torch.Tensor, rows: torch.Tensor, ph: int, pw: int, scale: float,
                   sampling_ratio: int, aligned: bool, ps: bool) -> torch.Tensor:
    out = _empty(_out_shape(input, rows, ph, pw, ps), input)
    with torch.cuda.device(input.device):
        array_api.roi_align_forward(as_cupy(input), as_cupy(rows), (ph, pw), scale, sampling_ratio, aligned, ps,
                                    out=as_cupy(out), **_array_kwargs(input))
    return out


def _roi_align_bwd(grad: torch.Tensor, rows: torch.Tensor, n: int, c: int, h: int, w: int, scale: float,
                   sampling_ratio: int, aligned: bool, ps: bool) -> torch.Tensor:
    grad_input = _zeros((n, c, h, w), grad, _acc(grad.dtype))
    with torch.cuda.device(grad.device), _backward_context():
        array_api.roi_align_backward(as_cupy(grad), as_cupy(rows), (n, c, h, w), tuple(grad.shape[2:]), scale,
                                     sampling_ratio, aligned, ps, grad_input=as_cupy(grad_input),
                                     **_array_kwargs(grad))
    return grad_input.to(grad.dtype)


def _roi_pool_fwd(input: torch.Tensor, rows: torch.Tensor, ph: int, pw: int, scale: float,
                  ps: bool) -> tuple[torch.Tensor, torch.Tensor]:
    shape = _out_shape(input, rows, ph, pw, ps)
    out = _empty(shape, input)
    argmax = torch.empty(shape if not ps else (0,), dtype=torch.int32, device=input.device)
    with torch.cuda.device(input.device):
        array_api.roi_pool_forward(as_cupy(input), as_cupy(rows), (ph, pw), scale, ps, out=as_cupy(out),
                                   argmax=None if ps else as_cupy(argmax), **_array_kwargs(input))
    return out, argmax


def _roi_pool_bwd(grad: torch.Tensor, rows: torch.Tensor, argmax: torch.Tensor, n: int, c: int, h: int,
                  w: int, scale: float, ps: bool) -> torch.Tensor:
    grad_input = _zeros((n, c, h, w), grad, _acc(grad.dtype))
    with torch.cuda.device(grad.device), _backward_context():
        array_api.roi_pool_backward(as_cupy(grad), as_cupy(rows), None if ps else as_cupy(argmax), (n, c, h, w),
                                    tuple(grad.shape[2:]), scale, ps, grad_input=as_cupy(grad_input),
                                    **_array_kwargs(grad))
    return grad_input.to(grad.dtype)


def _prroi_fwd(input: torch.Tensor, rows: torch.Tensor, ph: int, pw: int, scale: float,
               ps: bool) -> torch.Tensor:
    out = _empty(_out_shape(input, rows, ph, pw, ps), input)
    with torch.cuda.device(input.device):
        array_api.prroi_pool_forward(as_cupy(input), as_cupy(rows), (ph, pw), scale, ps, out=as_cupy(out),
                                     **_array_kwargs(input))
    return out


def _prroi_bwd(grad: torch.Tensor, input: torch.Tensor, rows: torch.Tensor, scale: float, ps: bool,
               rois_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    grad_input = _zeros(tuple(input.shape), input, _acc(input.dtype))
    grad_rows = torch.zeros((rows.shape[0], 5), dtype=rows.dtype, device=rows.device)
    with torch.cuda.device(grad.device), _backward_context():
        array_api.prroi_pool_backward(as_cupy(grad), as_cupy(input), as_cupy(rows), tuple(grad.shape[2:]), scale,
                                      ps, rois_grad=rois_grad, grad_input=as_cupy(grad_input),
                                      grad_rois=as_cupy(grad_rows) if rois_grad else None,
                                      **_array_kwargs(input))
    return grad_input.to(input.dtype), grad_rows


# ---------------------------------------------------------------------------
# registration: custom ops with autograd, or autograd.Function on old PyTorch

def _define(name, impl, fake):
    if hasattr(torch.library, "custom_op"):
        op = torch.library.custom_op(f"cupy_roi::{name}", impl, mutates_args=())
        op.register_fake(fake)
        return op
    return impl


def _with_autograd(op, setup_context, backward):
    if hasattr(op, "register_autograd"):
        op.register_autograd(backward, setup_context=setup_context)
        return op

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = op(*args)
            setup_context(ctx, args, out)
            if isinstance(out, tuple):
                ctx.mark_non_differentiable(*out[1:])
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return Function.apply


def _fake_roi_align_fwd(input, rows, ph, pw, scale, sampling_ratio, aligned, ps):
    return _empty(_out_shape(input, rows, ph, pw, ps), input)


def _fake_roi_align_bwd(grad, rows, n, c, h, w, scale, sampling_ratio, aligned, ps):
    return _empty((n, c, h, w), grad)


def _fake_roi_pool_fwd(input, rows, ph, pw, scale, ps):
    shape = _out_shape(input, rows, ph, pw, ps)
    return _empty(shape, input), torch.empty(shape if not ps else (0,), dtype=torch.int32, device=input.device)


def _fake_roi_pool_bwd(grad, rows, argmax, n, c, h, w, scale, ps):
    return _empty((n, c, h, w), grad)


def _fake_prroi_fwd(input, rows, ph, pw, scale, ps):
    return _empty(_out_shape(input, rows, ph, pw, ps), input)


def _fake_prroi_bwd(grad, input, rows, scale, ps, rois_grad):
    return torch.empty_like(input), torch.empty_like(rows)


roi_align_bwd = _define("roi_align_backward", _roi_align_bwd, _fake_roi_align_bwd)
roi_pool_bwd = _define("roi_pool_backward", _roi_pool_bwd, _fake_roi_pool_bwd)
prroi_bwd = _define("prroi_pool_backward", _prroi_bwd, _fake_prroi_bwd)


def _setup_roi_align(ctx, inputs, output):
    input, rows, ph, pw, scale, sampling_ratio, aligned, ps = inputs
    ctx.save_for_backward(rows)
    ctx.args = (tuple(input.shape), scale, sampling_ratio, aligned, ps)


def _backward_roi_align(ctx, grad):
    (rows,) = ctx.saved_tensors
    shape, scale, sampling_ratio, aligned, ps = ctx.args
    return (roi_align_bwd(grad, rows, *shape, scale, sampling_ratio, aligned, ps),
            None, None, None, None, None, None, None)


def _setup_roi_pool(ctx, inputs, output):
    input, rows, ph, pw, scale, ps = inputs
    ctx.save_for_backward(rows, output[1])
    ctx.args = (tuple(input.shape), scale, ps)


def _backward_roi_pool(ctx, grad, _grad_argmax):
    rows, argmax = ctx.saved_tensors
    shape, scale, ps = ctx.args
    return roi_pool_bwd(grad, rows, argmax, *shape, scale, ps), None, None, None, None, None


def _setup_prroi(ctx, inputs, output):
    input, rows, ph, pw, scale, ps = inputs
    ctx.save_for_backward(input, rows)
    ctx.args = (scale, ps)


def _backward_prroi(ctx, grad):
    input, rows = ctx.saved_tensors
    scale, ps = ctx.args
    rois_grad = ctx.needs_input_grad[1]
    grad_input, grad_rows = prroi_bwd(grad, input, rows, scale, ps, rois_grad)
    return grad_input, (grad_rows if rois_grad else None), None, None, None, None


roi_align_fwd = _with_autograd(_define("roi_align_forward", _roi_align_fwd, _fake_roi_align_fwd),
                               _setup_roi_align, _backward_roi_align)
roi_pool_fwd = _with_autograd(_define("roi_pool_forward", _roi_pool_fwd, _fake_roi_pool_fwd),
                              _setup_roi_pool, _backward_roi_pool)
prroi_fwd = _with_autograd(_define("prroi_pool_forward", _prroi_fwd, _fake_prroi_fwd),
                           _setup_prroi, _backward_prroi)


# ---------------------------------------------------------------------------
# the entry every functional operator goes through

def prepare(input, rois, output_size, position_sensitive):
    """Validate the arguments; returns (rows [K, 5] in the accumulation dtype, (ph, pw))."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in FLOATING:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    array_api.check_shape4(tuple(input.shape))
    output_size = array_api.output_size_pair(output_size)
    array_api.channels_out(input.shape[1], output_size, position_sensitive)
    rows = _rois.roi_rows(rois, input, input.shape[0], "float64" if input.dtype == torch.float64 else "float32")
    return rows, output_size


def use_kernels(input):
    return input.is_cuda and not torch.are_deterministic_algorithms_enabled()


def reference(name, input, rows, *args):
    _rois.check_roi_values(rows, input.shape[0])
    return getattr(_reference, name)(input, rows, *args)
