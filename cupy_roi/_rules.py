"""Argument rules shared by the two front ends (torch ops and the array API):
sizes, channel counts, shape checks, layouts, launch shapes, and each kernel's
argument list, from plain integers. Nothing here touches an array, so the two
front ends cannot drift apart and neither pays for the other's objects.

A *view* is ``(device pointer, strides in elements)`` of an ``(N, C, H, W)``
array (or ``(K, C, ph, pw)`` for outputs).
"""
import functools
import math

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


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@functools.lru_cache(maxsize=256)
def _channel_block(channels, image_planes_bytes, l2_bytes, bin_bytes):
    if bin_bytes < 32:
        return channels
    most = max(1, (l2_bytes // 3) // max(image_planes_bytes, 1))
    return max(b for b in range(1, min(most, channels) + 1) if channels % b == 0)


def channel_block(device, strides, shape, size, c_out, itemsize):
    """The flat-grid kernels' work order (``channel_block`` in
    cuda_src/roi_common.cuh). 0, channels fastest, for a channels-last map
    (coalesced reads). Otherwise blocks of B of the ``c_out`` output channels,
    B the largest divisor of ``c_out`` whose input planes of every image (B *
    C / c_out * N * H * W * itemsize bytes) fit in a third of L2: the threads
    running together then read (or add to) planes L2 holds; B = c_out,
    RoI-major order, where the whole map fits. B = c_out too where one RoI's
    bins of one channel fill less than a 32-byte sector: the scattered output
    writes of a smaller block would cost more than the reuse gains.
    ``itemsize``: of the map read (forward) or the buffer added to (backward)."""
    if channels_fastest(strides, shape):
        return 0
    if c_out <= 1:  # one channel, or none (nothing is launched)
        return 1
    n, c, h, w = shape
    return _channel_block(c_out, n * h * w * (c // c_out) * itemsize, _kernels.l2_cache_bytes(device),
                          size[0] * size[1] * itemsize)


@functools.lru_cache(maxsize=256)
def _channels_last_block(channels, map_bytes, image_channel_bytes, l2_bytes, multiple):
    budget = l2_bytes // 3
    if map_bytes <= budget:
        return 0
    fits = [b for b in range(multiple, channels, multiple) if channels % b == 0 and b * image_channel_bytes <= budget]
    return -max(fits) if fits else 0


def channels_last_block(device, shape, c_out, itemsize):
    """The RoIAlign forward's work order on a channels-last map, where
    :func:`channel_block` gives 0 (channels fastest): -B, blocks of B
    channels walked channels fastest (``channel_block`` < 0 in
    cuda_src/roi_common.cuh), B the largest divisor of ``c_out`` below it,
    a multiple of 8 (the group of 8 channels a thread computes there), whose
    channels of one image fit in a third of L2; 0 (all channels) where the
    whole map fits or no such B does. The threads running together hold a few
    hundred RoIs, most of one image when RoIs come grouped by image as
    detectors give them: channels fastest over all C they read from the whole
    image (56 MB for Mask R-CNN's 256 x 200 x 272 float32 level), more than
    L2 holds, and fetched the map five times from DRAM (benchmarks/NOTES.md,
    session 20)."""
    n, c, h, w = shape
    return _channels_last_block(c_out, n * c * h * w * itemsize, h * w * (c // c_out) * itemsize,
                                _kernels.l2_cache_bytes(device), 8)


def _group_target(channels_fastest_order):
    """Output channels per thread the grouped forwards aim for, by work order.
    Measured on an H200 (benchmarks/NOTES.md, sessions 12-13; RoIAlign
    forward, float32 and float16): channels-last maps gain most from 8 (the 8
    values of a corner share sectors); NCHW maps from 4 (8 thrashes L1 on
    large boxes, and 72 registers a thread already halve the warps)."""
    return 8 if channels_fastest_order else 4


def channels_per_thread(scalar, ps, c_out, block, target=None):
    """Output channels one thread of a grouped kernel (``_kernels.GROUPED``:
    the RoIAlign, multi-level RoIAlign, RoIPool and PrRoIPool forwards, the
    RoIAlign backwards' thread mode on channels-last buffers, and PrRoIPool's
    coordinate kernel) computes: the largest compiled value
    (``_kernels.CHANNELS_PER_THREAD``) up to ``target`` (default: the
    forwards' :func:`_group_target`) that divides ``c_out`` and the channel
    block ``block`` (0 or below: channels fastest), so that groups tile the work order
    exactly; else 1. 1 for position-sensitive pooling (R-FCN's 21 channels per
    bin measured no gain) and float64 (twice the registers; not measured)."""
    if ps or scalar == "float64":
        return 1
    if target is None:
        target = _group_target(block <= 0)
    for cpt in _CHANNELS_PER_THREAD_DOWN:
        if cpt <= target and c_out % cpt == 0 and block % cpt == 0:
            return cpt
    return 1


_CHANNELS_PER_THREAD_DOWN = sorted(_kernels.CHANNELS_PER_THREAD, reverse=True)


#: kWarpBins of cuda_src/roi_common.cuh: the most bins per axis of RoIAlign's warp-mode backwards
WARP_BINS = 16
#: channels one warp of a warp-mode backward may take, most first: kWarpChannels of
#: cuda_src/roi_common.cuh (the column weights are worked out once for all of them) and its divisors
WARP_CHANNELS = (4, 2, 1)


def channels_per_warp(family, ps, size, block, c_out):
    """The RoIAlign and PrRoIPool backwards' work mode: 0 for a thread per
    bin (RoIAlign) or per output element of a block's RoI chunk (PrRoIPool),
    or the channels of one RoI a warp scatters through the separable weights,
    its lanes over pixel columns: the largest of :data:`WARP_CHANNELS` that
    divides ``c_out``. Only for plain pooling (a
    position-sensitive bin reads its own plane) over channel blocks (a
    channels-last buffer puts a row's pixels C elements apart, so the lanes'
    atomics would not share sectors; bin by bin they do, lanes over
    channels); for ``family`` "roi_align" (multi-level too) at most
    ``WARP_BINS`` bins per axis (its lanes hold every bin's column weight),
    for "prroi_pool" any number (a lane holds the few bins its column meets).
    It depends on the call's shape alone, never on the device's channel
    block (:func:`warp_channel_block` fits the block to it instead): a warp
    sums PrRoIPool's box gradient over its channels, so the deterministic
    backward's bits would otherwise follow the GPU's L2 size."""
    if ps or block == 0 or (family == "roi_align" and max(size) > WARP_BINS):
        return 0
    return next(w for w in WARP_CHANNELS if c_out % w == 0)


def warp_channel_block(block, per_warp):
    """The channel block of a warp-mode launch: ``block`` rounded up to a
    multiple of ``per_warp`` (their least common multiple, which still divides
    the channel count: both do), so that channel groups tile the blocks."""
    return math.lcm(block, per_warp) if per_warp else block


def backward_work_order(family, device, ps, strides, shape, size, c_out, scalar, max_grad):
    """(channel block, channels per warp) of a backward that has a warp mode:
    :func:`channel_block` for the gradient buffer (``strides``, ``shape``),
    rounded up by :func:`warp_channel_block` where :func:`channels_per_warp`
    picks the warp mode (0 channels per warp: the thread or block mode)."""
    block = channel_block(device, strides, shape, size, c_out, _grad_itemsize(scalar, max_grad))
    per_warp = channels_per_warp(family, ps, size, block, c_out)
    return warp_channel_block(block, per_warp), per_warp


def _grad_itemsize(scalar, max_grad):
    """Bytes of a backward's accumulation buffer element: int64 fixed point
    for the deterministic backward, else the accumulation type."""
    return 8 if max_grad or scalar == "float64" else 4


# ---------------------------------------------------------------------------
# launches: (device, stream handle, scalar type name, position-sensitive) first,
# then the op's sizes and views, in the order of the kernel's parameters.
# Backward kernels walk the bins in the order of the gradient buffer's layout:
# their atomics, not their reads, decide how well memory accesses coalesce.
# Their last argument, max_grad, is 0 for float atomics into an
# accumulation-dtype buffer, or, for the deterministic backward, a device
# pointer to max|grad_output| in its scalar type, with the buffer holding int64
# fixed point (GradSink in cuda_src/roi_common.cuh) that fixed_point_gradient
# then converts.

def _run(family, kernel, device, stream, scalar, ps, total, args, blocks=None, cpt=1, **launch):
    """``total``: output elements; a grouped kernel runs ``total / cpt`` threads.
    ``launch``: :func:`_kernels.launch`'s block size and shared memory."""
    if total == 0:
        return
    fn = _kernels.get_function(family, kernel, scalar, ps, device, cpt)
    _kernels.launch(fn, blocks or _kernels.blocks_for(total // cpt), stream, args, **launch)


@functools.lru_cache(maxsize=256)
def _image_order(map_bytes, l2_bytes, n, k):
    return 1 < n <= _kernels.MAX_ORDER_IMAGES and 1 < k < 2 ** 31 and map_bytes > l2_bytes // 3


def roi_order_bytes(device, scalar, ps, shape, k):
    """Bytes of the workspace the RoIAlign forward and backwards take to walk
    their ``k`` RoIs image by image (``roi_image_order`` in
    cuda_src/roi_align.cu), or 0 where they walk them as given: plain
    RoIAlign on a map of several images larger than a third of L2. Rows that
    come in any order of images make the RoIs running together read every
    image's map, which L2 cannot hold: Mask R-CNN 7x7 float32 (H100, session
    20), channels-last 1.55 ms with RoIs shuffled across images against 0.74
    in image order. The front end allocates the workspace (``int32[k]``) and
    passes it to :func:`roi_align_forward`, :func:`roi_align_backward` or
    :func:`multi_scale_roi_align_backward` (for its finest level)."""
    n, c, h, w = shape
    if ps or not _image_order(n * c * h * w * _ITEMSIZE[scalar], _kernels.l2_cache_bytes(device), n, k):
        return 0
    return 4 * k


def backward_channels_last(device, scalar, ps, shape, k, deterministic):
    """Whether the RoIAlign backward of an NCHW map adds into a channels-last
    buffer, copied to NCHW afterwards (:func:`channels_last_to_nchw`, which
    also does the half types' conversion to their dtype): where the RoIs go
    image by image (:func:`roi_order_bytes`: maps past a third of L2), with
    float atomics (not the deterministic backward) in a float type but
    float64, channels a multiple of 8 (:func:`channels_per_thread`), where
    the tile backward does not apply (:func:`backward_tiles`: it writes NCHW
    itself). The
    channels-last backward adds 16-byte vectors of 4 channels, 8 channels a
    thread; NCHW's warp mode was bound by L2's atomic operations on scattered
    columns. Measured (Mask R-CNN 7x7 float32, H100, session 21, ncu): the
    warp mode's kernel 5.03 ms; the channels-last kernel 2.25 ms plus 0.85 ms
    for the copy; forward+backward 8.37 -> 5.92 ms (graph replay). Peak
    memory: the float buffer and the NCHW result live together (for float32,
    one map's size more than adding into the result itself)."""
    n, c, h, w = shape
    return bool(not deterministic and scalar != "float64" and c % 8 == 0
                and roi_order_bytes(device, scalar, ps, shape, k))


def channels_last_to_nchw(device, stream, scalar, src, shape, dst):
    """The contiguous channels-last accumulation buffer at ``src`` (float, or
    float64 for float64) of ``shape`` (N, C, H, W) as the contiguous NCHW
    array of type ``scalar`` at ``dst``."""
    n, c, h, w = shape
    tiles = n * -(-c // 32) * -(-(h * w) // 32)
    _run("roi_align", "channels_last_to_nchw", device, stream, scalar, False, tiles * _kernels.BLOCK,
         (src, n, c, h * w, dst))


#: roi_align.cu's kOrderThreads: roi_image_order's one block
ORDER_THREADS = 1024


def _fill_order(device, stream, scalar, rows, k, n, order, total, starts=0):
    """Lists the ``k`` RoIs image by image into the workspace ``order`` (0:
    none) ahead of a RoIAlign launch of ``total`` threads (none: nothing),
    and where each image's begin into ``starts`` (0: not)."""
    if order and total:
        _run("roi_align", "roi_image_order", device, stream, scalar, False, 1, (rows, k, n, order, starts),
             blocks=1, threads=ORDER_THREADS)


#: roi_align.cu's plane mode: kPlaneThreads, kPlaneSamples, sizeof(PlaneRoi<float>)
PLANE_THREADS, PLANE_SAMPLES, PLANE_ROI_BYTES = 1024, 32, 1040
#: samples (RoIs x bins x sampling grid) a map cell, at least, for the plane mode, by (item size,
#: more than 196 samples a RoI): where the plane's copy and constant cost a sample beat the flat
#: grid's L2 reads, whose cost a sample falls as a RoI's samples crowd (14x14 bins on the same
#: boxes). Measured on the Mask R-CNN map, detector-like boxes (benchmarks/plane_rule.py, H100,
#: session 22): break-even near 0.3 (float32, 7x7), 1.8 (float32, 14x14), 0.9 (float16, 7x7),
#: 0.8 (float16, 14x14) samples a cell.
PLANE_MIN_SAMPLES_PER_CELL = {(4, False): 0.4, (4, True): 2.0, (2, False): 1.0, (2, True): 0.9}


def plane_stride(w, scalar):
    """Elements between the plane's rows in shared memory: whole 16-byte
    vectors, so that rows copy 16 bytes at a time."""
    v = 16 // _ITEMSIZE[scalar]
    return -(-w // v) * v


@functools.lru_cache(maxsize=256)
def _plane_bytes(scalar, ps, column_stride, fastest, shape, size, sampling_ratio):
    n, c, h, w = shape
    ph, pw = size
    if ps or scalar == "float64" or column_stride != 1 or fastest or 2 * n > _kernels.MAX_ORDER_IMAGES:
        return 0
    if sampling_ratio not in (1, 2, 4):
        return 0
    if max(ph, pw) * sampling_ratio > PLANE_SAMPLES:
        return 0
    return (h + 1) * plane_stride(w, scalar) * _ITEMSIZE[scalar]  # and a zero row


@functools.lru_cache(maxsize=256)
def _plane_pays(map_bytes, l2_bytes, itemsize, roi_samples, k, cells):
    least = PLANE_MIN_SAMPLES_PER_CELL.get((itemsize, roi_samples > 196))  # none for float64
    return least is not None and map_bytes > l2_bytes // 3 and k * roi_samples >= least * cells


def plane_split_row(h):
    """The plane forward's first copy: rows 0 .. plane_split_row(h) of each
    plane, then the rest. The RoIs that read no further (the first of each
    image's two parts in roi_plane_order's list) pool while the rest comes. A third:
    Mask R-CNN 7x7 float32 1.060 -> 1.021 ms with a third, 1.017-1.030 with a
    quarter or a half (H100, session 27)."""
    return max(1, h // 3)


def forward_plane(device, scalar, ps, strides, shape, size, sampling_ratio, k):
    """Shared memory of the RoIAlign forward's plane mode
    (``roi_align_forward_plane``: a block per image and channel pools every
    RoI of the image from the plane in shared memory), or 0 for the flat
    grid. For NCHW-like maps (unit column stride) too large for a third of
    L2, where the flat grid's reads of overlapping RoIs through L2 bound it:
    plain RoIAlign in a float type but float64, a fixed sampling grid of 1,
    2 or 4 with at most 32 samples an axis, a plane (and a row of zeros) that
    fits the device's shared memory, at most 2048 images (roi_plane_order
    lists each image's RoIs in two parts), and enough samples per map cell that
    copying whole planes pays (:data:`PLANE_MIN_SAMPLES_PER_CELL`). Mask
    R-CNN's map with 512 RoIs an image (float32, H100, kernel time): 7x7
    2.47 -> 1.41 ms, 14x14 (128 RoIs an image) left to the flat grid
    (1.06 against 1.05)."""
    n, c, h, w = shape
    item = _ITEMSIZE[scalar]
    if not _plane_pays(n * c * h * w * item, _kernels.l2_cache_bytes(device), item,
                       size[0] * size[1] * sampling_ratio ** 2, k, n * h * w):
        return 0
    if not 0 < k < 2 ** 31 // 8:
        return 0
    shared = _plane_bytes(scalar, ps, strides[3], channels_fastest(strides, shape), tuple(shape), tuple(size),
                          sampling_ratio)
    return shared if shared and shared <= _kernels.shared_bytes_optin(device) else 0


#: roi_align.cu's kWidthClasses and kPlaceThreads (roi_plane_order)
WIDTH_CLASSES, PLACE_THREADS = 128, 256


def _plane_workspace(k, n):
    """(bytes, table offset, slots offset, counts offset) of the plane mode's
    workspace: the RoI order and where each image's RoIs begin, in two parts
    (int32[k + 2 n + 2]), then the geometry table (16-byte aligned), each
    RoI's bucket and rank in it (int32[k, 2]), then the RoIs of each bucket
    and of each part (int32[(2 n + 1) * (WIDTH_CLASSES + 1)], 16-byte
    aligned)."""
    table = -(-4 * (k + 2 * n + 2) // 16) * 16
    slots = table + PLANE_ROI_BYTES * k
    counts = -(-(slots + 8 * k) // 16) * 16
    return counts + 4 * (2 * n + 1) * (WIDTH_CLASSES + 1), table, slots, counts


def roi_align_forward_workspace(device, scalar, ps, strides, shape, size, sampling_ratio, k):
    """Bytes of the workspace :func:`roi_align_forward` takes (``order``):
    the plane mode's (:func:`forward_plane`), or :func:`roi_order_bytes`."""
    if forward_plane(device, scalar, ps, strides, shape, size, sampling_ratio, k):
        return _plane_workspace(k, shape[0])[0]
    return roi_order_bytes(device, scalar, ps, shape, k)


def roi_align_forward(device, stream, scalar, ps, x, shape, rows, k, size, scale, sampling_ratio, aligned, out,
                      order=0):
    """``order``: 0, or the device pointer of the workspace of
    :func:`roi_align_forward_workspace` bytes, which it fills first."""
    n, c, h, w = shape
    ph, pw = size
    shared = forward_plane(device, scalar, ps, x[1], shape, size, sampling_ratio, k) if order else 0
    if shared:
        stride = plane_stride(w, scalar)
        _, table, slots, counts = (order + at for at in _plane_workspace(k, n))
        split, parts, item = plane_split_row(h), 2 * n + 1, _ITEMSIZE[scalar]
        _run("roi_align", "zero_ints", device, stream, scalar, False, parts * (WIDTH_CLASSES + 1),
             (counts, parts * (WIDTH_CLASSES + 1)))
        _run("roi_align", "roi_align_plane_geometry", device, stream, scalar, False, 32 * k,
             (rows, k, n, h, w, stride * item, item, ph, pw, scale, sampling_ratio, aligned, table, 0, 0, split,
              slots, counts))
        _run("roi_align", "roi_plane_order", device, stream, scalar, False, 32 * k, (slots, k, parts, counts, order),
             threads=PLACE_THREADS)
        _run("roi_align", "roi_align_forward_plane", device, stream, scalar, False, n * c * PLANE_THREADS,
             (x[0], n, h, w, *x[1], k, ph, pw, sampling_ratio, stride, split, order, table, out[0], *out[1]),
             blocks=n * c, threads=PLANE_THREADS, shared=shared)
        return
    c_out = c // (ph * pw) if ps else c
    block = channel_block(device, x[1], shape, size, c_out, _ITEMSIZE[scalar])
    if block == 0 and not ps:
        block = channels_last_block(device, shape, c_out, _ITEMSIZE[scalar])
    total = k * c_out * ph * pw
    _fill_order(device, stream, scalar, rows, k, n, order, total)
    _run("roi_align", "roi_align_forward", device, stream, scalar, ps, total, (
        x[0], n, h, w, *x[1], rows, k, c_out, ph, pw, scale, sampling_ratio, aligned, block, out[0], *out[1], order),
        cpt=channels_per_thread(scalar, ps, c_out, block))


#: roi_align.cu's tile backward: channels a block, pixels a tile (rows: a warp each, columns), and a
#: block's dynamic shared memory (the sums and the listed RoIs' samples)
TILE_CHANNELS, TILE_ROWS, TILE_COLS, TILE_SHARED_BYTES = 256, 8, 8, 73728


def backward_tiles(device, scalar, ps, shape, size, sampling_ratio, k, deterministic):
    """Whether the RoIAlign backward gathers by tiles (``roi_align_backward_tiles``:
    a block sums every sample that reaches its 8 x 8 pixels and 256 channels,
    a warp a row, then writes them once; no atomics, no zero fill) instead of adding each
    sample's corners with atomics. Plain RoIAlign, float types but float64,
    not deterministic (the sums' order follows the RoI order of each image,
    which roi_image_order builds with atomics), a fixed sampling grid with at
    most 32 samples an axis (the geometry table's), channels a multiple of 4,
    maps of at most 32767 pixels a side (the table's reach) past a third of L2
    (where the RoIs go image by image, :func:`roi_order_bytes`). Measured
    (Mask R-CNN map, 512 RoIs an image, float32, H200, session 23, graph
    replay, forward+backward against the atomic backward): 7x7 NCHW 4.24 ->
    3.20 ms, channels-last 2.85 -> 2.46; 14x14 3.77 -> 2.50 and 2.59 ->
    1.93. Not measured to lose anywhere it applies; not tried on maps that
    fit L2, whose atomics L2 absorbs."""
    n, c, h, w = shape
    ph, pw = size
    return bool(not ps and not deterministic and scalar != "float64" and c % 4 == 0
                and 1 <= sampling_ratio and max(ph, pw) * sampling_ratio <= PLANE_SAMPLES
                and max(h, w) <= 32767 and 0 < k < 2 ** 31 // 8 and _tile_blocks(shape) < 2 ** 31
                and roi_order_bytes(device, scalar, ps, shape, k))


def _tile_blocks(shape):
    n, c, h, w = shape
    return n * -(-h // TILE_ROWS) * -(-w // TILE_COLS) * -(-c // TILE_CHANNELS)


def _tile_workspace(grad_strides, k, shape, size, scalar):
    """(bytes, table offset, reach offset, gradient copy offset or 0) of the
    tile backward's workspace: the plane mode's order and table, each RoI's
    reach (4 shorts, in the order's places) where the plane mode has its
    slots, then grad_output laid out channels fastest where it is not."""
    _, table, reach, _ = _plane_workspace(k, shape[0])
    nbytes = reach + 8 * k
    if grad_strides[1] == 1 and all(0 <= s < 2 ** 23 for s in grad_strides[2:]):  # bin byte offsets in 32 bits
        return nbytes, table, reach, 0
    copy = -(-nbytes // 16) * 16
    return copy + k * shape[1] * size[0] * size[1] * _ITEMSIZE[scalar], table, reach, copy


def _tiles_apply(device, scalar, ps, shape, size, sampling_ratio, k, deterministic, fresh):
    # a caller's accumulation buffer of another type than the gradient's keeps the atomics
    return backward_tiles(device, scalar, ps, shape, size, sampling_ratio, k, deterministic) and (
        fresh or scalar == "float32")


def roi_align_backward_workspace(device, scalar, ps, grad_strides, shape, size, sampling_ratio, k,
                                 deterministic=False, fresh=False):
    """Bytes of the workspace :func:`roi_align_backward` takes (``order``) with
    the same arguments: the tile backward's (:func:`backward_tiles`), or
    :func:`roi_order_bytes`."""
    if _tiles_apply(device, scalar, ps, shape, size, sampling_ratio, k, deterministic, fresh):
        return _tile_workspace(grad_strides, k, shape, size, scalar)[0]
    return roi_order_bytes(device, scalar, ps, shape, k)


def _backward_by_tiles(device, stream, scalar, grad, shape, rows, k, size, scale, sampling_ratio, aligned,
                       grad_input, order, fresh):
    n, c, h, w = shape
    ph, pw = size
    _, table, reach, copy = _tile_workspace(grad[1], k, shape, size, scalar)
    table, reach = order + table, order + reach
    if copy:
        _run("roi_align", "tile_gradient_channels_last", device, stream, scalar, False,
             k * -(-c // 32) * _kernels.BLOCK, (grad[0], *grad[1], k, c, ph, pw, order + copy))
        grad = (order + copy, (c * ph * pw, 1, pw * c, c))
    _fill_order(device, stream, scalar, rows, k, n, order, k, starts=order + 4 * k)
    _run("roi_align", "roi_align_plane_geometry", device, stream, scalar, False, 32 * k,
         (rows, k, n, h, w, 1, 1, ph, pw, scale, sampling_ratio, aligned, table, order, reach, 0, 0, 0))
    blocks = _tile_blocks(shape)
    _run("roi_align", "roi_align_backward_tiles", device, stream, scalar, False, blocks * 32 * TILE_ROWS,
         (grad[0], *grad[1], k, c, ph, pw, sampling_ratio, order, table, reach, grad_input[0], n, h, w, *grad_input[1],
          0 if fresh else 1),
         blocks=blocks, threads=32 * TILE_ROWS, shared=TILE_SHARED_BYTES)


def roi_align_backward(device, stream, scalar, ps, grad, size_in, rows, k, size, scale, sampling_ratio, aligned,
                       grad_input, max_grad=0, order=0, fresh=False):
    """``order``: 0, or the device pointer of the workspace of
    :func:`roi_align_backward_workspace` bytes (the same arguments). Where
    :func:`backward_tiles` applies, the tile backward writes ``grad_input``:
    ``fresh``, it holds nothing yet and has the gradient's type; otherwise
    it is the caller's accumulation buffer (float32 only), added to. Else a
    buffer walked channels fastest (channels-last) takes
    :func:`channels_per_thread` channels a thread, in
    :func:`channels_last_block` blocks where its map exceeds a third of L2
    (:func:`_backward_groups`): Mask R-CNN 7x7 float32 channels-last
    forward+backward 3.41 ms against 6.24 for a thread per bin over all
    channels with RoIs as given (H100, session 21, graph replay)."""
    n, c, h, w = size_in
    ph, pw = size
    if order and _tiles_apply(device, scalar, ps, size_in, size, sampling_ratio, k, bool(max_grad), fresh):
        _backward_by_tiles(device, stream, scalar, grad, size_in, rows, k, size, scale, sampling_ratio, aligned,
                           grad_input, order, fresh)
        return
    c_out = c // (ph * pw) if ps else c
    block, per_warp = backward_work_order("roi_align", device, ps, grad_input[1], size_in, size, c_out, scalar,
                                          max_grad)
    block, cpt = _backward_groups(device, scalar, ps, size_in, c_out, block, max_grad)
    total = _backward_threads(k, c_out, size, per_warp)
    _fill_order(device, stream, scalar, rows, k, n, order, total)
    _run("roi_align", "roi_align_backward", device, stream, scalar, ps, total, (
        grad[0], *grad[1], rows, k, c_out, ph, pw, scale, sampling_ratio, aligned, block, per_warp,
        grad_input[0], n, h, w, *grad_input[1], max_grad, order), cpt=cpt)


def _backward_groups(device, scalar, ps, shape, c_out, block, max_grad):
    """(channel block, channels per thread) of a RoIAlign backward's thread
    mode: on a buffer walked channels fastest (block 0), plain RoIAlign
    takes :func:`channels_per_thread` channels a thread, in
    :func:`channels_last_block` blocks of the buffer's elements where its map
    exceeds a third of L2."""
    if block != 0 or ps:
        return block, 1
    cpt = channels_per_thread(scalar, ps, c_out, 0)
    if cpt > 1:
        block = channels_last_block(device, shape, c_out, _grad_itemsize(scalar, max_grad))
    return block, cpt


def _backward_threads(k, c_out, size, per_warp):
    """Threads of a backward with a warp mode: one a bin, or a warp per channels_per_warp channels of a RoI."""
    return k * c_out * size[0] * size[1] if not per_warp else k * (c_out // per_warp) * 32


def roi_align_rotated_forward(device, stream, scalar, x, shape, rows, k, size, scale, sampling_ratio, aligned,
                              clockwise, out):
    """``rows``: pointer to ``[K, 6]`` rows ``(batch_index, cx, cy, w, h, theta)``."""
    n, c, h, w = shape
    ph, pw = size
    _run("roi_align", "roi_align_rotated_forward", device, stream, scalar, False, k * c * ph * pw, (
        x[0], n, h, w, *x[1], rows, k, c, ph, pw, scale, sampling_ratio, aligned, clockwise,
        channel_block(device, x[1], shape, size, c, _ITEMSIZE[scalar]), out[0], *out[1]))


def roi_align_rotated_backward(device, stream, scalar, grad, size_in, rows, k, size, scale, sampling_ratio,
                               aligned, clockwise, grad_input, max_grad=0):
    n, c, h, w = size_in
    ph, pw = size
    _run("roi_align", "roi_align_rotated_backward", device, stream, scalar, False, k * c * ph * pw, (
        grad[0], *grad[1], rows, k, c, ph, pw, scale, sampling_ratio, aligned, clockwise,
        channel_block(device, grad_input[1], size_in, size, c, _grad_itemsize(scalar, max_grad)),
        grad_input[0], n, h, w, *grad_input[1], max_grad))


# Level mappings of multi-level RoIAlign (the kernel's pyramid_level modes).
MAPPINGS = {"torchvision": 1, "mmdet": 2}


def check_levels(shapes, scales):
    """Pyramid levels: 1 to MAX_LEVELS maps of one batch size and channel
    count, one positive scale each."""
    if not 1 <= len(shapes) <= _kernels.MAX_LEVELS:
        raise ValueError(f"features must hold 1 to {_kernels.MAX_LEVELS} pyramid levels, got {len(shapes)}")
    if len(scales) != len(shapes):
        raise ValueError(f"spatial_scales must give one scale per level: {len(shapes)} levels, "
                         f"{len(scales)} scales")
    for i, shape in enumerate(shapes):
        check_shape4(shape, f"features[{i}]")
        if tuple(shape[:2]) != tuple(shapes[0][:2]):
            raise ValueError(f"features[{i}] must have the (N, C) of features[0], {tuple(shapes[0][:2])}, "
                             f"got {tuple(shape[:2])}")
    for i, sc in enumerate(scales):
        if not sc > 0:
            raise ValueError(f"spatial_scales[{i}] must be positive, got {sc}")


def level_range(spatial_scales):
    """torchvision's k_min, k_max: -log2 of the first and the last scale,
    computed in float32 and truncated to int."""
    import numpy as np

    return tuple(int(-np.log2(np.float32(s))) for s in (spatial_scales[0], spatial_scales[-1]))


def level_mapping(mapping, scales, canonical_scale, canonical_level, finest_scale):
    """The kernel's (mode, s0, lvl0, lo, hi) for a level mapping over levels
    with these scales. One level takes every RoI (torchvision skips its
    mapper then)."""
    levels = len(scales)
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be one of {sorted(MAPPINGS)}, got {mapping!r}")
    if levels == 1:
        return 0, 1.0, 0, 0, 0
    if mapping == "torchvision":  # levels past the last map leave their rows zero, as in torchvision
        k_min, k_max = level_range(scales)
        return 1, float(canonical_scale), int(canonical_level), k_min, k_max
    return 2, float(finest_scale), 0, 0, levels - 1


def _level_table(views, shapes, scales):
    """The LevelTable argument: pointers, strides, scales, sizes, count."""
    pad = _kernels.MAX_LEVELS - len(views)
    ptrs = [v[0] for v in views] + [0] * pad
    strides = [[v[1][d] for v in views] + [0] * pad for d in range(4)]
    return (*ptrs, *strides[0], *strides[1], *strides[2], *strides[3], *(float(s) for s in scales), *[0.0] * pad,
            *(s[2] for s in shapes), *[0] * pad, *(s[3] for s in shapes), *[0] * pad, len(views))


def multi_scale_roi_align_forward(device, stream, scalar, views, shapes, scales, rows, k, size, mapping,
                                  sampling_ratio, aligned, out):
    """``views``/``shapes``/``scales``: per level; ``mapping``: level_mapping()'s tuple."""
    n, c = shapes[0][:2]
    ph, pw = size
    block = channel_block(device, views[0][1], shapes[0], size, c, _ITEMSIZE[scalar])
    _run("roi_align", "multi_scale_roi_align_forward", device, stream, scalar, False, k * c * ph * pw, (
        *_level_table(views, shapes, scales), n, rows, k, c, ph, pw, *mapping, sampling_ratio, aligned, block,
        out[0], *out[1]), cpt=channels_per_thread(scalar, False, c, block))


def multi_scale_roi_align_backward(device, stream, scalar, grad, grad_views, shapes, scales, rows, k, size, mapping,
                                   sampling_ratio, aligned, max_grad=0, order=0):
    """``order``: 0, or the workspace of :func:`roi_order_bytes` for the
    finest level's shape. Work order and modes as :func:`roi_align_backward`
    gives them for the finest level."""
    n, c = shapes[0][:2]
    ph, pw = size
    block, per_warp = backward_work_order("roi_align", device, False, grad_views[0][1], shapes[0], size, c, scalar,
                                          max_grad)
    block, cpt = _backward_groups(device, scalar, False, shapes[0], c, block, max_grad)
    total = _backward_threads(k, c, size, per_warp)
    _fill_order(device, stream, scalar, rows, k, n, order, total)
    _run("roi_align", "multi_scale_roi_align_backward", device, stream, scalar, False, total, (
        grad[0], *grad[1], *_level_table(grad_views, shapes, scales), n, rows, k, c, ph, pw, *mapping,
        sampling_ratio, aligned, block, per_warp, max_grad, order), cpt=cpt)


def roi_pool_forward(device, stream, scalar, ps, x, shape, rows, k, size, scale, out, argmax):
    """``argmax``: pointer to a contiguous int32 ``(K, C, ph, pw)`` (0 for PSRoIPool)."""
    n, c, h, w = shape
    ph, pw = size
    c_out = c // (ph * pw) if ps else c
    block = channel_block(device, x[1], shape, size, c_out, _ITEMSIZE[scalar])
    _run("roi_pool", "roi_pool_forward", device, stream, scalar, ps, k * c_out * ph * pw, (
        x[0], n, h, w, *x[1], rows, k, c_out, ph, pw, scale, block, out[0], *out[1], argmax),
        cpt=channels_per_thread(scalar, ps, c_out, block))


def roi_pool_backward(device, stream, scalar, ps, grad, size_in, rows, k, size, scale, argmax, grad_input,
                      max_grad=0):
    n, c, h, w = size_in
    ph, pw = size
    c_out = c // (ph * pw) if ps else c
    _run("roi_pool", "roi_pool_backward", device, stream, scalar, ps, k * c_out * ph * pw, (
        grad[0], *grad[1], rows, k, c_out, ph, pw, scale,
        channel_block(device, grad_input[1], size_in, size, c_out, _grad_itemsize(scalar, max_grad)), argmax,
        grad_input[0], n, h, w, *grad_input[1], max_grad))


def prroi_pool_forward(device, stream, scalar, ps, x, shape, rows, k, size, scale, out):
    n, c, h, w = shape
    ph, pw = size
    c_out = c // (ph * pw) if ps else c
    block = channel_block(device, x[1], shape, size, c_out, _ITEMSIZE[scalar])
    _run("prroi_pool", "prroi_pool_forward", device, stream, scalar, ps, k * c_out * ph * pw, (
        x[0], n, h, w, *x[1], rows, k, c_out, ph, pw, scale, block, out[0], *out[1]),
        cpt=channels_per_thread(scalar, ps, c_out, block))


def prroi_backward_grid(k, per_roi, target_blocks=4096):
    """Blocks per RoI (chunks) so that the grid fills the GPU while each block's
    coordinate-gradient reduction still covers many output elements."""
    max_chunks = max(1, -(-per_roi // _kernels.BLOCK))
    chunks = min(max_chunks, max(1, -(-target_blocks // max(k, 1))))
    return chunks, max(1, min(k * chunks, 1 << 22))


def prroi_coordinate_partials(k, size, shape, ps):
    """Length of the deterministic backward's per-block (or, warp mode, per
    RoI and channel group) coordinate sums: enough for either mode, as the
    launch picks the mode from the gradient buffer's layout, which this
    does not see."""
    ph, pw = size
    c_out = shape[1] // (ph * pw) if ps else shape[1]
    groups = 0 if ps else c_out  # at least c_out / channels_per_warp
    return k * max(prroi_backward_grid(k, c_out * ph * pw)[0], groups) * 4


def prroi_pool_backward(device, stream, scalar, ps, grad, x, shape, rows, k, size, scale, grad_input, grad_rows,
                        max_grad=0, partials=0):
    """``grad_rows``: pointer to a zero-filled ``[K, 5]`` accumulation buffer, or
    0 for no coordinate gradients. Deterministic (``max_grad``): ``partials``
    points to a zero-filled accumulation buffer of
    :func:`prroi_coordinate_partials` elements when ``grad_rows`` is given.
    Where :func:`channels_per_warp` allows, a warp per RoI and channel group
    scatters the feature gradient (``prroi_pool_backward_warp``); otherwise
    blocks over chunks of a RoI's output elements do. With float atomics the
    coordinate gradients then take their own kernel (``prroi_pool_coords``,
    the forward's work order); the deterministic backward sums them in the
    scatter kernels, in a fixed order."""
    n, c, h, w = shape
    ph, pw = size
    c_out = c // (ph * pw) if ps else c
    block, per_warp = backward_work_order("prroi_pool", device, ps, grad_input[1], shape, size, c_out, scalar,
                                          max_grad)
    coords_in_scatter = grad_rows if max_grad else 0
    if per_warp:
        _run("prroi_pool", "prroi_pool_backward_warp", device, stream, scalar, False,
             _backward_threads(k, c_out, size, per_warp), (
                 grad[0], *grad[1], x[0], n, h, w, *x[1], rows, k, c_out, ph, pw, scale, block, per_warp,
                 grad_input[0], *grad_input[1], max_grad, partials if coords_in_scatter else 0))
        parts = c_out // per_warp
    else:
        parts, blocks = prroi_backward_grid(k, c_out * ph * pw)
        _run("prroi_pool", "prroi_pool_backward", device, stream, scalar, ps, k * c_out * ph * pw, (
            grad[0], *grad[1], x[0], *x[1], rows, k, c_out, ph, pw, scale, channels_fastest(x[1], shape), parts,
            int(coords_in_scatter != 0), grad_input[0], n, h, w, *grad_input[1], partials, max_grad), blocks=blocks)
    if coords_in_scatter:  # the per-warp or per-block partial sums, added in a fixed order
        _run("prroi_pool", "prroi_pool_coords_sum", device, stream, scalar, False, k * 4,
             (partials, k, parts, grad_rows))
    elif grad_rows:
        # 8 channels a thread wherever the forward's block allows: a thread's
        # channels share one set of tents, folded by their output gradients
        # (H200, tuning.py --part prroi_coords: the detector case's coordinate
        # pass 1.08 -> 0.87 ms against 4; the Mask R-CNN-size map's block of 4
        # keeps 4: rounding its block up to 8 took 11.9 -> 22.4 ms)
        coords_block = channel_block(device, x[1], shape, size, c_out, _ITEMSIZE[scalar])
        _run("prroi_pool", "prroi_pool_coords", device, stream, scalar, ps, k * c_out * ph * pw, (
            grad[0], *grad[1], x[0], n, h, w, *x[1], rows, k, c_out, ph, pw, scale, coords_block, grad_rows),
            cpt=channels_per_thread(scalar, ps, c_out, coords_block, target=8))


def fixed_point_gradient(device, stream, scalar, family, fixed, max_grad, k, size, ps, shape, out, out_is_acc,
                         accumulate=False):
    """Convert a deterministic backward's int64 buffer ``fixed`` (dense, in the
    order :func:`channels_fastest` picks for ``out``'s strides) into the view
    ``out`` of ``shape``: the scalar type, or with ``out_is_acc`` the
    accumulation type; added to ``out``'s values with ``accumulate``. ``k``,
    ``size`` and ``ps`` are the backward's. ``family``: any kernel family (each
    holds a copy)."""
    n, c, h, w = shape
    ph, pw = size
    _run(family, "fixed_point_gradient", device, stream, scalar, False, n * c * h * w, (
        fixed, max_grad, k, ph, pw, int(ps), n, c, h, w, channels_fastest(out[1], shape), out[0], *out[1],
        int(out_is_acc), int(accumulate)))
