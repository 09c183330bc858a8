"""Torch operators over the pointer-level launcher.

CUDA tensors go to the kernels as their device pointers and strides, on the
current stream of their device, with outputs allocated by PyTorch; no CuPy
array is made per tensor. CPU tensors take the reference path, whose autograd
gives the backward. The backward kernels run deterministic (fixed-point
integer atomics, see :func:`deterministic_backward`) when the call asked for
it or ``torch.use_deterministic_algorithms(True)`` is on.

Dispatch, per call:

* eager CUDA, some input needs a gradient: a plain ``torch.autograd.Function``;
* eager CUDA, no gradient needed: the forward implementation directly;
* eager CPU: the reference path, differentiated by autograd;
* while a graph is traced on any device (``torch.compile``, ``torch.export``,
  ``torch.jit.trace``, TorchScript): ``torch.library.custom_op`` operators
  (``torch.ops.cupy_roi.*``) with registered fake (meta) functions and
  autograd, implemented for CPU and CUDA, so a traced graph holds one opaque
  op per call whatever the device and no data-dependent guard leaks into it
  (the RoI value check runs inside the op, on real data);
* ONNX export: the ONNX operators of :mod:`cupy_roi._onnx`;
* FX symbolic tracing: the public functions record themselves as leaves.

Host cost (``benchmarks/overhead.py``, tiny inputs): raw pointers plus a
``struct``-packed ``cuLaunchKernel`` cost a few microseconds, where wrapping
each tensor in a CuPy array (or crossing through DLPack) and CuPy's
``RawKernel`` argument conversion cost about 50 and 65; the custom-op
dispatcher about 60, so eager calls skip it. ``benchmarks/NOTES.md`` has the
numbers before and after.
"""
from typing import List, Union

import torch

from . import _onnx, _reference, _rois, _rules

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SCALAR = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
           torch.float64: "float64"}

try:
    _raw_stream = torch._C._cuda_getCurrentRawStream
    _current_device = torch._C._cuda_getDevice
except AttributeError:  # older PyTorch: the public, slower spellings
    def _raw_stream(device_index):
        return torch.cuda.current_stream(device_index).cuda_stream

    def _current_device():
        return torch.cuda.current_device()

_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
_in_onnx_export = torch.onnx.is_in_onnx_export


def tracing():
    """Whether a graph is being traced (torch.compile, torch.export, jit.trace;
    ONNX export traces with one of them, so it counts too)."""
    return _is_compiling() or torch.jit.is_tracing()


def _first_proxy(args):
    """The first torch.fx Proxy among ``args`` (or inside a list of boxes), else None."""
    for a in args:
        for b in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(b, torch.fx.Proxy):
                return b
    return None


def fx_proxy(*args):
    """Whether torch.fx symbolic tracing is calling (some argument is a Proxy)."""
    return _first_proxy(args) is not None


def fx_leaf(fn, *args, **kwargs):
    """Record ``fn(*args, **kwargs)`` as one call_function node of the graph being traced."""
    return _first_proxy(args).tracer.create_proxy("call_function", fn, args, kwargs)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(t):
    """Outputs and gradients follow a channels-last input's layout."""
    if _rules.channels_fastest(t.stride(), t.shape):
        return torch.channels_last
    return torch.contiguous_format


def _layout_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _view(t):
    return t.data_ptr(), t.stride()


def _launch(rule, device, *args):
    """Run one of :mod:`_rules`' launches on ``device``'s current stream,
    making ``device`` current for the launch only when it is not already."""
    if _current_device() == device:
        rule(device, _raw_stream(device), *args)
    else:
        with torch.cuda.device(device):
            rule(device, _raw_stream(device), *args)


def _out_shape(input, rows, ph, pw, ps):
    c_out = input.shape[1] // (ph * pw) if ps else input.shape[1]
    return (rows.shape[0], c_out, ph, pw)


def _empty(shape, like):
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=_memory_format(like))


def _empty_grad_input(grad, shape, channels_last):
    return torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=_layout_format(channels_last))


def _zeros(shape, dtype, device, memory_format):
    if memory_format is torch.contiguous_format:  # one call instead of empty + zero_
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format).zero_()


def _accumulator(shape, like, memory_format):
    """Zero-filled gradient buffer in the accumulation dtype (the kernels add
    into it), laid out as the forward's input was: autograd copies a gradient
    whose strides differ from its input's, and the gradient arriving from
    ``.sum()`` has all-zero strides, which say nothing about a layout."""
    return _zeros(shape, _acc(like.dtype), like.device, memory_format)


def deterministic_backward(requested):
    """Whether a backward runs its deterministic kernels: asked for by the
    call (``deterministic=True``) or by ``torch.use_deterministic_algorithms``
    when the backward runs."""
    return bool(requested) or torch.are_deterministic_algorithms_enabled()


class _GradientBuffer:
    """What a backward kernel adds one gradient into, and how it becomes the
    gradient. Float atomics into an accumulation-dtype buffer; or, for the
    deterministic backward, int64 fixed point scaled by max|grad| (a 0-d
    tensor computed on the device: no synchronization), converted by a kernel
    afterwards. Empty gradients take the float path: nothing to add."""

    __slots__ = ("buffer", "max_grad", "memory_format")

    def __init__(self, shape, grad, memory_format, deterministic, max_grad=None):
        self.memory_format = memory_format
        if deterministic and grad.numel():
            self.buffer = _zeros(shape, torch.int64, grad.device, memory_format)
            # in grad's dtype (casting first would copy the whole gradient);
            # several buffers of one backward share it
            self.max_grad = torch.linalg.vector_norm(grad, float("inf")) if max_grad is None else max_grad
        else:
            self.buffer = _accumulator(shape, grad, memory_format)
            self.max_grad = None

    @property
    def max_grad_ptr(self):
        return 0 if self.max_grad is None else self.max_grad.data_ptr()

    def result(self, dtype, family, k, size, ps):
        """The gradient in ``dtype``; ``k``, ``size`` and ``ps`` are the backward's."""
        if self.max_grad is None:
            return _as_dtype(self.buffer, dtype)
        out = torch.empty(self.buffer.shape, dtype=dtype, device=self.buffer.device,
                          memory_format=self.memory_format)
        _launch(_rules.fixed_point_gradient, out.device.index, _SCALAR[dtype], family, self.buffer.data_ptr(),
                self.max_grad.data_ptr(), k, size, ps, tuple(out.shape), _view(out), False)
        return out


