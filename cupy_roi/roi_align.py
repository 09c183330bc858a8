"""RoIAlign and position-sensitive RoIAlign (``torchvision.ops`` semantics), and
RoIAlign over rotated boxes (mmcv semantics)."""
from typing import List, Union

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from . import _torch_ops as ops


def roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: BroadcastingList2[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
              deterministic: bool = False) -> Tensor:
    """RoI Align (Mask R-CNN), a drop-in for ``torchvision.ops.roi_align``.

    Args:
        input: ``(N, C, H, W)`` features; float16, bfloat16, float32 or float64;
            any strides (channels_last has its own fast path).
        boxes: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of
            N ``Tensor[L_i, 4]`` boxes of image i, in input-image coordinates;
            any floating dtype, on input's device.
        output_size: int or ``(ph, pw)``.
        spatial_scale: maps box coordinates to feature coordinates (1/stride).
        sampling_ratio: samples per bin and axis; ``<= 0``: ``ceil(roi_size / bins)``.
        aligned: shift boxes by -0.5 pixel (pixel-centre convention).
        deterministic: run the deterministic backward (bitwise-identical
            gradients on every run; see the README). Also on whenever
            ``torch.use_deterministic_algorithms(True)`` is.

    Returns:
        ``(K, C, ph, pw)`` with input's dtype; differentiable w.r.t. ``input``.
    """
    if not torch.jit.is_scripting():
        if ops.fx_proxy(input, boxes):
            return ops.fx_leaf(roi_align, input, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                               deterministic)
        return _roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, False, deterministic)
    return ops.script_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, False,
                                deterministic)


def ps_roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: BroadcastingList2[int],
                 spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = True,
                 deterministic: bool = False) -> Tensor:
    """Position-sensitive RoI Align (R-FCN, Light-Head R-CNN), a drop-in for
    ``torchvision.ops.ps_roi_align`` (which computes ``aligned=True``).

    ``input`` has ``C = C_out * ph * pw`` channels; output bin ``(i, j)`` of
    channel ``c`` reads input channel ``(c * ph + i) * pw + j``. RoIs carry their
    batch index, so any number of images per call. Returns ``(K, C_out, ph, pw)``.
    Other arguments as :func:`roi_align`. A box of zero size with adaptive
    sampling (``sampling_ratio <= 0``) has no samples and gives 0, as in
    torchvision's ``roi_align`` (its ``ps_roi_align`` gives NaN, 0/0).
    """
    if not torch.jit.is_scripting():
        if ops.fx_proxy(input, boxes):
            return ops.fx_leaf(ps_roi_align, input, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                               deterministic)
        return _roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, True, deterministic)
    return ops.script_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, True,
                                deterministic)


def _roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, ps, deterministic):
    rows, (ph, pw) = ops.prepare(input, boxes, output_size, ps)
    return ops.roi_align_fwd(input, rows, ph, pw, float(spatial_scale), int(sampling_ratio), bool(aligned), ps,
                             bool(deterministic))


