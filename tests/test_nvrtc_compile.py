"""Every kernel of every family compiles with NVRTC for several GPU architectures.

Runs without a GPU: NVRTC is a compiler library and needs no driver. It comes
from the ``nvidia-cuda-nvrtc-cu12`` wheel (the ``test`` extra), the fp16/bf16
headers from ``nvidia-cuda-runtime-cu12``. CuPy's own compile path needs a
driver, so NVRTC is called directly here, with the same source text and name
expressions the kernel loader hands to ``cupy.RawModule``.
"""
import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cupy_roi import _kernels

ARCHITECTURES = ("sm_70", "sm_80", "sm_90")
# Every kernel of every scalar type compiles for every arch; how far depends
# on what each step can find, since CI is bound by these compiles:
# - NVRTC's front end and NVVM check everything arch- and type-dependent (the
#   intrinsics and types the headers allow or forbid, their lowering to PTX)
#   at any optimization level: PTX with NVVM's optimizer off, which took 80%
#   of each PTX compile.
# - ptxas checks what lies beyond the PTX: shared memory per block, inline
#   PTX text, registers under the launch bounds. Their limits are the same on
#   all three archs, and they differ by scalar type only through the
#   accumulation type (shared arrays) and the inline PTX text, so machine
#   code, optimized as the loader compiles, for the newest arch and one type
#   of each: float64 (double), float32 (float) and float16 (the 16-bit PTX
#   loads bfloat16 shares, and float accumulation).
MACHINE_CODE_ARCH = "sm_90"
MACHINE_CODE_TYPES = ("float16", "float32", "float64")
PTX_OPTIONS = ("-Xnvvm", "-opt=0")


def _machine_code(scalar_type, arch):
    return arch == MACHINE_CODE_ARCH and scalar_type in MACHINE_CODE_TYPES


def _nvidia_dir(package):
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / package
        if path.is_dir():
            return path
    return None


def _missing(what):
    """CI installs the test extra, so a missing wheel fails there; elsewhere
    (a GPU machine with its own CUDA 13 toolkit, say) the check is skipped."""
    message = f"{what} not found: install the test extra (pip install '.[test]')"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _nvrtc_library():
    lib_dir = _nvidia_dir("cuda_nvrtc")
    libs = sorted((lib_dir / "lib").glob("libnvrtc.so.12*")) if lib_dir else []
    libs = [p for p in libs if "alt" not in p.name and "builtins" not in p.name]
    return libs[0] if libs else None


def _include_dir():
    include = _nvidia_dir("cuda_runtime")
    if include is None or not (include / "include" / "cuda_fp16.h").is_file():
        return None
    return include / "include"


def _load_nvrtc():
    lib = _nvrtc_library()
    if lib is None:
        _missing("NVRTC 12 (nvidia-cuda-nvrtc-cu12)")
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def nvrtc():
    return _load_nvrtc()


@pytest.fixture(scope="module")
def cuda_include():
    include = _include_dir()
    if include is None:
        _missing("cuda_fp16.h (nvidia-cuda-runtime-cu12)")
    return include


def _compile(nvrtc, code, expressions, options):
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"kernels.cu", 0, None, None) == 0
    try:
        for expr in expressions:
            assert nvrtc.nvrtcAddNameExpression(prog, expr.encode()) == 0
        opts = [o.encode() for o in options]
        result = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        lowered = []
        if result == 0:
            for expr in expressions:
                name = ctypes.c_char_p()
                assert nvrtc.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(name)) == 0
                lowered.append(name.value.decode())
            machine_code = any(o.startswith(b"--gpu-architecture=sm_") for o in opts)
            out_size = ctypes.c_size_t()
            get_size = nvrtc.nvrtcGetCUBINSize if machine_code else nvrtc.nvrtcGetPTXSize
            assert get_size(prog, ctypes.byref(out_size)) == 0
            assert out_size.value > 0
        return result, log.value.decode(errors="replace"), lowered
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


# The compiles of test_kernels_compile, started at once on background threads
# by conftest.py when collection has selected them: ctypes releases the GIL
# inside NVRTC, so they overlap the tests that run before these. They take
# every core but one: on every core they starved those tests (a 2-core CI
# machine: 70 s for the suite, against 48-54 s leaving one core free). Once
# the other tests are done, test_kernels_compile runs the compiles still
# queued on the test's own thread, so that no core idles.
# Under pytest-xdist each worker compiles only what it runs, in the test.
_executor = None
_compiles = {}  # (family, scalar type, arch) -> Future of _compile's result


