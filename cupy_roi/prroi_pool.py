"""Precise RoI Pooling (IoU-Net, arXiv:1807.11590) and its position-sensitive variant."""
from typing import List, Union

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from . import _torch_ops as ops


def prroi_pool2d(features: Tensor, rois: Union[Tensor, List[Tensor]], pooled_height: int, pooled_width: int,
                 spatial_scale: float, deterministic: bool = False) -> Tensor:
    """Precise RoI Pooling, with the original implementation's names and semantics.

    Each output is the exact integral of the bilinearly interpolated feature
    (zero outside the map) over its bin, divided by the bin area; no sampling.
    Boxes are ``[x1, x2)`` intervals scaled by ``spatial_scale`` with no offset;
    a bin of zero area gives 0.

    Args:
        features: ``(N, C, H, W)``; float16, bfloat16, float32 or float64.
        rois: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` or a list of N
            ``Tensor[L_i, 4]``.
        deterministic: run the deterministic backward (bitwise-identical
            gradients on every run; see the README). Also on whenever
            ``torch.use_deterministic_algorithms(True)`` is.
    Returns:
        ``(K, C, pooled_height, pooled_width)``, differentiable w.r.t. ``features``
        and the box coordinates (exactly; the batch-index column gets 0).
    """
    if not torch.jit.is_scripting():
        if ops.fx_proxy(features, rois):
            return ops.fx_leaf(prroi_pool2d, features, rois, pooled_height, pooled_width, spatial_scale, deterministic)
        return _prroi(features, rois, (pooled_height, pooled_width), spatial_scale, False, deterministic)
    return ops.script_prroi(features, rois, [pooled_height, pooled_width], spatial_scale, False, deterministic)


def ps_prroi_pool(input: Tensor, rois: Union[Tensor, List[Tensor]], output_size: BroadcastingList2[int],
                  spatial_scale: float = 1.0, deterministic: bool = False) -> Tensor:
    """Position-sensitive Precise RoI Pooling: :func:`prroi_pool2d` with the
    channel mapping of :func:`cupy_roi.ps_roi_align` (``C = C_out * ph * pw``).
    Returns ``(K, C_out, ph, pw)``."""
    if not torch.jit.is_scripting():
        if ops.fx_proxy(input, rois):
            return ops.fx_leaf(ps_prroi_pool, input, rois, output_size, spatial_scale, deterministic)
        return _prroi(input, rois, output_size, spatial_scale, True, deterministic)
    return ops.script_prroi(input, rois, output_size, spatial_scale, True, deterministic)


def _prroi(input, rois, output_size, spatial_scale, ps, deterministic):
    rows, (ph, pw) = ops.prepare(input, rois, output_size, ps)
    return ops.prroi_fwd(input, rows, ph, pw, float(spatial_scale), ps, bool(deterministic))


class PrRoIPool2D(nn.Module):
    """See :func:`prroi_pool2d`."""

    def __init__(self, pooled_height: int, pooled_width: int, spatial_scale: float, *, deterministic: bool = False):
        super().__init__()
        self.pooled_height = int(pooled_height)
        self.pooled_width = int(pooled_width)
        self.spatial_scale = float(spatial_scale)
        self.deterministic = deterministic

    def forward(self, features: Tensor, rois) -> Tensor:
        return prroi_pool2d(features, rois, self.pooled_height, self.pooled_width, self.spatial_scale,
                            self.deterministic)

    def __repr__(self):
        return (f"{type(self).__name__}(pooled_height={self.pooled_height}, pooled_width={self.pooled_width}, "
                f"spatial_scale={self.spatial_scale})")


class PSPrRoIPool2D(PrRoIPool2D):
    """See :func:`ps_prroi_pool`."""

    def forward(self, features: Tensor, rois) -> Tensor:
        return ps_prroi_pool(features, rois, (self.pooled_height, self.pooled_width), self.spatial_scale,
                             self.deterministic)
