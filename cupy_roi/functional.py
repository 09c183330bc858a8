"""Functional operators (``cupy_roi.functional.prroi_pool2d`` etc.)."""
from .multi_scale_roi_align import multi_scale_roi_align
from .prroi_pool import prroi_pool2d, ps_prroi_pool
from .roi_align import ps_roi_align, roi_align, roi_align_rotated
from .roi_pool import ps_roi_pool, roi_pool

__all__ = ["roi_align", "ps_roi_align", "roi_pool", "ps_roi_pool", "prroi_pool2d", "ps_prroi_pool",
           "roi_align_rotated", "multi_scale_roi_align"]
