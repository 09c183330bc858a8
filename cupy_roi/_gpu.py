"""Finding the GPU pieces (CuPy, NVRTC) and saying what to install when one is missing.

Importing :mod:`cupy_roi` never imports CuPy; the first GPU call does, here.
"""
import importlib
import sys


class GPUSupportError(RuntimeError):
    """A CUDA tensor or CuPy array met a missing or broken GPU piece: CuPy is
    not installed, or NVRTC could not compile or load a kernel."""


def cuda_major():
    """The CUDA major version the caller's stack uses: torch's build when torch
    is loaded (not imported here), else the driver's; None if unknown."""
    torch = sys.modules.get("torch")
    version = getattr(getattr(torch, "version", None), "cuda", None)
    if version:
        return int(str(version).split(".")[0])
    try:
        import ctypes

        driver = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        if driver.cuDriverGetVersion(ctypes.byref(v)) == 0:
            return v.value // 1000
    except OSError:
        pass
    return None


def install_hint():
    major = cuda_major()
    if major in (12, 13):
        return (f"pip install cupy-cuda{major}x (or the project's extra: pip install 'cupy-roi[cuda{major}]'), "
                f"for CUDA {major}")
    return ("pip install cupy-cuda12x or cupy-cuda13x, matching your CUDA version "
            "(extras 'cupy-roi[cuda12]' / 'cupy-roi[cuda13]')")


_cupy = []


def import_cupy():
    """CuPy, or a :class:`GPUSupportError` that names the package to install."""
    if _cupy:
        return _cupy[0]
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as e:
        raise GPUSupportError(f"cupy_roi needs CuPy for CUDA tensors and arrays, and importing it failed "
                              f"({e}). {install_hint()}. CPU tensors need no CuPy.") from e
    _cupy.append(cupy)
    return cupy


def kernel_build_error(family, scalar_type, device_id, error):
    return GPUSupportError(
        f"cupy_roi could not compile or load its {family} kernels ({scalar_type}) for GPU {device_id} "
        f"with CuPy's NVRTC: {type(error).__name__}: {error}. Check that CuPy matches your CUDA and "
        f"driver ({install_hint()}) and that NVRTC loads (python -m cupy_roi shows the versions).")
