"""Array API: forward and backward of every operator on CuPy arrays (GPU kernels)
or NumPy arrays (the reference path, on the CPU). For users without autograd.

Conventions shared by every function here:

* ``input``: ``(N, C, H, W)``, any strides (NCHW, channels-last, views);
  float16, float32, float64, and bfloat16 given as a ``uint16`` array of raw
  bfloat16 bits with ``scalar_type="bfloat16"`` (CuPy has no bfloat16 dtype).
  Any DLPack producer (an object with ``__dlpack__``: a torch tensor, a JAX
  array, ...) is taken as a CuPy array (GPU) or NumPy array (CPU) without a
  copy; results are CuPy arrays, which ``torch.from_dlpack`` takes without a copy.
* ``rois``: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` or a list of N
  ``[L_i, 4]`` arrays, in input-image coordinates, any floating dtype.
* ``output_size``: int or ``(ph, pw)``. Outputs are ``(K, C_out, ph, pw)`` with
  ``C_out = C``, or ``C / (ph * pw)`` for position-sensitive pooling, laid out
  like the input (channels-last in, channels-last out).
* ``out``: optional output array to write (any strides, the input's dtype).
* Backward functions return gradients in the accumulation dtype (float32 for
  float16/bfloat16 inputs, else the input's); ``grad_input`` may be passed as a
  zero-filled buffer of that dtype to accumulate into. ``deterministic=True``
  gives bitwise-reproducible gradients (int64 fixed-point accumulation, see the
  README); the CPU path is deterministic anyway.
* ``stream``: a ``cupy.cuda.Stream`` or ``ExternalStream`` of the input's device;
  default: CuPy's current stream of that device (not of the current device).
  Nothing here synchronizes with the host, unless the RoI value check is
  turned on (see :func:`cupy_roi.roi_checks`); NumPy inputs are always checked.
"""
import numpy as np

from . import _gpu, _kernels, _rois, _rules
from ._rules import channels_out, check_shape4, output_size_pair  # noqa: F401  (public helpers)

__all__ = [
    "roi_align_forward", "roi_align_backward", "ps_roi_align_forward", "ps_roi_align_backward",
    "roi_pool_forward", "roi_pool_backward", "ps_roi_pool_forward", "ps_roi_pool_backward",
    "prroi_pool_forward", "prroi_pool_backward", "roi_align_rotated_forward", "roi_align_rotated_backward",
    "multi_scale_roi_align_forward", "multi_scale_roi_align_backward",
]


# ---------------------------------------------------------------------------
# argument handling shared by every operator

def _scalar_type(a, scalar_type, name):
    dtype = str(a.dtype)
    if scalar_type is not None:
        if scalar_type != "bfloat16" or dtype not in ("uint16", "int16"):
            raise TypeError(f"{name}: scalar_type={scalar_type!r} is only for bfloat16 bits held "
                            f"in a uint16 array, got dtype {dtype}")
        return "bfloat16"
    if dtype not in _kernels.CUDA_TYPES:
        raise TypeError(f"{name} must be float16, float32 or float64 (bfloat16 as uint16 bits "
                        f"with scalar_type='bfloat16'), got {dtype}")
    return dtype


def _ptr(a):
    return a.data.ptr


