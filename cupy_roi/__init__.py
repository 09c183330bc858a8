"""cupy-roi: RoI pooling operators for PyTorch and CuPy, with run-time compiled CUDA kernels.

Torch API (autograd; CUDA kernels on the tensor's device and current stream,
the pure-PyTorch reference path on the CPU): :func:`roi_align`,
:func:`ps_roi_align`, :func:`roi_pool`, :func:`ps_roi_pool`,
:func:`prroi_pool2d`, :func:`ps_prroi_pool`, :func:`roi_align_rotated`,
:func:`multi_scale_roi_align` (FPN) and their modules. CuPy/NumPy
arrays: :mod:`cupy_roi.array_api`.
"""
from ._gpu import GPUSupportError
from ._rois import roi_checks
from .prroi_pool import PrRoIPool2D, PSPrRoIPool2D, prroi_pool2d, ps_prroi_pool
from .multi_scale_roi_align import MultiScaleRoIAlign, multi_scale_roi_align
from .roi_align import PSROIAlign, PSRoIAlign, RoIAlign, RoIAlignRotated, ps_roi_align, roi_align, roi_align_rotated
from .roi_pool import PSRoIPool, RoIPool, ps_roi_pool, roi_pool

__version__ = "0.1.0"

__all__ = [
    "roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "prroi_pool2d", "ps_prroi_pool",
    "roi_align_rotated", "multi_scale_roi_align",
    "RoIAlign", "PSRoIAlign", "PSROIAlign", "RoIPool", "PSRoIPool", "PrRoIPool2D", "PSPrRoIPool2D",
    "RoIAlignRotated", "MultiScaleRoIAlign",
    "roi_checks", "GPUSupportError",
]
