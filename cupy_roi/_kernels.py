"""Kernel loader and launcher: reads ``cuda_src/``, compiles with NVRTC through
CuPy, caches, and launches from raw device pointers.

This layer knows CuPy and plain integers only (no torch, no arrays on the hot
path). Sources are compiled once per (device, kernel family, scalar type); the
header ``roi_common.cuh`` is inlined into each source so that CuPy's on-disk
compile cache, which is keyed by the source text, notices edits to it.

A launch packs the kernel's arguments with a precompiled :class:`struct.Struct`
into a per-thread buffer whose parameter-pointer array is built once, and hands
both to ``cuLaunchKernel``: a few microseconds, against tens for CuPy's
per-argument conversion of a ``RawKernel`` call.
"""
import ctypes
import struct
import threading
from pathlib import Path

#: scalar type name (NumPy spelling) -> CUDA C type of the kernel templates
CUDA_TYPES = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "float64": "double",
}

#: kernel family -> (source file, kernel templates); every template takes
#: <scalar type, position_sensitive>
FAMILIES = {
    "roi_align": ("roi_align.cu", ("roi_align_forward", "roi_align_backward", "roi_align_rotated_forward",
                                   "roi_align_rotated_backward", "multi_scale_roi_align_forward",
                                   "multi_scale_roi_align_backward", "fixed_point_gradient", "roi_image_order",
                                   "channels_last_to_nchw", "roi_align_plane_geometry", "roi_align_forward_plane",
                                   "roi_align_backward_tiles", "tile_gradient_channels_last",
                                   "zero_ints", "roi_plane_order")),
    "roi_pool": ("roi_pool.cu", ("roi_pool_forward", "roi_pool_backward", "fixed_point_gradient")),
    "prroi_pool": ("prroi_pool.cu", ("prroi_pool_forward", "prroi_pool_backward", "prroi_pool_backward_warp",
                                     "prroi_pool_coords", "prroi_pool_coords_sum", "fixed_point_gradient")),
}

#: kernels instantiated without their position-sensitive variant (no public
#: operator uses it); every other kernel is compiled for both
PLAIN_ONLY = frozenset(("roi_align_rotated_forward", "roi_align_rotated_backward",
                        "multi_scale_roi_align_forward", "multi_scale_roi_align_backward",
                        "fixed_point_gradient", "prroi_pool_backward_warp", "prroi_pool_coords_sum",
                        "roi_image_order", "channels_last_to_nchw", "roi_align_plane_geometry",
                        "roi_align_forward_plane", "roi_align_backward_tiles", "tile_gradient_channels_last",
                        "zero_ints", "roi_plane_order"))

#: kernels not instantiated for float64 (the RoIAlign forward's plane mode:
#: a float64 plane of a map past L2 does not fit in shared memory; the tile
#: backward sums in float)
NOT_FLOAT64 = frozenset(("roi_align_plane_geometry", "roi_align_forward_plane", "roi_align_backward_tiles",
                         "tile_gradient_channels_last", "zero_ints", "roi_plane_order"))

#: kernels also instantiated with 4 and 8 output channels per thread (a
#: third template argument; plain variant, float types: see
#: _rules.channels_per_thread). Each value adds to every family's compile
#: time (a cold start, and CI's compile checks), so only the measured ones.
GROUPED = frozenset(("roi_align_forward", "roi_align_backward", "multi_scale_roi_align_forward",
                     "multi_scale_roi_align_backward", "roi_pool_forward", "prroi_pool_forward",
                     "prroi_pool_coords"))
CHANNELS_PER_THREAD = (4, 8)

#: C parameter list of every kernel, one letter a parameter: p pointer,
#: i int, q 64-bit index, a accumulation scalar (float, or double for double),
#: L the LevelTable struct of roi_align.cu (passed by value).
#: Must follow the signatures in cuda_src/ (tests/test_nvrtc_compile.py checks).
SIGNATURES = {
    "roi_align_forward": "piiiqqqq" "pqiii" "aiii" "pqqqq" "p",
    "roi_align_backward": "pqqqq" "pqiii" "aiiii" "piiiqqqq" "pp",
    "roi_align_rotated_forward": "piiiqqqq" "pqiii" "aiiii" "pqqqq",
    "roi_align_rotated_backward": "pqqqq" "pqiii" "aiiii" "piiiqqqq" "p",
    "multi_scale_roi_align_forward": "Li" "pqiii" "iaiii" "iii" "pqqqq",
    "multi_scale_roi_align_backward": "pqqqq" "Li" "pqiii" "iaiii" "iiii" "pp",
    "roi_pool_forward": "piiiqqqq" "pqiii" "ai" "pqqqq" "p",
    "roi_pool_backward": "pqqqq" "pqiii" "ai" "p" "piiiqqqq" "p",
    "prroi_pool_forward": "piiiqqqq" "pqiii" "ai" "pqqqq",
    "prroi_pool_backward": "pqqqq" "pqqqq" "pqiii" "aiii" "piiiqqqq" "pp",
    "prroi_pool_backward_warp": "pqqqq" "piiiqqqq" "pqiii" "a" "ii" "pqqqq" "pp",
    "prroi_pool_coords": "pqqqq" "piiiqqqq" "pqiii" "a" "i" "p",
    "prroi_pool_coords_sum": "pqip",
    "fixed_point_gradient": "ppqiii" "iiiii" "pqqqq" "ii",
    "roi_image_order": "pqipp",
    "roi_align_plane_geometry": "pqiiiiiii" "aii" "ppp" "ipp",
    "zero_ints": "pq",
    "roi_plane_order": "pqipp",
    "roi_align_forward_plane": "piiiqqqq" "qiiiii" "pp" "pqqqq",
    "channels_last_to_nchw": "piiqp",
    "roi_align_backward_tiles": "pqqqq" "qiiii" "ppp" "piii" "qqqqi",
    "tile_gradient_channels_last": "pqqqq" "qiii" "p",
}