def roi_align_rotated(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: BroadcastingList2[int],
                      spatial_scale: float = 1.0, sampling_ratio: int = 0, aligned: bool = True,
                      clockwise: bool = False, deterministic: bool = False) -> Tensor:
    """RoI Align over rotated boxes (oriented detectors), with mmcv's
    ``roi_align_rotated`` semantics.

    Args:
        input: ``(N, C, H, W)`` features, as for :func:`roi_align`.
        boxes: ``Tensor[K, 6]`` rows ``(batch_index, cx, cy, w, h, angle)``, or a
            list of N ``Tensor[L_i, 5]`` boxes ``(cx, cy, w, h, angle)`` of image i;
            centre and size in input-image coordinates, ``angle`` in radians,
            counter-clockwise on the image (y pointing down) unless ``clockwise``.
        output_size: int or ``(ph, pw)``; bin ``(i, j)`` lies ``i`` rows down the
            box's own height axis and ``j`` columns along its width axis.
        spatial_scale: maps box coordinates to feature coordinates (1/stride).
        sampling_ratio: samples per bin and axis; ``<= 0``: ``ceil(roi_size / bins)``.
        aligned: shift the centre by -0.5 pixel (pixel-centre convention); when
            False, boxes smaller than one feature cell are grown to 1x1.
        clockwise: read ``angle`` as clockwise.
        deterministic: run the deterministic backward (bitwise-identical
            gradients on every run; see the README). Also on whenever
            ``torch.use_deterministic_algorithms(True)`` is.

    Returns:
        ``(K, C, ph, pw)`` with input's dtype; differentiable w.r.t. ``input``.

    With angle 0 this is :func:`roi_align` on the box ``(cx - w/2, cy - h/2,
    cx + w/2, cy + h/2)`` with the same ``aligned`` (with ``aligned=False``,
    for boxes at least one feature cell wide and high: smaller ones grow about
    their centre here, from their corner in roi_align). detectron2's
    ``ROIAlignRotated`` takes angles in degrees, counter-clockwise, and always
    shifts by half a pixel: convert its rows with
    ``rois[:, 5] = torch.deg2rad(rois[:, 5])`` and call with ``aligned=True,
    clockwise=False``.
    """
    if not torch.jit.is_scripting():
        if ops.fx_proxy(input, boxes):
            return ops.fx_leaf(roi_align_rotated, input, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                               clockwise, deterministic)
        rows, (ph, pw) = ops.prepare(input, boxes, output_size, False, columns=6)
        return ops.roi_align_rotated_fwd(input, rows, ph, pw, float(spatial_scale), int(sampling_ratio),
                                         bool(aligned), bool(clockwise), bool(deterministic))
    return ops.script_roi_align_rotated(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, clockwise,
                                        deterministic)


class RoIAlign(nn.Module):
    """See :func:`roi_align`."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False, *,
                 deterministic: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.deterministic = deterministic

    def forward(self, input: Tensor, rois) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
                         self.deterministic)

    def __repr__(self):
        return (f"{type(self).__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
                f"{', deterministic=True' if self.deterministic else ''})")


class PSRoIAlign(nn.Module):
    """See :func:`ps_roi_align`; torchvision's module name and signature."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, *, deterministic: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.deterministic = deterministic

    def forward(self, input: Tensor, rois) -> Tensor:
        return ps_roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, True,
                            self.deterministic)

    def __repr__(self):
        return (f"{type(self).__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio})")


class PSROIAlign(PSRoIAlign):
    """The R-FCN / Light-Head seed's module: ``(K, pooled_dim, roi_size, roi_size)``
    from ``C = pooled_dim * roi_size**2`` channels.

    >>> PSROIAlign(spatial_scale=1/16, roi_size=7, sampling_ratio=2, pooled_dim=10)
    """

    def __init__(self, spatial_scale: float, roi_size: int, sampling_ratio: int, pooled_dim: int, *,
                 deterministic: bool = False):
        super().__init__((roi_size, roi_size), spatial_scale, sampling_ratio, deterministic=deterministic)
        self.roi_size = roi_size
        self.pooled_dim = pooled_dim

    def forward(self, input: Tensor, rois) -> Tensor:
        expected = self.pooled_dim * self.roi_size ** 2
        if input.dim() == 4 and input.shape[1] != expected:
            raise ValueError(f"input must have pooled_dim * roi_size**2 = {expected} channels, "
                             f"got {input.shape[1]}")
        return super().forward(input, rois)

    def __repr__(self):
        return (f"PSROIAlign(spatial_scale={self.spatial_scale}, roi_size={self.roi_size}, "
                f"sampling_ratio={self.sampling_ratio}, pooled_dim={self.pooled_dim})")


class RoIAlignRotated(nn.Module):
    """See :func:`roi_align_rotated`; mmcv's module name and signature."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int = 0, aligned: bool = True,
                 clockwise: bool = False, *, deterministic: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.clockwise = clockwise
        self.deterministic = deterministic

    def forward(self, input: Tensor, rois) -> Tensor:
        return roi_align_rotated(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                                 self.aligned, self.clockwise, self.deterministic)

    def __repr__(self):
        return (f"{type(self).__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, clockwise={self.clockwise})")