def _compile_kernels(nvrtc, include, family, scalar_type, arch):
    if _machine_code(scalar_type, arch):
        options = [f"--gpu-architecture={arch}"]
    else:
        options = [f"--gpu-architecture={arch.replace('sm_', 'compute_')}", *PTX_OPTIONS]
    options += [f"-I{include}", "--std=c++14"]
    return _compile(nvrtc, _kernels.source(family), _kernels.name_expressions(family, scalar_type), options)


def start_compiles(keys):
    """Queue the compiles of ``keys`` ((family, scalar type, arch) triples);
    nothing where NVRTC or the headers are missing: the tests then skip or
    fail through their fixtures."""
    global _executor
    lib, include = _nvrtc_library(), _include_dir()
    if lib is None or include is None:
        return
    nvrtc = ctypes.CDLL(str(lib))
    if _executor is None:
        workers = max(1, (os.cpu_count() or 2) - 1)
        _executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nvrtc")
    # the longest first (machine code, then the longer sources), so that the
    # last ones, which may keep the suite waiting, are short
    keys = sorted(keys, key=lambda k: (not _machine_code(*k[1:]), -len(_kernels.source(k[0]))))
    for key in keys:
        if key not in _compiles:
            _compiles[key] = _executor.submit(_compile_kernels, nvrtc, include, *key)


def stop_compiles():
    """Drop the compiles not yet started (a run stopped early need not wait for them)."""
    if _executor is not None:
        _executor.shutdown(wait=False, cancel_futures=True)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("scalar_type", sorted(_kernels.CUDA_TYPES))
@pytest.mark.parametrize("family", sorted(_kernels.FAMILIES))
def test_kernels_compile(nvrtc, cuda_include, family, scalar_type, arch):
    expressions = _kernels.name_expressions(family, scalar_type)
    queued = _compiles.get((family, scalar_type, arch))
    if queued is not None and queued.cancel():  # not started yet: this thread is free to do it
        queued = None
    result, log, lowered = (queued.result() if queued is not None
                            else _compile_kernels(nvrtc, cuda_include, family, scalar_type, arch))
    assert result == 0, f"{family}/{scalar_type}/{arch} failed to compile:\n{log}"
    assert len(set(lowered)) == len(expressions)


def test_broken_source_fails(nvrtc, cuda_include):
    """The check can fail: a kernel with an error does not compile."""
    code = _kernels.source("roi_align").replace("sum[t] * g->inv_count", "sum[t] * g->no_such_member")
    result, log, _ = _compile(nvrtc, code, _kernels.name_expressions("roi_align", "float32"),
                              ["--gpu-architecture=sm_80", f"-I{cuda_include}"])
    assert result != 0 and "no_such_member" in log


_C_TYPES = {"int": "i", "index_t": "q", "typename acc_type<T>::type": "a", "LevelTable": "L"}


def _parameter_codes(text, kernel):
    """The launcher's letters for the C parameter list of ``kernel`` in ``text``."""
    import re

    head = re.search(r"__global__ void (?:__launch_bounds__\([^)]*\)\s+)?" + kernel + r"\((.*?)\)\s*\{", text, re.S)
    assert head, f"kernel {kernel} not found"
    codes = ""
    for param in head.group(1).split(","):
        param = " ".join(param.replace("__restrict__", "").replace("const ", "").split())
        ctype = param.rsplit(" ", 1)[0]
        codes += "p" if ctype.endswith("*") else _C_TYPES[ctype]
    return codes


@pytest.mark.parametrize("family", sorted(_kernels.FAMILIES))
def test_launcher_signatures_follow_the_sources(family):
    """The launcher packs arguments by _kernels.SIGNATURES: it must match the
    kernels' parameter lists, or a launch would read garbage."""
    text = _kernels.source(family)
    for kernel in _kernels.FAMILIES[family][1]:
        assert _parameter_codes(text, kernel) == _kernels.SIGNATURES[kernel], kernel


def test_argument_packer_layout():
    """Parameters sit at their natural alignment (a 4-byte int before a
    pointer leaves a 4-byte gap), as CUDA lays them out."""
    packer = _kernels.ArgumentPacker("ipaqi", "float32")
    assert packer.offsets == [0, 8, 16, 24, 32]
    assert _kernels.ArgumentPacker("ipaqi", "float64").offsets == [0, 8, 16, 24, 32]
    assert _kernels.ArgumentPacker("iia", "float64").offsets == [0, 4, 8]
    assert _kernels.ArgumentPacker("ia", "float32").offsets == [0, 4]
    # the LevelTable struct: 8-byte aligned, 452 bytes of members padded to 456
    table = _kernels.ArgumentPacker("iLi", "float32")
    assert table.offsets == [0, 8, 464] and table.struct.size == 468