#: kMaxLevels of roi_align.cu: the most pyramid levels one launch takes
MAX_LEVELS = 8
#: kMaxOrderImages of roi_align.cu: the most images roi_image_order takes
MAX_ORDER_IMAGES = 4096

HEADER = "roi_common.cuh"
BLOCK = 256
_MAX_BLOCKS = 1 << 22


def source_dir():
    """The folder holding the CUDA sources: inside the installed package, or
    the checkout's top-level ``cuda_src/`` when running from a source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "cuda_src", here.parent / "cuda_src"):
        if (candidate / HEADER).is_file():
            return candidate
    raise FileNotFoundError(
        "cupy_roi: CUDA sources not found next to the package (looked in "
        f"{here / 'cuda_src'} and {here.parent / 'cuda_src'}); the installation is incomplete")


def source(family):
    """Complete source text of one kernel family, with the shared header inlined."""
    folder = source_dir()
    filename, _ = FAMILIES[family]
    header = (folder / HEADER).read_text()
    text = (folder / filename).read_text()
    include = f'#include "{HEADER}"'
    if include not in text:
        raise RuntimeError(f"{filename} must include {HEADER}")
    return text.replace(include, header, 1)


def kernel_expression(kernel, scalar_type, position_sensitive, channels_per_thread=1):
    cpt = f", {channels_per_thread}" if channels_per_thread > 1 else ""
    return f"{kernel}<{CUDA_TYPES[scalar_type]}, {'true' if position_sensitive else 'false'}{cpt}>"


def variants(kernel, scalar_type):
    """The (position_sensitive, channels per thread) pairs a kernel template
    is instantiated for."""
    if kernel in NOT_FLOAT64 and scalar_type == "float64":
        return []
    pairs = [(False, 1)] if kernel in PLAIN_ONLY else [(False, 1), (True, 1)]
    if kernel in GROUPED and scalar_type != "float64":
        pairs += [(False, cpt) for cpt in CHANNELS_PER_THREAD]
    return pairs


def name_expressions(family, scalar_type):
    _, kernels = FAMILIES[family]
    return [kernel_expression(k, scalar_type, *v) for k in kernels for v in variants(k, scalar_type)]


def blocks_for(total_threads):
    """Grid size for a grid-stride kernel over ``total_threads`` elements."""
    return min(max((total_threads + BLOCK - 1) // BLOCK, 1), _MAX_BLOCKS)


# ---------------------------------------------------------------------------
# argument packing

class ArgumentPacker:
    """Packs one kernel's arguments into a buffer laid out as CUDA lays out
    its parameters (each at its alignment, structs padded to theirs: the C
    rules), and the array of pointers to each parameter that
    ``cuLaunchKernel`` takes. One buffer per thread, so concurrent launches
    from several threads do not share it. A struct parameter takes its
    members as consecutive arguments."""

    def __init__(self, signature, acc_scalar):
        acc = "d" if acc_scalar == "float64" else "f"
        # letter -> (struct members, alignment, size)
        level_table = "%dQ%dq%dd%dii" % (MAX_LEVELS, 4 * MAX_LEVELS, MAX_LEVELS, 2 * MAX_LEVELS)
        kinds = {"p": ("Q", 8), "i": ("i", 4), "q": ("q", 8), "a": (acc, struct.calcsize(acc)),
                 "L": (level_table, 8)}
        fmt, offset, self.offsets = "=", 0, []
        for letter in signature:
            members, align = kinds[letter]
            size = struct.calcsize("=" + members)
            size += -size % align
            pad = -offset % align
            fmt += f"{pad}x" * (pad > 0) + members + f"{size - struct.calcsize('=' + members)}x" * (
                size > struct.calcsize("=" + members))
            self.offsets.append(offset + pad)
            offset += pad + size
        self.struct = struct.Struct(fmt)
        self._local = threading.local()

    def pack(self, args):
        """Address of the parameter-pointer array, now holding ``args``."""
        slot = getattr(self._local, "slot", None)
        if slot is None:
            buffer = ctypes.create_string_buffer(max(self.struct.size, 8))
            base = ctypes.addressof(buffer)
            pointers = (ctypes.c_void_p * len(self.offsets))(*(base + o for o in self.offsets))
            slot = self._local.slot = (buffer, pointers, ctypes.addressof(pointers))
        self.struct.pack_into(slot[0], 0, *args)
        return slot[2]


class Kernel:
    """One compiled kernel on one device: its CUfunction and argument packer."""

    __slots__ = ("name", "device", "handle", "packer", "_function", "shared_limit")

    def __init__(self, name, device, function, acc_scalar):
        self.name = name
        self.device = device
        self._function = function  # keeps CuPy's module (and so the handle) alive
        self.handle = int(function.ptr)
        self.packer = ArgumentPacker(SIGNATURES[name], acc_scalar)
        self.shared_limit = 48 * 1024  # dynamic shared memory a launch may take without opting in

    def allow_shared(self, nbytes):
        """Opt in to ``nbytes`` of dynamic shared memory: past 48 KiB a kernel
        must ask (``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES``)."""
        if nbytes > self.shared_limit:
            from cupy.cuda import driver

            driver.funcSetAttribute(self.handle, _MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)
            self.shared_limit = nbytes


_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CUfunction_attribute


def _accumulation(scalar_type):
    return "float64" if scalar_type == "float64" else "float32"


_lock = threading.Lock()
_functions = {}  # (device id, family, scalar type) -> {(kernel, ps, channels per thread): Kernel}


def compile_family(family, scalar_type, device_id):
    """Compile (or load from CuPy's cache) one family for one device and
    scalar type; returns its kernels. Safe to call from several threads."""
    key = (device_id, family, scalar_type)
    kernels = _functions.get(key)
    if kernels is None:
        with _lock:
            kernels = _functions.get(key)
            if kernels is None:
                kernels = _compile(family, scalar_type, device_id)
                _functions[key] = kernels
    return kernels


def _compile(family, scalar_type, device_id):
    from . import _gpu

    cupy = _gpu.import_cupy()
    expressions = name_expressions(family, scalar_type)
    try:
        with cupy.cuda.Device(device_id):
            module = cupy.RawModule(code=source(family), options=("--std=c++14",),
                                    name_expressions=expressions)
            kernels = {}
            for name in FAMILIES[family][1]:
                for v in variants(name, scalar_type):
                    function = module.get_function(kernel_expression(name, scalar_type, *v)).kernel
                    kernels[(name, *v)] = Kernel(name, device_id, function, _accumulation(scalar_type))
    except Exception as e:
        raise _gpu.kernel_build_error(family, scalar_type, device_id, e) from e
    return kernels


def get_function(family, kernel, scalar_type, position_sensitive, device_id, channels_per_thread=1):
    """The compiled :class:`Kernel`, compiling its family on first use."""
    kernels = _functions.get((device_id, family, scalar_type))
    if kernels is None:
        kernels = compile_family(family, scalar_type, device_id)
    return kernels[(kernel, bool(position_sensitive), channels_per_thread)]


_properties = {}


def _device_property(device_id, name):
    key = (device_id, name)
    value = _properties.get(key)
    if value is None:
        from . import _gpu

        runtime = _gpu.import_cupy().cuda.runtime
        value = _properties[key] = int(runtime.getDeviceProperties(device_id)[name])
    return value


def l2_cache_bytes(device_id):
    """The device's L2 cache size in bytes (queried once per device)."""
    return _device_property(device_id, "l2CacheSize")


def shared_bytes_optin(device_id):
    """The most dynamic shared memory one block may opt in to, in bytes."""
    return _device_property(device_id, "sharedMemPerBlockOptin")


_launch_kernel = []


def launch(kernel, blocks, stream, args, threads=BLOCK, shared=0):
    """Launch ``kernel`` with ``blocks`` blocks of ``threads`` threads
    (:data:`BLOCK` unless the kernel says otherwise) and ``shared`` bytes of
    dynamic shared memory on the stream whose handle is ``stream`` (an int; 0
    is the legacy default stream). ``args`` follow the kernel's C parameter
    list: device pointers and sizes as ints, the scale as a float. The caller
    makes the kernel's device current."""
    if not _launch_kernel:
        from cupy.cuda import driver, runtime

        _launch_kernel.extend((driver.launchKernel, driver.CUDADriverError, runtime.setDevice))
    launch_kernel, driver_error, set_device = _launch_kernel
    params = kernel.packer.pack(args)
    try:
        if shared > kernel.shared_limit:
            kernel.allow_shared(shared)
        launch_kernel(kernel.handle, blocks, 1, 1, threads, 1, 1, shared, stream, params, 0)
    except driver_error as e:
        # A thread that has made no CUDA runtime call yet (a new Python thread,
        # say) has no current context for the driver API: bind the device's
        # primary context the way the runtime does, then launch again.
        if "INVALID_CONTEXT" not in str(e):
            raise
        set_device(kernel.device)
        if shared > kernel.shared_limit:
            kernel.allow_shared(shared)
        launch_kernel(kernel.handle, blocks, 1, 1, threads, 1, 1, shared, stream, params, 0)