def _as_dtype(t, dtype):
    """The accumulated gradient in the caller's dtype (no call when it already is)."""
    return t if t.dtype == dtype else t.to(dtype)


# ---------------------------------------------------------------------------
# CUDA implementations: real tensors in, PyTorch-allocated tensors out

def roi_align_forward_cuda(input: torch.Tensor, rows: torch.Tensor, ph: int, pw: int, scale: float,
                           sampling_ratio: int, aligned: bool, ps: bool) -> torch.Tensor:
    out = _empty(_out_shape(input, rows, ph, pw, ps), input)
    device, scalar, shape, k = input.device.index, _SCALAR[input.dtype], tuple(input.shape), rows.shape[0]
    order = _workspace(input.device, _rules.roi_align_forward_workspace(device, scalar, ps, input.stride(), shape,
                                                                        (ph, pw), sampling_ratio, k))
    _launch(_rules.roi_align_forward, device, scalar, ps, _view(input), shape, rows.data_ptr(), k, (ph, pw), scale,
            sampling_ratio, aligned, _view(out), 0 if order is None else order.data_ptr())
    return out


def _workspace(device, nbytes):
    """A scratch buffer of ``nbytes`` bytes for the kernels of one call (the
    RoIAlign kernels' RoI order: _rules.roi_order_bytes and
    roi_align_forward_workspace), or None for 0. Freed on the caller's
    return: PyTorch's allocator hands it on in stream order."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None


def roi_align_backward_cuda(grad: torch.Tensor, rows: torch.Tensor, n: int, c: int, h: int, w: int, scale: float,
                            sampling_ratio: int, aligned: bool, ps: bool, channels_last: bool,
                            deterministic: bool) -> torch.Tensor:
    shape, scalar, det = (n, c, h, w), _SCALAR[grad.dtype], deterministic_backward(deterministic)
    size, device, k = tuple(grad.shape[2:]), grad.device.index, rows.shape[0]
    if _rules.backward_tiles(device, scalar, ps, shape, size, sampling_ratio, k, det):
        out = _empty_grad_input(grad, shape, channels_last)  # the tile backward writes every element
        order = _workspace(grad.device, _rules.roi_align_backward_workspace(
            device, scalar, ps, grad.stride(), shape, size, sampling_ratio, k, det, fresh=True))
        _launch(_rules.roi_align_backward, device, scalar, ps, _view(grad), shape, rows.data_ptr(), k, size, scale,
                sampling_ratio, aligned, _view(out), 0, order.data_ptr(), True)
        return out
    transposed = not channels_last and _rules.backward_channels_last(device, scalar, ps, shape, k, det)
    sink = _GradientBuffer(shape, grad, _layout_format(channels_last or transposed), det)
    order = _workspace(grad.device, _rules.roi_order_bytes(grad.device.index, scalar, ps, shape, rows.shape[0]))
    _launch(_rules.roi_align_backward, grad.device.index, scalar, ps, _view(grad), shape, rows.data_ptr(),
            rows.shape[0], size, scale, sampling_ratio, aligned, _view(sink.buffer), sink.max_grad_ptr,
            0 if order is None else order.data_ptr())
    if transposed:
        return _to_nchw(sink.buffer, grad.dtype)
    return sink.result(grad.dtype, "roi_align", rows.shape[0], size, ps)


def _to_nchw(buffer, dtype):
    """A channels-last accumulation buffer as a contiguous NCHW tensor of ``dtype``, in one pass."""
    out = torch.empty(buffer.shape, dtype=dtype, device=buffer.device)
    _launch(_rules.channels_last_to_nchw, buffer.device.index, _SCALAR[dtype], buffer.data_ptr(),
            tuple(buffer.shape), out.data_ptr())
    return out


def roi_pool_forward_cuda(input: torch.Tensor, rows: torch.Tensor, ph: int, pw: int, scale: float,
                          ps: bool) -> tuple[torch.Tensor, torch.Tensor]:
    shape = _out_shape(input, rows, ph, pw, ps)
    out = _empty(shape, input)
    argmax = torch.empty(shape if not ps else (0,), dtype=torch.int32, device=input.device)
    _launch(_rules.roi_pool_forward, input.device.index, _SCALAR[input.dtype], ps, _view(input), tuple(input.shape),
            rows.data_ptr(), rows.shape[0], (ph, pw), scale, _view(out), 0 if ps else argmax.data_ptr())
    return out, argmax


def roi_pool_backward_cuda(grad: torch.Tensor, rows: torch.Tensor, argmax: torch.Tensor, n: int, c: int, h: int,
                           w: int, scale: float, ps: bool, channels_last: bool, deterministic: bool) -> torch.Tensor:
    sink = _GradientBuffer((n, c, h, w), grad, _layout_format(channels_last), deterministic_backward(deterministic))
    size = tuple(grad.shape[2:])
    _launch(_rules.roi_pool_backward, grad.device.index, _SCALAR[grad.dtype], ps, _view(grad), (n, c, h, w),
            rows.data_ptr(), rows.shape[0], size, scale, 0 if ps else argmax.data_ptr(), _view(sink.buffer),
            sink.max_grad_ptr)
    return sink.result(grad.dtype, "roi_pool", rows.shape[0], size, ps)


def prroi_forward_cuda(input: torch.Tensor, rows: torch.Tensor, ph: int, pw: int, scale: float,
                       ps: bool) -> torch.Tensor:
    out = _empty(_out_shape(input, rows, ph, pw, ps), input)
    _launch(_rules.prroi_pool_forward, input.device.index, _SCALAR[input.dtype], ps, _view(input),
            tuple(input.shape), rows.data_ptr(), rows.shape[0], (ph, pw), scale, _view(out))
    return out


def prroi_backward_cuda(grad: torch.Tensor, input: torch.Tensor, rows: torch.Tensor, scale: float, ps: bool,
                        rois_grad: bool, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    shape, size, k = tuple(input.shape), tuple(grad.shape[2:]), rows.shape[0]
    sink = _GradientBuffer(shape, grad, _memory_format(input), deterministic_backward(deterministic))
    grad_rows = torch.zeros((k, 5) if rois_grad else (0, 5), dtype=rows.dtype, device=rows.device)
    partials = None
    if rois_grad and sink.max_grad is not None:
        partials = torch.zeros(_rules.prroi_coordinate_partials(k, size, shape, ps), dtype=rows.dtype,
                               device=rows.device)
    _launch(_rules.prroi_pool_backward, input.device.index, _SCALAR[input.dtype], ps, _view(grad), _view(input),
            shape, rows.data_ptr(), k, size, scale, _view(sink.buffer), grad_rows.data_ptr() if rois_grad else 0,
            sink.max_grad_ptr, 0 if partials is None else partials.data_ptr())
    return sink.result(input.dtype, "prroi_pool", k, size, ps), grad_rows


# ---------------------------------------------------------------------------
# autograd: one setup/backward pair per family, shared by the eager
# autograd.Function and the custom ops' registered autograd

# Every forward takes ``deterministic`` last, for its backward only (the
# forward kernels have no atomics and are deterministic anyway).

def _setup_roi_align(ctx, inputs, output):
    input, rows, ph, pw, scale, sampling_ratio, aligned, ps, deterministic = inputs
    ctx.save_for_backward(rows)
    ctx.args = (tuple(input.shape), scale, sampling_ratio, aligned, ps, _memory_format(input) is torch.channels_last,
                deterministic)


def _setup_roi_pool(ctx, inputs, output):
    input, rows, ph, pw, scale, ps, deterministic = inputs
    ctx.save_for_backward(rows, output[1])
    ctx.args = (tuple(input.shape), scale, ps, _memory_format(input) is torch.channels_last, deterministic)


def _setup_prroi(ctx, inputs, output):
    input, rows, ph, pw, scale, ps, deterministic = inputs
    ctx.save_for_backward(input, rows)
    ctx.args = (scale, ps, deterministic)


def _make_backwards(roi_align_bwd, roi_pool_bwd, prroi_bwd):
    """Backward functions calling the given backward implementations (plain
    functions in eager mode, custom ops under torch.compile)."""

    def roi_align_backward(ctx, grad):
        if grad is None:  # output unused (the eager path does not materialize zeros)
            return (None,) * 9
        (rows,) = ctx.saved_tensors
        shape, scale, sampling_ratio, aligned, ps, channels_last, deterministic = ctx.args
        return (roi_align_bwd(grad, rows, *shape, scale, sampling_ratio, aligned, ps, channels_last, deterministic),
                ) + (None,) * 8

    def roi_pool_backward(ctx, grad, _grad_argmax):
        if grad is None:
            return (None,) * 7
        rows, argmax = ctx.saved_tensors
        shape, scale, ps, channels_last, deterministic = ctx.args
        return (roi_pool_bwd(grad, rows, argmax, *shape, scale, ps, channels_last, deterministic),) + (None,) * 6

    def prroi_backward(ctx, grad):
        if grad is None:
            return (None,) * 7
        input, rows = ctx.saved_tensors
        scale, ps, deterministic = ctx.args
        rois_grad = ctx.needs_input_grad[1]
        grad_input, grad_rows = prroi_bwd(grad, input, rows, scale, ps, rois_grad, deterministic)
        return (grad_input, (grad_rows if rois_grad else None)) + (None,) * 5

    return roi_align_backward, roi_pool_backward, prroi_backward


def _eager_function(forward_impl, setup, backward):
    once_differentiable_backward = torch.autograd.function.once_differentiable(backward)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            # No zero tensors made for gradients that never arrive (RoIPool's
            # argmax output, an output left unused): the backward takes None.
            ctx.set_materialize_grads(False)
            out = forward_impl(*args[:-1])  # the last, deterministic, is the backward's
            setup(ctx, args, out)
            if isinstance(out, tuple):
                ctx.mark_non_differentiable(*out[1:])
            return out

        @staticmethod
        def backward(ctx, *grads):
            # The backward kernels are not differentiable. A plain backward
            # runs with grad mode off and can call them directly; only a
            # create_graph backward pays for once_differentiable's guard.
            if torch.is_grad_enabled():
                return once_differentiable_backward(ctx, *grads)
            return backward(ctx, *grads)

    Function.__name__ = Function.__qualname__ = forward_impl.__name__.replace("_forward_cuda", "").title() + "Function"
    return Function.apply


_eager_backwards = _make_backwards(roi_align_backward_cuda, roi_pool_backward_cuda, prroi_backward_cuda)
_roi_align_eager = _eager_function(roi_align_forward_cuda, _setup_roi_align, _eager_backwards[0])
_roi_pool_eager = _eager_function(roi_pool_forward_cuda, _setup_roi_pool, _eager_backwards[1])
_prroi_eager = _eager_function(prroi_forward_cuda, _setup_prroi, _eager_backwards[2])


# ---------------------------------------------------------------------------
# device-generic implementations, for the custom ops: the CUDA kernels, or on
# the CPU (and in deterministic mode) the reference path on real data

def _check_rois_in_op(rows, input):
    """The RoI value check, inside the op where the data is real: always on
    the CPU, on request on the GPU (it synchronizes)."""
    if _rois.wants_value_check(rows, input.is_cuda):
        _rois.check_roi_values(rows, input.shape[0])


def _fresh(result, like, memory_format):
    """A new tensor (a custom op's output may not alias an input) in the
    layout the fake functions promise."""
    out = torch.empty(result.shape, dtype=result.dtype, device=result.device, memory_format=memory_format)
    return out.copy_(result)


def _vjp(fn, inputs, wrt, grad):
    """Gradients of ``fn(*inputs)`` w.r.t. ``inputs[i]`` for i in ``wrt``,
    against ``grad``, through the reference path. ``torch.func.vjp``, not
    ``torch.autograd.grad``: an op's implementation runs below the autograd
    dispatch key, where tensors record no graph, and functorch's transforms
    bring their own."""
    def of_wrt(*free):
        args = list(inputs)
        for i, t in zip(wrt, free):
            args[i] = t
        return fn(*args)

    out, pullback = torch.func.vjp(of_wrt, *(inputs[i].detach() for i in wrt))
    return pullback(grad.to(out.dtype))


def _grad_input_like(gi, grad, channels_last):
    """A feature gradient as the op returns it: a fresh tensor in ``grad``'s
    dtype, laid out as the forward's input was."""
    return _fresh(gi.to(grad.dtype), grad, _layout_format(channels_last))


def _linear_vjp(fn, shapes, grad, channels_last):
    """Feature gradients of ``fn(*features)`` (features of ``shapes``) against
    ``grad``, for an op linear in its features: the vjp at zero features is the
    vjp everywhere, so no saved input is needed."""
    zeros = tuple(torch.zeros(shape, dtype=grad.dtype, device=grad.device) for shape in shapes)
    grads = _vjp(fn, zeros, tuple(range(len(zeros))), grad)
    return [_grad_input_like(g, grad, channels_last) for g in grads]


def roi_align_forward_any(input: torch.Tensor, rows: torch.Tensor, ph: int, pw: int, scale: float,
                          sampling_ratio: int, aligned: bool, ps: bool, deterministic: bool) -> torch.Tensor:
    _check_rois_in_op(rows, input)
    if use_kernels(input):
        return roi_align_forward_cuda(input, rows, ph, pw, scale, sampling_ratio, aligned, ps)
    with torch.no_grad():
        out = _reference.roi_align(input, rows, (ph, pw), scale, sampling_ratio, aligned, ps)
    return _fresh(out, input, _memory_format(input))


def roi_align_backward_any(grad: torch.Tensor, rows: torch.Tensor, n: int, c: int, h: int, w: int, scale: float,
                           sampling_ratio: int, aligned: bool, ps: bool, channels_last: bool,
                           deterministic: bool) -> torch.Tensor:
    if use_kernels(grad):
        return roi_align_backward_cuda(grad, rows, n, c, h, w, scale, sampling_ratio, aligned, ps, channels_last,
                                       deterministic)
    size = (grad.shape[2], grad.shape[3])
    return _linear_vjp(lambda x: _reference.roi_align(x, rows, size, scale, sampling_ratio, aligned, ps),
                       [(n, c, h, w)], grad, channels_last)[0]


def roi_pool_forward_any(input: torch.Tensor, rows: torch.Tensor, ph: int, pw: int, scale: float,
                         ps: bool, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_rois_in_op(rows, input)
    if use_kernels(input):
        return roi_pool_forward_cuda(input, rows, ph, pw, scale, ps)
    with torch.no_grad():
        if ps:
            out = _reference.roi_pool(input, rows, (ph, pw), scale, True)
            argmax = torch.empty((0,), dtype=torch.int32, device=input.device)
        else:
            out, argmax = _reference.roi_pool(input, rows, (ph, pw), scale, False, return_argmax=True)
            argmax = argmax.to(torch.int32).contiguous()
    return _fresh(out, input, _memory_format(input)), argmax


def roi_pool_backward_any(grad: torch.Tensor, rows: torch.Tensor, argmax: torch.Tensor, n: int, c: int, h: int,
                          w: int, scale: float, ps: bool, channels_last: bool, deterministic: bool) -> torch.Tensor:
    if use_kernels(grad):
        return roi_pool_backward_cuda(grad, rows, argmax, n, c, h, w, scale, ps, channels_last, deterministic)
    if ps:
        size = (grad.shape[2], grad.shape[3])
        return _linear_vjp(lambda x: _reference.roi_pool(x, rows, size, scale, True), [(n, c, h, w)], grad,
                           channels_last)[0]
    # each bin's gradient goes to its maximum
    acc = grad.to(_acc(grad.dtype))
    at = argmax.long()
    keep = at >= 0
    image = rows[:, 0].long().view(-1, 1, 1, 1).expand_as(at)
    channel = torch.arange(c, device=grad.device).view(1, -1, 1, 1).expand_as(at)
    flat = torch.zeros((n, c, h * w), dtype=acc.dtype, device=grad.device)
    flat.index_put_((image[keep], channel[keep], at[keep]), acc[keep], accumulate=True)
    return _grad_input_like(flat.view(n, c, h, w), grad, channels_last)


def prroi_forward_any(input: torch.Tensor, rows: torch.Tensor, ph: int, pw: int, scale: float,
                      ps: bool, deterministic: bool) -> torch.Tensor:
    _check_rois_in_op(rows, input)
    if use_kernels(input):
        return prroi_forward_cuda(input, rows, ph, pw, scale, ps)
    with torch.no_grad():
        out = _reference.prroi_pool(input, rows, (ph, pw), scale, ps)
    return _fresh(out, input, _memory_format(input))


def prroi_backward_any(grad: torch.Tensor, input: torch.Tensor, rows: torch.Tensor, scale: float, ps: bool,
                       rois_grad: bool, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_kernels(input):
        return prroi_backward_cuda(grad, input, rows, scale, ps, rois_grad, deterministic)
    size = (grad.shape[2], grad.shape[3])
    grads = _vjp(lambda x, r: _reference.prroi_pool(x, r, size, scale, ps), (input, rows),
                 (0, 1) if rois_grad else (0,), grad)
    grad_rows = torch.zeros((rows.shape[0], 5) if rois_grad else (0, 5), dtype=rows.dtype, device=rows.device)
    if rois_grad and grads[1] is not None:
        grad_rows[:, 1:] = grads[1][:, 1:]
    return _fresh(grads[0].to(input.dtype), input, _memory_format(input)), grad_rows


# ---------------------------------------------------------------------------
# custom ops (torch.ops.cupy_roi.*), for graph tracing on every device

def _fake_roi_align_fwd(input, rows, ph, pw, scale, sampling_ratio, aligned, ps, deterministic):
    return _empty(_out_shape(input, rows, ph, pw, ps), input)


def _fake_roi_align_bwd(grad, rows, n, c, h, w, scale, sampling_ratio, aligned, ps, channels_last, deterministic):
    return _empty_grad_input(grad, (n, c, h, w), channels_last)


def _fake_roi_pool_fwd(input, rows, ph, pw, scale, ps, deterministic):
    shape = _out_shape(input, rows, ph, pw, ps)
    return _empty(shape, input), torch.empty(shape if not ps else (0,), dtype=torch.int32, device=input.device)


def _fake_roi_pool_bwd(grad, rows, argmax, n, c, h, w, scale, ps, channels_last, deterministic):
    return _empty_grad_input(grad, (n, c, h, w), channels_last)


def _fake_prroi_fwd(input, rows, ph, pw, scale, ps, deterministic):
    return _empty(_out_shape(input, rows, ph, pw, ps), input)


def _fake_prroi_bwd(grad, input, rows, scale, ps, rois_grad, deterministic):
    return _empty(tuple(input.shape), input), torch.empty((rows.shape[0], 5) if rois_grad else (0, 5),
                                                          dtype=rows.dtype, device=rows.device)


def _define(name, impl, fake):
    op = torch.library.custom_op(f"cupy_roi::{name}", impl, mutates_args=())
    op.register_fake(fake)
    return op


if hasattr(torch.library, "custom_op"):
    _bwd_ops = (_define("roi_align_backward", roi_align_backward_any, _fake_roi_align_bwd),
                _define("roi_pool_backward", roi_pool_backward_any, _fake_roi_pool_bwd),
                _define("prroi_pool_backward", prroi_backward_any, _fake_prroi_bwd))
    _op_backwards = _make_backwards(*_bwd_ops)
    _roi_align_op = _define("roi_align_forward", roi_align_forward_any, _fake_roi_align_fwd)
    _roi_pool_op = _define("roi_pool_forward", roi_pool_forward_any, _fake_roi_pool_fwd)
    _prroi_op = _define("prroi_pool_forward", prroi_forward_any, _fake_prroi_fwd)
    _roi_align_op.register_autograd(_op_backwards[0], setup_context=_setup_roi_align)
    _roi_pool_op.register_autograd(_op_backwards[1], setup_context=_setup_roi_pool)
    _prroi_op.register_autograd(_op_backwards[2], setup_context=_setup_prroi)
else:  # no torch.library.custom_op (old PyTorch): graphs break around these calls
    _roi_align_op, _roi_pool_op, _prroi_op = roi_align_forward_any, roi_pool_forward_any, prroi_forward_any


# ---------------------------------------------------------------------------
# rotated and multi-level (FPN) RoIAlign: the same layers, one section

def roi_align_rotated_forward_cuda(input: torch.Tensor, rows: torch.Tensor, ph: int, pw: int, scale: float,
                                   sampling_ratio: int, aligned: bool, clockwise: bool) -> torch.Tensor:
    out = _empty((rows.shape[0], input.shape[1], ph, pw), input)
    _launch(_rules.roi_align_rotated_forward, input.device.index, _SCALAR[input.dtype], _view(input),
            tuple(input.shape), rows.data_ptr(), rows.shape[0], (ph, pw), scale, sampling_ratio, aligned, clockwise,
            _view(out))
    return out


def roi_align_rotated_backward_cuda(grad: torch.Tensor, rows: torch.Tensor, n: int, c: int, h: int, w: int,
                                    scale: float, sampling_ratio: int, aligned: bool, clockwise: bool,
                                    channels_last: bool, deterministic: bool) -> torch.Tensor:
    sink = _GradientBuffer((n, c, h, w), grad, _layout_format(channels_last), deterministic_backward(deterministic))
    size = tuple(grad.shape[2:])
    _launch(_rules.roi_align_rotated_backward, grad.device.index, _SCALAR[grad.dtype], _view(grad), (n, c, h, w),
            rows.data_ptr(), rows.shape[0], size, scale, sampling_ratio, aligned, clockwise, _view(sink.buffer),
            sink.max_grad_ptr)
    return sink.result(grad.dtype, "roi_align", rows.shape[0], size, False)


def multi_scale_forward_cuda(features: List[torch.Tensor], rows: torch.Tensor, ph: int, pw: int,
                             scales: List[float], sampling_ratio: int, aligned: bool, mode: int, s0: float,
                             lvl0: int, lo: int, hi: int) -> torch.Tensor:
    x = features[0]
    out = _empty((rows.shape[0], x.shape[1], ph, pw), x)
    _launch(_rules.multi_scale_roi_align_forward, x.device.index, _SCALAR[x.dtype], [_view(f) for f in features],
            [tuple(f.shape) for f in features], scales, rows.data_ptr(), rows.shape[0], (ph, pw),
            (mode, s0, lvl0, lo, hi), sampling_ratio, aligned, _view(out))
    return out


def _level_shapes(flat_shapes):
    return [tuple(flat_shapes[i:i + 4]) for i in range(0, len(flat_shapes), 4)]


def multi_scale_backward_cuda(grad: torch.Tensor, rows: torch.Tensor, flat_shapes: List[int], scales: List[float],
                              sampling_ratio: int, aligned: bool, mode: int, s0: float, lvl0: int, lo: int, hi: int,
                              channels_last: bool, deterministic: bool) -> List[torch.Tensor]:
    shapes, size, k = _level_shapes(flat_shapes), tuple(grad.shape[2:]), rows.shape[0]
    scalar, deterministic = _SCALAR[grad.dtype], deterministic_backward(deterministic)
    transposed = not channels_last and _rules.backward_channels_last(grad.device.index, scalar, False, shapes[0],
                                                                     k, deterministic)
    layout = _layout_format(channels_last or transposed)
    sinks = [_GradientBuffer(shapes[0], grad, layout, deterministic)]
    sinks += [_GradientBuffer(shape, grad, layout, deterministic, sinks[0].max_grad) for shape in shapes[1:]]
    order = _workspace(grad.device, _rules.roi_order_bytes(grad.device.index, scalar, False, shapes[0], k))
    _launch(_rules.multi_scale_roi_align_backward, grad.device.index, scalar, _view(grad),
            [_view(sink.buffer) for sink in sinks], shapes, scales, rows.data_ptr(), k, size,
            (mode, s0, lvl0, lo, hi), sampling_ratio, aligned, sinks[0].max_grad_ptr,
            0 if order is None else order.data_ptr())
    if transposed:
        return [_to_nchw(sink.buffer, grad.dtype) for sink in sinks]
    return [sink.result(grad.dtype, "roi_align", k, size, False) for sink in sinks]


def _setup_rotated(ctx, inputs, output):
    input, rows, ph, pw, scale, sampling_ratio, aligned, clockwise, deterministic = inputs
    ctx.save_for_backward(rows)
    ctx.args = (tuple(input.shape), scale, sampling_ratio, aligned, clockwise,
                _memory_format(input) is torch.channels_last, deterministic)


def _setup_multi_scale(ctx, inputs, output):
    features, rows, deterministic = inputs[0], inputs[1], inputs[-1]
    ctx.save_for_backward(rows)
    ctx.args = ([v for f in features for v in f.shape],) + tuple(inputs[4:-1]) + (
        _memory_format(features[0]) is torch.channels_last, deterministic)


def _make_more_backwards(rotated_bwd, multi_scale_bwd):
    def rotated_backward(ctx, grad):
        if grad is None:
            return (None,) * 9
        (rows,) = ctx.saved_tensors
        shape, *rest = ctx.args
        return (rotated_bwd(grad, rows, *shape, *rest),) + (None,) * 8

    def multi_scale_backward(ctx, grad):
        if grad is None:
            return (None,) * 13
        (rows,) = ctx.saved_tensors
        return (multi_scale_bwd(grad, rows, *ctx.args),) + (None,) * 12

    return rotated_backward, multi_scale_backward


def _eager_multi_scale_function(backward):
    """An autograd.Function over a variable number of levels (apply takes
    tensors as separate arguments: the levels go last)."""
    def flat_backward(ctx, grad):
        grads = backward(ctx, grad)[0]
        return (None,) * 12 + tuple(grads if grads is not None else [None] * (len(ctx.args[0]) // 4))

    once_differentiable_backward = torch.autograd.function.once_differentiable(flat_backward)

    class MultiScaleRoIAlignFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, rows, ph, pw, scales, sampling_ratio, aligned, mode, s0, lvl0, lo, hi, deterministic,
                    *features):
            ctx.set_materialize_grads(False)
            inputs = (list(features), rows, ph, pw, scales, sampling_ratio, aligned, mode, s0, lvl0, lo, hi)
            out = multi_scale_forward_cuda(*inputs)
            _setup_multi_scale(ctx, inputs + (deterministic,), out)
            return out

        @staticmethod
        def backward(ctx, grad):
            if torch.is_grad_enabled():
                return once_differentiable_backward(ctx, grad)
            return flat_backward(ctx, grad)

    def apply(features, rows, *args):
        return MultiScaleRoIAlignFunction.apply(rows, *args, *features)

    return apply


_more_eager_backwards = _make_more_backwards(roi_align_rotated_backward_cuda, multi_scale_backward_cuda)
_rotated_eager = _eager_function(roi_align_rotated_forward_cuda, _setup_rotated, _more_eager_backwards[0])
_multi_scale_eager = _eager_multi_scale_function(_more_eager_backwards[1])


def roi_align_rotated_forward_any(input: torch.Tensor, rows: torch.Tensor, ph: int, pw: int, scale: float,
                                  sampling_ratio: int, aligned: bool, clockwise: bool,
                                  deterministic: bool) -> torch.Tensor:
    _check_rois_in_op(rows, input)
    if use_kernels(input):
        return roi_align_rotated_forward_cuda(input, rows, ph, pw, scale, sampling_ratio, aligned, clockwise)
    with torch.no_grad():
        out = _reference.roi_align_rotated(input, rows, (ph, pw), scale, sampling_ratio, aligned, clockwise)
    return _fresh(out, input, _memory_format(input))


def roi_align_rotated_backward_any(grad: torch.Tensor, rows: torch.Tensor, n: int, c: int, h: int, w: int,
                                   scale: float, sampling_ratio: int, aligned: bool, clockwise: bool,
                                   channels_last: bool, deterministic: bool) -> torch.Tensor:
    if use_kernels(grad):
        return roi_align_rotated_backward_cuda(grad, rows, n, c, h, w, scale, sampling_ratio, aligned, clockwise,
                                               channels_last, deterministic)
    size = (grad.shape[2], grad.shape[3])
    return _linear_vjp(lambda x: _reference.roi_align_rotated(x, rows, size, scale, sampling_ratio, aligned,
                                                              clockwise), [(n, c, h, w)], grad, channels_last)[0]


def multi_scale_forward_any(features: List[torch.Tensor], rows: torch.Tensor, ph: int, pw: int,
                            scales: List[float], sampling_ratio: int, aligned: bool, mode: int, s0: float,
                            lvl0: int, lo: int, hi: int, deterministic: bool) -> torch.Tensor:
    _check_rois_in_op(rows, features[0])
    if use_kernels(features[0]):
        return multi_scale_forward_cuda(features, rows, ph, pw, scales, sampling_ratio, aligned, mode, s0, lvl0,
                                        lo, hi)
    with torch.no_grad():
        out = _reference.multi_scale_roi_align(features, rows, (ph, pw), scales, sampling_ratio, aligned,
                                               (mode, s0, lvl0, lo, hi))
    return _fresh(out, features[0], _memory_format(features[0]))


def multi_scale_backward_any(grad: torch.Tensor, rows: torch.Tensor, flat_shapes: List[int], scales: List[float],
                             sampling_ratio: int, aligned: bool, mode: int, s0: float, lvl0: int, lo: int, hi: int,
                             channels_last: bool, deterministic: bool) -> List[torch.Tensor]:
    if use_kernels(grad):
        return multi_scale_backward_cuda(grad, rows, flat_shapes, scales, sampling_ratio, aligned, mode, s0, lvl0,
                                         lo, hi, channels_last, deterministic)
    size = (grad.shape[2], grad.shape[3])
    return _linear_vjp(lambda *f: _reference.multi_scale_roi_align(list(f), rows, size, scales, sampling_ratio,
                                                                   aligned, (mode, s0, lvl0, lo, hi)),
                       _level_shapes(flat_shapes), grad, channels_last)


def _fake_rotated_fwd(input, rows, ph, pw, scale, sampling_ratio, aligned, clockwise, deterministic):
    return _empty((rows.shape[0], input.shape[1], ph, pw), input)


def _fake_rotated_bwd(grad, rows, n, c, h, w, scale, sampling_ratio, aligned, clockwise, channels_last,
                      deterministic):
    return _empty_grad_input(grad, (n, c, h, w), channels_last)


def _fake_multi_scale_fwd(features, rows, ph, pw, scales, sampling_ratio, aligned, mode, s0, lvl0, lo, hi,
                          deterministic):
    return _empty((rows.shape[0], features[0].shape[1], ph, pw), features[0])


def _fake_multi_scale_bwd(grad, rows, flat_shapes, scales, sampling_ratio, aligned, mode, s0, lvl0, lo, hi,
                          channels_last, deterministic):
    return [_empty_grad_input(grad, shape, channels_last) for shape in _level_shapes(flat_shapes)]


if hasattr(torch.library, "custom_op"):
    _more_op_backwards = _make_more_backwards(
        _define("roi_align_rotated_backward", roi_align_rotated_backward_any, _fake_rotated_bwd),
        _define("multi_scale_roi_align_backward", multi_scale_backward_any, _fake_multi_scale_bwd))
    _rotated_op = _define("roi_align_rotated_forward", roi_align_rotated_forward_any, _fake_rotated_fwd)
    _multi_scale_op = _define("multi_scale_roi_align_forward", multi_scale_forward_any, _fake_multi_scale_fwd)
    _rotated_op.register_autograd(_more_op_backwards[0], setup_context=_setup_rotated)
    _multi_scale_op.register_autograd(_more_op_backwards[1], setup_context=_setup_multi_scale)
else:
    _rotated_op, _multi_scale_op = roi_align_rotated_forward_any, multi_scale_forward_any


def roi_align_rotated_fwd(input, rows, ph, pw, scale, sampling_ratio, aligned, clockwise, deterministic=False):
    if tracing():
        if _in_onnx_export():
            raise _onnx.unsupported("roi_align_rotated")
        return _rotated_op(input, rows, ph, pw, scale, sampling_ratio, aligned, clockwise, deterministic)
    if not use_kernels(input):
        return _reference.roi_align_rotated(input, rows.detach(), (ph, pw), scale, sampling_ratio, aligned,
                                            clockwise)
    if input.requires_grad and torch.is_grad_enabled():
        return _rotated_eager(input, rows, ph, pw, scale, sampling_ratio, aligned, clockwise, deterministic)
    return roi_align_rotated_forward_cuda(input, rows, ph, pw, scale, sampling_ratio, aligned, clockwise)


def multi_scale_fwd(features, rows, ph, pw, scales, sampling_ratio, aligned, mapping, deterministic=False):
    """``mapping``: :func:`_rules.level_mapping`'s (mode, s0, lvl0, lo, hi)."""
    if tracing():
        if _in_onnx_export():
            raise _onnx.unsupported("multi_scale_roi_align")
        return _multi_scale_op(features, rows, ph, pw, scales, sampling_ratio, aligned, *mapping, deterministic)
    if not use_kernels(features[0]):
        return _reference.multi_scale_roi_align(features, rows.detach(), (ph, pw), scales, sampling_ratio, aligned,
                                                mapping)
    if torch.is_grad_enabled() and any(f.requires_grad for f in features):
        return _multi_scale_eager(features, rows, ph, pw, scales, sampling_ratio, aligned, *mapping, deterministic)
    return multi_scale_forward_cuda(features, rows, ph, pw, scales, sampling_ratio, aligned, *mapping)


def prepare_levels(features, boxes, output_size):
    """Validate a multi-level call; returns (rows [K, 5], (ph, pw))."""
    if not isinstance(features, (list, tuple)) or not features:
        raise TypeError("features must be a non-empty list of (N, C, H_l, W_l) tensors, one per pyramid level")
    for i, f in enumerate(features):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"features[{i}] must be a torch.Tensor, got {type(f).__name__}")
        if f.dtype != features[0].dtype or f.device != features[0].device:
            raise TypeError(f"features[{i}] must have the dtype and device of features[0] "
                            f"({features[0].dtype}, {features[0].device}), got {f.dtype}, {f.device}")
    return prepare(features[0], boxes, output_size, False)


# ---------------------------------------------------------------------------
# the entries the functional operators call, after prepare()

def roi_align_fwd(input, rows, ph, pw, scale, sampling_ratio, aligned, ps, deterministic=False):
    if tracing():
        if _in_onnx_export():
            return _onnx.roi_align(input, rows, ph, pw, scale, sampling_ratio, aligned, ps)
        return _roi_align_op(input, rows, ph, pw, scale, sampling_ratio, aligned, ps, deterministic)
    if not use_kernels(input):  # no box gradient, as on the GPU and in torchvision
        return _reference.roi_align(input, rows.detach(), (ph, pw), scale, sampling_ratio, aligned, ps)
    if input.requires_grad and torch.is_grad_enabled():
        return _roi_align_eager(input, rows, ph, pw, scale, sampling_ratio, aligned, ps, deterministic)
    return roi_align_forward_cuda(input, rows, ph, pw, scale, sampling_ratio, aligned, ps)


def roi_pool_fwd(input, rows, ph, pw, scale, ps, deterministic=False):
    if tracing():
        if _in_onnx_export():
            return _onnx.roi_pool(input, rows, ph, pw, scale, ps)
        return _roi_pool_op(input, rows, ph, pw, scale, ps, deterministic)[0]
    if not use_kernels(input):
        return _reference.roi_pool(input, rows.detach(), (ph, pw), scale, ps)
    if input.requires_grad and torch.is_grad_enabled():
        return _roi_pool_eager(input, rows, ph, pw, scale, ps, deterministic)[0]
    return roi_pool_forward_cuda(input, rows, ph, pw, scale, ps)[0]


def prroi_fwd(input, rows, ph, pw, scale, ps, deterministic=False):
    if tracing():
        if _in_onnx_export():
            return _onnx.prroi_pool(input, rows, ph, pw, scale, ps)
        return _prroi_op(input, rows, ph, pw, scale, ps, deterministic)
    if not use_kernels(input):
        return _reference.prroi_pool(input, rows, (ph, pw), scale, ps)
    if (input.requires_grad or rows.requires_grad) and torch.is_grad_enabled():
        return _prroi_eager(input, rows, ph, pw, scale, ps, deterministic)
    return prroi_forward_cuda(input, rows, ph, pw, scale, ps)


def prepare(input, rois, output_size, position_sensitive, columns=5):
    """Validate the arguments; returns (rows [K, columns] in the accumulation
    dtype, (ph, pw)). Checks RoI values where that is free (CPU) or asked for;
    while a graph is traced the op checks them itself, on real data."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    dtype = input.dtype
    if dtype not in FLOATING:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {dtype}")
    shape = input.shape
    _rules.check_shape4(shape)
    output_size = _rules.output_size_pair(output_size)
    _rules.channels_out(shape[1], output_size, position_sensitive)
    acc = _acc(dtype)
    if (type(rois) is torch.Tensor and rois.dtype == acc and rois.dim() == 2 and rois.shape[1] == columns
            and rois.device == input.device and rois.is_contiguous()):
        rows = rois  # already what the kernels read
    else:
        rows = _rois.roi_rows(rois, input, shape[0], "float64" if acc == torch.float64 else "float32", columns)
    if _rois.wants_value_check(rois, input.is_cuda) and not tracing():
        _rois.check_roi_values(rows, shape[0])
    return rows, output_size


def use_kernels(input):
    return input.is_cuda


# ---------------------------------------------------------------------------
# TorchScript: the public functions' scripted branch (tensor RoIs or a list of
# boxes, then the custom op; the op checks RoI values on real data)

def script_rows(input: torch.Tensor, boxes: Union[torch.Tensor, List[torch.Tensor]], output_size: List[int],
                position_sensitive: bool, columns: int = 5) -> torch.Tensor:
    torch._assert(input.dim() == 4, "input must be 4-d (N, C, H, W)")
    torch._assert(len(output_size) == 2 and output_size[0] > 0 and output_size[1] > 0,
                  "output_size must be positive")
    if position_sensitive:
        torch._assert(input.size(1) % (output_size[0] * output_size[1]) == 0,
                      "input: position-sensitive pooling needs channels divisible by ph * pw")
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    if isinstance(boxes, torch.Tensor):
        torch._assert(boxes.dim() == 2 and boxes.size(1) == columns, "rois must have shape [K, 5] ([K, 6] rotated)")
        return boxes.to(acc).contiguous()
    torch._assert(len(boxes) == input.size(0), "rois given as a list must hold one [L, 4] tensor per image")
    parts: List[torch.Tensor] = []
    for i, b in enumerate(boxes):
        torch._assert(b.dim() == 2 and b.size(1) == columns - 1, "rois[i] must have shape [L, 4] ([L, 5] rotated)")
        parts.append(torch.cat([torch.full_like(b[:, :1], float(i)), b], dim=1).to(acc))
    if len(parts) == 0:
        return torch.zeros((0, columns), dtype=acc, device=input.device)
    return torch.cat(parts, dim=0)


def script_roi_align(input: torch.Tensor, boxes: Union[torch.Tensor, List[torch.Tensor]], output_size: List[int],
                     spatial_scale: float, sampling_ratio: int, aligned: bool, ps: bool,
                     deterministic: bool = False) -> torch.Tensor:
    rows = script_rows(input, boxes, output_size, ps)
    return torch.ops.cupy_roi.roi_align_forward(input, rows, output_size[0], output_size[1], spatial_scale,
                                                sampling_ratio, aligned, ps, deterministic)


def script_roi_pool(input: torch.Tensor, boxes: Union[torch.Tensor, List[torch.Tensor]], output_size: List[int],
                    spatial_scale: float, ps: bool, deterministic: bool = False) -> torch.Tensor:
    rows = script_rows(input, boxes, output_size, ps)
    return torch.ops.cupy_roi.roi_pool_forward(input, rows, output_size[0], output_size[1], spatial_scale, ps,
                                               deterministic)[0]


def script_prroi(input: torch.Tensor, boxes: Union[torch.Tensor, List[torch.Tensor]], output_size: List[int],
                 spatial_scale: float, ps: bool, deterministic: bool = False) -> torch.Tensor:
    rows = script_rows(input, boxes, output_size, ps)
    return torch.ops.cupy_roi.prroi_pool_forward(input, rows, output_size[0], output_size[1], spatial_scale, ps,
                                                 deterministic)


def script_roi_align_rotated(input: torch.Tensor, boxes: Union[torch.Tensor, List[torch.Tensor]],
                             output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool,
                             clockwise: bool, deterministic: bool = False) -> torch.Tensor:
    rows = script_rows(input, boxes, output_size, False, 6)
    return torch.ops.cupy_roi.roi_align_rotated_forward(input, rows, output_size[0], output_size[1], spatial_scale,
                                                        sampling_ratio, aligned, clockwise, deterministic)
