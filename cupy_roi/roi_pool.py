"""RoIPool and position-sensitive RoIPool (``torchvision.ops`` semantics)."""
from typing import List, Union

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from . import _torch_ops as ops


def roi_pool(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: BroadcastingList2[int],
             spatial_scale: float = 1.0, deterministic: bool = False) -> Tensor:
    """RoI max pooling (Fast R-CNN), a drop-in for ``torchvision.ops.roi_pool``.

    Box corners are rounded to the feature grid, bins are integer ranges
    (``floor``/``ceil``), an empty bin gives 0; the gradient goes to the first
    maximum of each bin. ``input`` ``(N, C, H, W)``, ``boxes`` ``Tensor[K, 5]`` or a
    list of ``Tensor[L_i, 4]``; returns ``(K, C, ph, pw)``. ``deterministic``:
    the bitwise-reproducible backward, as for :func:`cupy_roi.roi_align`.
    """
    if not torch.jit.is_scripting():
        if ops.fx_proxy(input, boxes):
            return ops.fx_leaf(roi_pool, input, boxes, output_size, spatial_scale, deterministic)
        return _roi_pool(input, boxes, output_size, spatial_scale, False, deterministic)
    return ops.script_roi_pool(input, boxes, output_size, spatial_scale, False, deterministic)


def ps_roi_pool(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: BroadcastingList2[int],
                spatial_scale: float = 1.0, deterministic: bool = False) -> Tensor:
    """Position-sensitive RoI average pooling (R-FCN), a drop-in for
    ``torchvision.ops.ps_roi_pool``: ``C = C_out * ph * pw`` channels, bin
    ``(i, j)`` of channel ``c`` averages input channel ``(c * ph + i) * pw + j``.
    Returns ``(K, C_out, ph, pw)``.

    The forward clips bins to ``H - 1`` / ``W - 1`` as torchvision's does; the
    backward here is the exact gradient of that forward (torchvision's own
    backward clips to ``H`` / ``W`` and so differs where a bin touches the
    last row or column).
    """
    if not torch.jit.is_scripting():
        if ops.fx_proxy(input, boxes):
            return ops.fx_leaf(ps_roi_pool, input, boxes, output_size, spatial_scale, deterministic)
        return _roi_pool(input, boxes, output_size, spatial_scale, True, deterministic)
    return ops.script_roi_pool(input, boxes, output_size, spatial_scale, True, deterministic)


def _roi_pool(input, boxes, output_size, spatial_scale, ps, deterministic):
    rows, (ph, pw) = ops.prepare(input, boxes, output_size, ps)
    return ops.roi_pool_fwd(input, rows, ph, pw, float(spatial_scale), ps, bool(deterministic))


class RoIPool(nn.Module):
    """See :func:`roi_pool`."""

    def __init__(self, output_size, spatial_scale: float, *, deterministic: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.deterministic = deterministic

    def forward(self, input: Tensor, rois) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale, self.deterministic)

    def __repr__(self):
        return f"{type(self).__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale})"


class PSRoIPool(RoIPool):
    """See :func:`ps_roi_pool`."""

    def forward(self, input: Tensor, rois) -> Tensor:
        return ps_roi_pool(input, rois, self.output_size, self.spatial_scale, self.deterministic)
