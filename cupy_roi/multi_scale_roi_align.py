"""Multi-level (FPN) RoIAlign: every RoI pooled from the pyramid level its size
picks, all levels in one kernel launch; a drop-in for
``torchvision.ops.MultiScaleRoIAlign``, with mmdetection's level mapping as an
option."""
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _rules
from . import _torch_ops as ops


def multi_scale_roi_align(features: List[Tensor], boxes: Union[Tensor, List[Tensor]], output_size,
                          spatial_scales: List[float], sampling_ratio: int = -1, aligned: bool = False, *,
                          mapping: str = "torchvision", canonical_scale: float = 224, canonical_level: int = 4,
                          finest_scale: float = 56, deterministic: bool = False) -> Tensor:
    """RoI Align over a feature pyramid: each RoI is pooled from one level.

    Args:
        features: the pyramid, finest level first: 1 to 8 tensors
            ``(N, C, H_l, W_l)`` of one dtype and device (any strides; the
            first level's layout sets the output's).
        boxes: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` or a list of
            N ``Tensor[L_i, 4]``, in input-image coordinates.
        output_size: int or ``(ph, pw)``.
        spatial_scales: one per level (1/stride), e.g. ``[1/4, 1/8, 1/16, 1/32]``.
        sampling_ratio, aligned: as for :func:`cupy_roi.roi_align` (torchvision's
            MultiScaleRoIAlign uses ``aligned=False``; mmdetection's RoIAlign ``True``).
        mapping: how a box's size picks its level, from ``sqrt(w * h)``:

            * ``"torchvision"`` (FPN paper, torchvision's ``LevelMapper``):
              ``floor(canonical_level + log2(sqrt(w * h) / canonical_scale) + 1e-6)``,
              clamped to ``[k_min, k_max]`` with ``k = -log2(spatial_scale)`` of the
              first and last level, minus ``k_min``;
            * ``"mmdet"`` (mmdetection's ``SingleRoIExtractor``):
              ``floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to
              ``[0, levels - 1]``.

            One level takes every box. A box whose level is NaN (``w * h < 0``:
            one side inverted) gets a zero output row, as in both libraries.
        deterministic: run the deterministic backward (bitwise-identical
            gradients on every run; see the README). Also on whenever
            ``torch.use_deterministic_algorithms(True)`` is.

    Returns:
        ``(K, C, ph, pw)`` in the features' dtype, rows in the order of ``boxes``;
        differentiable w.r.t. every level. One forward kernel launch (and one
        backward launch) for all levels, with no host-device synchronization.
        The level is computed in the accumulation dtype (float32 for half
        features, where torchvision would use the boxes' dtype).
    """
    if ops.fx_proxy(features, boxes):
        return ops.fx_leaf(multi_scale_roi_align, features, boxes, output_size, spatial_scales, sampling_ratio,
                           aligned, mapping=mapping, canonical_scale=canonical_scale,
                           canonical_level=canonical_level, finest_scale=finest_scale, deterministic=deterministic)
    features = list(features)
    rows, (ph, pw) = ops.prepare_levels(features, boxes, output_size)
    scales = [float(s) for s in spatial_scales]
    _rules.check_levels([tuple(f.shape) for f in features], scales)
    level_map = _rules.level_mapping(mapping, scales, canonical_scale, canonical_level, finest_scale)
    return ops.multi_scale_fwd(features, rows, ph, pw, scales, int(sampling_ratio), bool(aligned), level_map,
                               bool(deterministic))


def _infer_scale(feature: Tensor, original_size: List[int]) -> float:
    """torchvision's rule: the power of two nearest to feature size / image size (height)."""
    approx = float(feature.shape[-2]) / float(original_size[0])
    return 2 ** float(torch.tensor(approx).log2().round())


class MultiScaleRoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.MultiScaleRoIAlign``: same constructor,
    ``forward(x, boxes, image_shapes)``, level mapping, scale inference and
    output order, with all levels pooled by one fused kernel.

    Args:
        featmap_names: keys of ``x`` to pool from (kept in ``x``'s order).
        output_size: int or ``(ph, pw)``.
        sampling_ratio: as for :func:`cupy_roi.roi_align`.
        canonical_scale, canonical_level: torchvision's ``LevelMapper`` constants.
        aligned: the RoIAlign convention (torchvision: False).
        mapping: ``"torchvision"`` or ``"mmdet"`` (see :func:`multi_scale_roi_align`).
        finest_scale: mmdetection's constant (its default, 56).
        deterministic: the bitwise-reproducible backward (see :func:`multi_scale_roi_align`).

    ``forward(x: Dict[str, Tensor], boxes: List[Tensor[L_i, 4]], image_shapes:
    List[Tuple[int, int]])`` returns ``(sum L_i, C, ph, pw)``. The scales are
    inferred from the first call's feature and image sizes, as torchvision does,
    and kept.
    """

    def __init__(self, featmap_names: List[str], output_size: Union[int, Tuple[int], List[int]],
                 sampling_ratio: int, *, canonical_scale: int = 224, canonical_level: int = 4,
                 aligned: bool = False, mapping: str = "torchvision", finest_scale: float = 56,
                 deterministic: bool = False):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        if mapping not in _rules.MAPPINGS:
            raise ValueError(f"mapping must be one of {sorted(_rules.MAPPINGS)}, got {mapping!r}")
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned
        self.mapping = mapping
        self.finest_scale = finest_scale
        self.deterministic = deterministic
        self.scales: Optional[List[float]] = None

    def _setup_scales(self, features: List[Tensor], image_shapes: List[Tuple[int, int]]) -> List[float]:
        if not image_shapes:
            raise ValueError("image_shapes must not be empty")
        original = [max(s[0] for s in image_shapes), max(s[1] for s in image_shapes)]
        return [_infer_scale(f, original) for f in features]

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]
        if not features:
            raise ValueError(f"x has none of the feature maps {self.featmap_names}: keys {list(x)}")
        if self.scales is None:
            self.scales = self._setup_scales(features, image_shapes)
        return multi_scale_roi_align(features, boxes, self.output_size, self.scales, self.sampling_ratio,
                                     self.aligned, mapping=self.mapping, canonical_scale=self.canonical_scale,
                                     canonical_level=self.canonical_level, finest_scale=self.finest_scale,
                                     deterministic=self.deterministic)

    def __repr__(self):
        return (f"{type(self).__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, mapping={self.mapping!r})")


__all__ = ["multi_scale_roi_align", "MultiScaleRoIAlign"]