def _view(a):
    """(pointer, strides in elements) of a CuPy array, for :mod:`_rules`."""
    item = a.itemsize
    return a.data.ptr, tuple(s // item for s in a.strides)


def _channels_fastest(a):
    return _rules.channels_fastest(a.strides, a.shape)


def as_array(a, name="input"):
    """NumPy and CuPy arrays as they are; any other DLPack producer (a torch
    tensor, a JAX array) as a CuPy array (on a GPU) or NumPy array (on the
    CPU) sharing its memory."""
    if isinstance(a, np.ndarray):
        return a
    module = type(a).__module__
    if module.startswith("cupy"):
        return a
    if hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__"):
        device_type = int(a.__dlpack_device__()[0])
        if device_type == 1:  # kDLCPU
            return np.from_dlpack(a)
        cupy = _gpu.import_cupy()
        try:
            return cupy.from_dlpack(a)
        except Exception as e:
            raise TypeError(f"{name}: this DLPack producer ({type(a).__name__}) cannot be read by CuPy: {e}") from e
    raise TypeError(f"{name} must be a NumPy or CuPy array or a DLPack producer, got {type(a).__name__}")


def _arrays(rois, *arrays):
    """``as_array`` of each array argument (``rois`` may be a list of box arrays)."""
    if isinstance(rois, (list, tuple)):
        rois = [as_array(r, f"rois[{i}]") for i, r in enumerate(rois)]
    elif rois is not None:
        rois = as_array(rois, "rois")
    return (rois, *(None if a is None else as_array(a, name) for a, name in arrays))


class _Call:
    """One GPU operator call: validated sizes, RoI rows, stream and device."""

    def __init__(self, like, shape, rois, output_size, position_sensitive, stream, scalar_type, name, columns=5):
        cupy = _gpu.import_cupy()
        check_shape4(shape, name)
        self.cupy = cupy
        self.scalar = _scalar_type(like, scalar_type, name)
        self.acc = _rois.accumulation_dtype_name(self.scalar)
        self.output_size = output_size_pair(output_size)
        self.shape = tuple(int(v) for v in shape)
        self.c_out = channels_out(self.shape[1], self.output_size, position_sensitive)
        self.ps = bool(position_sensitive)
        self.device = like.device.id
        self.stream = _stream_for(stream, self.device)
        with cupy.cuda.Device(self.device), self.stream:
            self.rows = _rois.roi_rows(rois, like, self.shape[0], self.acc, columns)
            if _rois.wants_value_check(rois, on_gpu=True):
                _rois.check_roi_values(self.rows, self.shape[0])
        self.k = int(self.rows.shape[0])
        self.out_shape = (self.k, self.c_out) + self.output_size

    def new_array(self, shape, dtype, layout_like):
        """Allocate ``shape``; channels-last when ``layout_like`` is."""
        with self.cupy.cuda.Device(self.device):
            if _channels_fastest(layout_like):
                return self.cupy.empty((shape[0], shape[2], shape[3], shape[1]), dtype).transpose(0, 3, 1, 2)
            return self.cupy.empty(shape, dtype)

    def output(self, out, like):
        if out is None:
            return self.new_array(self.out_shape, like.dtype, like)
        _check_array(out, self.out_shape, like.dtype, "out", self.device)
        return out

    def zeros(self, shape, layout_like):
        """A zero-filled accumulation-dtype buffer of ``shape``, laid out like ``layout_like``."""
        g = self.new_array(shape, self.acc, layout_like)
        with self.cupy.cuda.Device(self.device), self.stream:
            g.fill(0)
        return g

    def grad_input(self, grad_input, layout_like):
        if grad_input is None:
            return self.zeros(self.shape, layout_like)
        _check_array(grad_input, self.shape, np.dtype(self.acc), "grad_input", self.device)
        return grad_input

    def gradient_sink(self, grad_output, shape, layout_like, deterministic, max_grad=None):
        """Where a backward kernel adds one gradient: ``(buffer, max_grad)``.
        max_grad is None for float atomics into a zero-filled accumulation
        buffer (returned as None: the caller supplies it); for the
        deterministic backward, a zero-filled int64 buffer laid out like
        ``layout_like`` and max|grad_output| as a 0-d device array of its
        type (computed on the stream: no synchronization; or ``max_grad``,
        when another buffer of the same backward has it)."""
        if not deterministic or grad_output.size == 0:
            return None, None
        cupy = self.cupy
        fixed = self.new_array(shape, np.int64, layout_like)
        with cupy.cuda.Device(self.device), self.stream:
            fixed.fill(0)
            if max_grad is None and self.scalar == "bfloat16":  # raw bits: without the sign they order as |values|
                max_grad = cupy.bitwise_and(grad_output.view(np.uint16), np.uint16(0x7FFF)).max()
            elif max_grad is None:
                max_grad = cupy.abs(grad_output).max()
        return fixed, max_grad

    def finish_gradient(self, family, fixed, max_grad, out):
        """Convert a deterministic backward's int64 buffer, adding into ``out``
        (the caller's zero-filled or accumulating accumulation-dtype buffer)."""
        with self.cupy.cuda.Device(self.device):
            _rules.fixed_point_gradient(self.device, self.stream.ptr, self.scalar, family, _ptr(fixed), _ptr(max_grad),
                                        self.k, self.output_size, self.ps, tuple(out.shape), _view(out), True, True)
        return out

    def check_grad_output(self, grad_output):
        _check_array(grad_output, self.out_shape, None, "grad_output", self.device)
        if _scalar_type(grad_output, self.scalar if self.scalar == "bfloat16" else None,
                        "grad_output") != self.scalar:
            raise TypeError(f"grad_output must have the input's dtype ({self.scalar}), got {grad_output.dtype}")

    def workspace(self, nbytes):
        """A scratch buffer of ``nbytes`` bytes for launches on the call's
        stream (None for 0), allocated on that stream: CuPy's memory pool
        hands a freed block only to later allocations on the same stream."""
        if not nbytes:
            return None
        with self.cupy.cuda.Device(self.device), self.stream:
            return self.cupy.empty(nbytes, dtype=self.cupy.uint8)

    def run(self, rule, *args):
        """One of :mod:`_rules`' launches, on the data's device and the call's stream."""
        with self.cupy.cuda.Device(self.device):
            rule(self.device, self.stream.ptr, self.scalar, self.ps, *args)


def _stream_for(stream, device):
    """``stream``, or the current CuPy stream of ``device``: CuPy keeps one per
    device, and the current device may be another one than the data's."""
    cupy = _gpu.import_cupy()
    if stream is None:
        with cupy.cuda.Device(device):
            return cupy.cuda.get_current_stream()
    stream_device = getattr(stream, "device_id", device)
    if stream_device not in (device, -1):
        raise ValueError(f"stream must belong to the input's device ({device}), got a stream of device "
                         f"{stream_device}")
    return stream


def _check_array(a, shape, dtype, name, device):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {a.dtype}")
    if a.device.id != device:
        raise ValueError(f"{name} must be on device {device}, got device {a.device.id}")


def _is_numpy(a):
    return isinstance(a, np.ndarray)


# ---------------------------------------------------------------------------
# CPU path: the reference implementation, through torch

def _cpu_rows(rois, input, columns=5):
    import torch

    rows = _rois.roi_rows(rois, input, input.shape[0], _rois.accumulation_dtype_name(str(input.dtype)), columns)
    _rois.check_roi_values(rows, input.shape[0])
    return torch.from_numpy(rows)


def _cpu_forward(fn, input, rois, *args, columns=5, **kwargs):
    import torch

    from . import _reference

    check_shape4(input.shape)
    _scalar_type(input, None, "input")
    rows = _cpu_rows(rois, input, columns)
    out = getattr(_reference, fn)(torch.from_numpy(np.ascontiguousarray(input)), rows, *args, **kwargs)
    if isinstance(out, tuple):
        return tuple(o.numpy() for o in out)
    return out.numpy()


def _cpu_backward(fn, grad_output, input, rois, *args, rois_grad=False, columns=5):
    """Vector-Jacobian product of the reference, in the accumulation dtype."""
    import torch

    from . import _reference

    check_shape4(input.shape)
    _scalar_type(input, None, "input")
    acc = getattr(torch, _rois.accumulation_dtype_name(str(input.dtype)))
    x = torch.from_numpy(np.ascontiguousarray(input)).to(acc).requires_grad_(True)
    rows = _cpu_rows(rois, input, columns).requires_grad_(rois_grad)
    out = getattr(_reference, fn)(x, rows, *args)
    go = torch.from_numpy(np.ascontiguousarray(grad_output)).to(acc)
    if tuple(go.shape) != tuple(out.shape):
        raise ValueError(f"grad_output must have shape {tuple(out.shape)}, got {tuple(go.shape)}")
    wrt = [x, rows] if rois_grad else [x]
    grads = torch.autograd.grad(out, wrt, go, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g.detach() for g, w in zip(grads, wrt)]
    if rois_grad:
        grads[1][:, 0] = 0
        return grads[0].numpy(), grads[1].numpy()
    return grads[0].numpy()


# ---------------------------------------------------------------------------
# RoIAlign / PSRoIAlign

def roi_align_forward(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False,
                      position_sensitive=False, *, out=None, stream=None, scalar_type=None):
    """RoIAlign (or PSRoIAlign) forward with torchvision.ops semantics: returns
    ``(K, C_out, ph, pw)``."""
    rois, input, out = _arrays(rois, (input, "input"), (out, "out"))
    if _is_numpy(input):
        return _cpu_forward("roi_align", input, rois, output_size_pair(output_size), float(spatial_scale),
                            int(sampling_ratio), bool(aligned), bool(position_sensitive))
    call = _Call(input, input.shape, rois, output_size, position_sensitive, stream, scalar_type, "input")
    out = call.output(out, input)
    order = call.workspace(_rules.roi_align_forward_workspace(call.device, call.scalar, call.ps, _view(input)[1],
                                                              call.shape, call.output_size, int(sampling_ratio),
                                                              call.k))
    call.run(_rules.roi_align_forward, _view(input), call.shape, _ptr(call.rows), call.k, call.output_size,
             float(spatial_scale), int(sampling_ratio), bool(aligned), _view(out), 0 if order is None else _ptr(order))
    return out


def roi_align_backward(grad_output, rois, input_shape, output_size, spatial_scale=1.0, sampling_ratio=-1,
                       aligned=False, position_sensitive=False, *, grad_input=None, stream=None,
                       scalar_type=None, deterministic=False):
    """Gradient of :func:`roi_align_forward` w.r.t. its input, shape ``input_shape``."""
    rois, grad_output, grad_input = _arrays(rois, (grad_output, "grad_output"), (grad_input, "grad_input"))
    if _is_numpy(grad_output):
        like = np.zeros(tuple(input_shape), grad_output.dtype)
        return _cpu_backward("roi_align", grad_output, like, rois, output_size_pair(output_size),
                             float(spatial_scale), int(sampling_ratio), bool(aligned), bool(position_sensitive))
    call = _Call(grad_output, input_shape, rois, output_size, position_sensitive, stream, scalar_type,
                 "grad_output")
    call.check_grad_output(grad_output)
    grad_input = call.grad_input(grad_input, grad_output)
    fixed, max_grad = call.gradient_sink(grad_output, call.shape, grad_input, deterministic)
    order = call.workspace(_rules.roi_align_backward_workspace(
        call.device, call.scalar, call.ps, _view(grad_output)[1], call.shape, call.output_size, int(sampling_ratio),
        call.k, fixed is not None))
    call.run(_rules.roi_align_backward, _view(grad_output), call.shape, _ptr(call.rows), call.k,
             call.output_size, float(spatial_scale), int(sampling_ratio), bool(aligned),
             _view(grad_input if fixed is None else fixed), 0 if fixed is None else _ptr(max_grad),
             0 if order is None else _ptr(order))
    return grad_input if fixed is None else call.finish_gradient("roi_align", fixed, max_grad, grad_input)


def ps_roi_align_forward(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True, **kw):
    """PSRoIAlign forward; ``aligned=True`` is what torchvision.ops.ps_roi_align computes."""
    return roi_align_forward(input, rois, output_size, spatial_scale, sampling_ratio, aligned, True, **kw)


def ps_roi_align_backward(grad_output, rois, input_shape, output_size, spatial_scale=1.0, sampling_ratio=-1,
                          aligned=True, **kw):
    return roi_align_backward(grad_output, rois, input_shape, output_size, spatial_scale, sampling_ratio,
                              aligned, True, **kw)


# ---------------------------------------------------------------------------
# rotated RoIAlign

def roi_align_rotated_forward(input, rois, output_size, spatial_scale=1.0, sampling_ratio=0, aligned=True,
                              clockwise=False, *, out=None, stream=None, scalar_type=None):
    """Rotated RoIAlign forward (mmcv semantics, see
    :func:`cupy_roi.roi_align_rotated`): ``rois`` are ``[K, 6]`` rows
    ``(batch_index, cx, cy, w, h, angle)`` (angle in radians) or a list of
    ``[L_i, 5]``; returns ``(K, C, ph, pw)``."""
    rois, input, out = _arrays(rois, (input, "input"), (out, "out"))
    args = (float(spatial_scale), int(sampling_ratio), bool(aligned), bool(clockwise))
    if _is_numpy(input):
        return _cpu_forward("roi_align_rotated", input, rois, output_size_pair(output_size), *args, columns=6)
    call = _Call(input, input.shape, rois, output_size, False, stream, scalar_type, "input", columns=6)
    out = call.output(out, input)
    with call.cupy.cuda.Device(call.device):
        _rules.roi_align_rotated_forward(call.device, call.stream.ptr, call.scalar, _view(input), call.shape,
                                         _ptr(call.rows), call.k, call.output_size, *args, _view(out))
    return out


def roi_align_rotated_backward(grad_output, rois, input_shape, output_size, spatial_scale=1.0, sampling_ratio=0,
                               aligned=True, clockwise=False, *, grad_input=None, stream=None, scalar_type=None,
                               deterministic=False):
    """Gradient of :func:`roi_align_rotated_forward` w.r.t. its input, shape ``input_shape``."""
    rois, grad_output, grad_input = _arrays(rois, (grad_output, "grad_output"), (grad_input, "grad_input"))
    args = (float(spatial_scale), int(sampling_ratio), bool(aligned), bool(clockwise))
    if _is_numpy(grad_output):
        like = np.zeros(tuple(input_shape), grad_output.dtype)
        return _cpu_backward("roi_align_rotated", grad_output, like, rois, output_size_pair(output_size), *args,
                             columns=6)
    call = _Call(grad_output, input_shape, rois, output_size, False, stream, scalar_type, "grad_output",
                 columns=6)
    call.check_grad_output(grad_output)
    grad_input = call.grad_input(grad_input, grad_output)
    fixed, max_grad = call.gradient_sink(grad_output, call.shape, grad_input, deterministic)
    with call.cupy.cuda.Device(call.device):
        _rules.roi_align_rotated_backward(call.device, call.stream.ptr, call.scalar, _view(grad_output), call.shape,
                                          _ptr(call.rows), call.k, call.output_size, *args,
                                          _view(grad_input if fixed is None else fixed),
                                          0 if fixed is None else _ptr(max_grad))
    return grad_input if fixed is None else call.finish_gradient("roi_align", fixed, max_grad, grad_input)


# ---------------------------------------------------------------------------
# multi-level (FPN) RoIAlign

def _levels(shapes, spatial_scales, mapping, canonical_scale, canonical_level, finest_scale):
    """Checked level scales and the kernel's level mapping, for forward and backward."""
    scales = [float(v) for v in spatial_scales]
    _rules.check_levels(shapes, scales)
    return scales, _rules.level_mapping(mapping, scales, canonical_scale, canonical_level, finest_scale)


def multi_scale_roi_align_forward(features, rois, output_size, spatial_scales, sampling_ratio=-1, aligned=False, *,
                                  mapping="torchvision", canonical_scale=224, canonical_level=4, finest_scale=56,
                                  out=None, stream=None, scalar_type=None):
    """Multi-level RoIAlign forward (see :func:`cupy_roi.multi_scale_roi_align`):
    ``features`` is a list of ``(N, C, H_l, W_l)`` arrays, finest first, with one
    scale each; returns ``(K, C, ph, pw)``, all levels in one launch (into
    ``out`` when given, as the other forwards)."""
    features = [as_array(f, f"features[{i}]") for i, f in enumerate(features)]
    scales, level_map = _levels([tuple(f.shape) for f in features], spatial_scales, mapping, canonical_scale,
                                canonical_level, finest_scale)
    for i, f in enumerate(features[1:], 1):
        if f.dtype != features[0].dtype or _is_numpy(f) != _is_numpy(features[0]):
            raise TypeError(f"features[{i}] must be an array of the kind and dtype of features[0]")
    rois, out = _arrays(rois, (out, "out"))
    x = features[0]
    if _is_numpy(x):
        import torch

        from . import _reference

        rows = _cpu_rows(rois, x)
        out = _reference.multi_scale_roi_align([torch.from_numpy(np.ascontiguousarray(f)) for f in features], rows,
                                               output_size_pair(output_size), scales, int(sampling_ratio),
                                               bool(aligned), level_map)
        return out.numpy()
    call = _Call(x, x.shape, rois, output_size, False, stream, scalar_type, "features[0]")
    for i, f in enumerate(features):
        if f.device.id != call.device:
            raise ValueError(f"features[{i}] must be on device {call.device}, got device {f.device.id}")
    out = call.output(out, x)
    with call.cupy.cuda.Device(call.device):
        _rules.multi_scale_roi_align_forward(call.device, call.stream.ptr, call.scalar, [_view(f) for f in features],
                                             [tuple(f.shape) for f in features], scales, _ptr(call.rows), call.k,
                                             call.output_size, level_map, int(sampling_ratio), bool(aligned),
                                             _view(out))
    return out


def multi_scale_roi_align_backward(grad_output, rois, feature_shapes, output_size, spatial_scales,
                                   sampling_ratio=-1, aligned=False, *, mapping="torchvision", canonical_scale=224,
                                   canonical_level=4, finest_scale=56, stream=None, scalar_type=None,
                                   deterministic=False):
    """Gradients of :func:`multi_scale_roi_align_forward` w.r.t. each level
    (shapes ``feature_shapes``), as a list of accumulation-dtype arrays laid
    out like ``grad_output``."""
    rois, grad_output = _arrays(rois, (grad_output, "grad_output"))
    shapes = [tuple(int(v) for v in s) for s in feature_shapes]
    scales, level_map = _levels(shapes, spatial_scales, mapping, canonical_scale, canonical_level, finest_scale)
    if _is_numpy(grad_output):
        import torch

        from . import _reference

        acc = getattr(torch, _rois.accumulation_dtype_name(str(grad_output.dtype)))
        rows = _cpu_rows(rois, np.zeros((shapes[0][0], 1, 1, 1), grad_output.dtype))  # N, kind and dtype
        levels = [torch.zeros(s, dtype=acc, requires_grad=True) for s in shapes]
        out = _reference.multi_scale_roi_align(levels, rows, output_size_pair(output_size), scales,
                                               int(sampling_ratio), bool(aligned), level_map)
        grads = torch.autograd.grad(out, levels, torch.from_numpy(np.ascontiguousarray(grad_output)).to(acc),
                                    allow_unused=True)
        return [torch.zeros(s, dtype=acc).numpy() if g is None else g.numpy() for g, s in zip(grads, shapes)]
    call = _Call(grad_output, shapes[0], rois, output_size, False, stream, scalar_type, "grad_output")
    call.check_grad_output(grad_output)
    grads = [call.zeros(s, grad_output) for s in shapes]
    sinks = [call.gradient_sink(grad_output, shapes[0], grad_output, deterministic)]
    max_grad = sinks[0][1]
    sinks += [call.gradient_sink(grad_output, s, grad_output, deterministic, max_grad) for s in shapes[1:]]
    order = call.workspace(_rules.roi_order_bytes(call.device, call.scalar, False, shapes[0], call.k))
    with call.cupy.cuda.Device(call.device):
        _rules.multi_scale_roi_align_backward(call.device, call.stream.ptr, call.scalar, _view(grad_output),
                                              [_view(g if f is None else f) for g, (f, _) in zip(grads, sinks)],
                                              shapes, scales, _ptr(call.rows), call.k, call.output_size, level_map,
                                              int(sampling_ratio), bool(aligned),
                                              0 if max_grad is None else _ptr(max_grad),
                                              0 if order is None else _ptr(order))
    if max_grad is None:
        return grads
    return [call.finish_gradient("roi_align", f, max_grad, g) for g, (f, _) in zip(grads, sinks)]


# ---------------------------------------------------------------------------
# RoIPool / PSRoIPool

def roi_pool_forward(input, rois, output_size, spatial_scale=1.0, position_sensitive=False, *, out=None,
                     argmax=None, stream=None, scalar_type=None):
    """RoIPool (max) or PSRoIPool (mean) forward, torchvision.ops semantics.

    Returns ``(output, argmax)``; ``argmax`` (int32, ``(K, C, ph, pw)``, the
    ``h * W + w`` of each maximum, -1 for an empty bin) feeds
    :func:`roi_pool_backward`; pass ``argmax`` (contiguous int32) to have it
    written there. It is None for PSRoIPool."""
    ps = bool(position_sensitive)
    rois, input, out, argmax = _arrays(rois, (input, "input"), (out, "out"), (argmax, "argmax"))
    if _is_numpy(input):
        res = _cpu_forward("roi_pool", input, rois, output_size_pair(output_size), float(spatial_scale), ps,
                           return_argmax=not ps)
        return (res, None) if ps else (res[0], res[1].astype(np.int32))
    call = _Call(input, input.shape, rois, output_size, ps, stream, scalar_type, "input")
    out = call.output(out, input)
    if ps:
        argmax = None
    elif argmax is None:
        with call.cupy.cuda.Device(call.device):
            argmax = call.cupy.empty(call.out_shape, np.int32)
    else:
        _check_array(argmax, call.out_shape, np.dtype(np.int32), "argmax", call.device)
        if not argmax.flags.c_contiguous:
            raise ValueError("argmax must be C-contiguous")
    call.run(_rules.roi_pool_forward, _view(input), call.shape, _ptr(call.rows), call.k, call.output_size,
             float(spatial_scale), _view(out), 0 if argmax is None else _ptr(argmax))
    return out, argmax


def roi_pool_backward(grad_output, rois, argmax, input_shape, output_size, spatial_scale=1.0,
                      position_sensitive=False, *, grad_input=None, stream=None, scalar_type=None,
                      deterministic=False):
    """Gradient of :func:`roi_pool_forward` w.r.t. its input (``argmax`` is
    needed for RoIPool, ignored for PSRoIPool)."""
    ps = bool(position_sensitive)
    rois, grad_output, argmax, grad_input = _arrays(rois, (grad_output, "grad_output"), (argmax, "argmax"),
                                                    (grad_input, "grad_input"))
    if not ps and (argmax is None or tuple(argmax.shape) != tuple(grad_output.shape)):
        raise ValueError("argmax: RoIPool's backward needs the argmax returned by roi_pool_forward, "
                         f"shaped like grad_output {tuple(grad_output.shape)}")
    if _is_numpy(grad_output):
        acc = _rois.accumulation_dtype_name(str(grad_output.dtype))
        if ps:
            like = np.zeros(tuple(input_shape), grad_output.dtype)
            return _cpu_backward("roi_pool", grad_output, like, rois, output_size_pair(output_size),
                                 float(spatial_scale), True)
        return _argmax_scatter_cpu(grad_output, rois, argmax, input_shape, acc)
    call = _Call(grad_output, input_shape, rois, output_size, ps, stream, scalar_type, "grad_output")
    call.check_grad_output(grad_output)
    if not ps and (argmax.dtype != np.int32 or not argmax.flags.c_contiguous):
        raise TypeError("argmax must be the contiguous int32 array returned by roi_pool_forward")
    grad_input = call.grad_input(grad_input, grad_output)
    fixed, max_grad = call.gradient_sink(grad_output, call.shape, grad_input, deterministic)
    call.run(_rules.roi_pool_backward, _view(grad_output), call.shape, _ptr(call.rows), call.k,
             call.output_size, float(spatial_scale), 0 if ps else _ptr(argmax),
             _view(grad_input if fixed is None else fixed), 0 if fixed is None else _ptr(max_grad))
    return grad_input if fixed is None else call.finish_gradient("roi_pool", fixed, max_grad, grad_input)


def _argmax_scatter_cpu(grad_output, rois, argmax, input_shape, acc):
    n, c, h, w = (int(v) for v in input_shape)
    rows = _cpu_rows(rois, np.zeros((n, 1, 1, 1), grad_output.dtype)).numpy()
    grad = np.zeros((n, c, h * w), acc)
    b = np.broadcast_to(rows[:, 0].astype(np.int64)[:, None, None, None], argmax.shape)
    ch = np.broadcast_to(np.arange(c)[None, :, None, None], argmax.shape)
    keep = argmax >= 0
    np.add.at(grad, (b[keep], ch[keep], argmax[keep]), grad_output[keep].astype(acc))
    return grad.reshape(n, c, h, w)


def ps_roi_pool_forward(input, rois, output_size, spatial_scale=1.0, **kw):
    """PSRoIPool forward; returns the output only."""
    return roi_pool_forward(input, rois, output_size, spatial_scale, True, **kw)[0]


def ps_roi_pool_backward(grad_output, rois, input_shape, output_size, spatial_scale=1.0, **kw):
    return roi_pool_backward(grad_output, rois, None, input_shape, output_size, spatial_scale, True, **kw)


# ---------------------------------------------------------------------------
# PrRoIPool / PSPrRoIPool

def prroi_pool_forward(input, rois, output_size, spatial_scale=1.0, position_sensitive=False, *, out=None,
                       stream=None, scalar_type=None):
    """Precise RoI Pooling forward: the exact mean of the bilinearly
    interpolated (zero-padded) feature over each bin."""
    rois, input, out = _arrays(rois, (input, "input"), (out, "out"))
    if _is_numpy(input):
        return _cpu_forward("prroi_pool", input, rois, output_size_pair(output_size), float(spatial_scale),
                            bool(position_sensitive))
    call = _Call(input, input.shape, rois, output_size, position_sensitive, stream, scalar_type, "input")
    out = call.output(out, input)
    call.run(_rules.prroi_pool_forward, _view(input), call.shape, _ptr(call.rows), call.k, call.output_size,
             float(spatial_scale), _view(out))
    return out


def prroi_pool_backward(grad_output, input, rois, output_size, spatial_scale=1.0, position_sensitive=False,
                        *, rois_grad=True, grad_input=None, grad_rois=None, stream=None, scalar_type=None,
                        deterministic=False):
    """Gradients of :func:`prroi_pool_forward` w.r.t. the input and, with
    ``rois_grad``, the RoI rows ``[K, 5]`` (column 0, the batch index, gets 0).
    Returns ``(grad_input, grad_rois or None)``; ``grad_rois``, if given, must
    be a zero-filled accumulation buffer."""
    rois, grad_output, input, grad_input, grad_rois = _arrays(
        rois, (grad_output, "grad_output"), (input, "input"), (grad_input, "grad_input"), (grad_rois, "grad_rois"))
    if _is_numpy(grad_output):
        res = _cpu_backward("prroi_pool", grad_output, input, rois, output_size_pair(output_size),
                            float(spatial_scale), bool(position_sensitive), rois_grad=rois_grad)
        return res if rois_grad else (res, None)
    call = _Call(input, input.shape, rois, output_size, position_sensitive, stream, scalar_type, "input")
    call.check_grad_output(grad_output)
    grad_input = call.grad_input(grad_input, input)
    if rois_grad:
        if grad_rois is None:
            with call.cupy.cuda.Device(call.device), call.stream:
                grad_rois = call.cupy.zeros((call.k, 5), call.acc)
        _check_array(grad_rois, (call.k, 5), np.dtype(call.acc), "grad_rois", call.device)
        if not grad_rois.flags.c_contiguous:
            raise ValueError("grad_rois must be C-contiguous")
    fixed, max_grad = call.gradient_sink(grad_output, call.shape, grad_input, deterministic)
    partials = None
    if fixed is not None and rois_grad:
        with call.cupy.cuda.Device(call.device), call.stream:
            partials = call.cupy.zeros(_rules.prroi_coordinate_partials(call.k, call.output_size, call.shape,
                                                                        call.ps), call.acc)
    call.run(_rules.prroi_pool_backward, _view(grad_output), _view(input), call.shape, _ptr(call.rows), call.k,
             call.output_size, float(spatial_scale), _view(grad_input if fixed is None else fixed),
             _ptr(grad_rois) if rois_grad else 0, 0 if fixed is None else _ptr(max_grad),
             0 if partials is None else _ptr(partials))
    if fixed is not None:
        call.finish_gradient("prroi_pool", fixed, max_grad, grad_input)
    return grad_input, (grad_rois if rois_grad else None)
