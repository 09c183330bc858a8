"""Kernel loader: reads ``cuda_src/``, compiles with NVRTC through CuPy, caches, launches.

This layer knows CuPy and raw device pointers only (no torch). Sources are
compiled once per (device, kernel family, scalar type); the header
``roi_common.cuh`` is inlined into each source so that CuPy's on-disk compile
cache, which is keyed by the source text, notices edits to it.
"""
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
    "roi_align": ("roi_align.cu", ("roi_align_forward", "roi_align_backward")),
    "roi_pool": ("roi_pool.cu", ("roi_pool_forward", "roi_pool_backward")),
    "prroi_pool": ("prroi_pool.cu", ("prroi_pool_forward", "prroi_pool_backward")),
}

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


def kernel_expression(kernel, scalar_type, position_sensitive):
    return f"{kernel}<{CUDA_TYPES[scalar_type]}, {'true' if position_sensitive else 'false'}>"


def name_expressions(family, scalar_type):
    _, kernels = FAMILIES[family]
    return [kernel_expression(k, scalar_type, ps) for k in kernels for ps in (False, True)]


_lock = threading.Lock()
_functions = {}  # (device id, family, scalar type) -> {expression: cupy.RawKernel}


def get_function(family, kernel, scalar_type, position_sensitive, device_id):
    """The compiled kernel, compiling its family for this device and scalar
    type on first use. Safe to call from several threads at once."""
    key = (device_id, family, scalar_type)
    functions = _functions.get(key)
    if functions is None:
        with _lock:
            functions = _functions.get(key)
            if functions is None:
                import cupy

                expressions = name_expressions(family, scalar_type)
                with cupy.cuda.Device(device_id):
                    module = cupy.RawModule(code=source(family), options=("--std=c++14",),
                                            name_expressions=expressions)
                    functions = {e: module.get_function(e) for e in expressions}
                _functions[key] = functions
    return functions[kernel_expression(kernel, scalar_type, position_sensitive)]


def launch(function, total_threads, args, stream, *, blocks=None):
    """Launch ``function`` on ``stream`` (a cupy Stream) with a grid covering
    ``total_threads`` (the kernels use grid-stride loops), or ``blocks`` blocks."""
    if blocks is None:
        blocks = min(max((total_threads + BLOCK - 1) // BLOCK, 1), _MAX_BLOCKS)
    with stream:
        function((int(blocks),), (BLOCK,), args)
