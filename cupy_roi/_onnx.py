"""ONNX export: the operators ONNX has, emitted while ``torch.onnx.export``
traces (``torch.onnx.ops.symbolic``; no translation table to pass).

* ``roi_align`` -> ``RoiAlign`` (opset 16+), ``mode="avg"``:
  ``aligned=True`` is ``coordinate_transformation_mode="half_pixel"`` and
  ``aligned=False`` is ``"output_half_pixel"`` (ONNX's legacy mode, which
  also clamps the RoI to at least 1x1 as torchvision does); a
  ``sampling_ratio <= 0`` (adaptive) is ONNX's 0. RoIs go in as ``[K, 4]``
  boxes in the input's dtype plus int64 batch indices.
* ``roi_pool`` -> ``MaxRoiPool`` (opset 1): same rounding and integer bins.
* Position-sensitive ops, PrRoIPool, rotated and multi-level RoIAlign have no
  ONNX operator: exporting them raises :class:`NotImplementedError` naming the op.
"""
import torch

RELEASED = {
    (False, "roi_align"): "RoiAlign", (False, "roi_pool"): "MaxRoiPool",
}


def unsupported(name):
    return NotImplementedError(
        f"cupy_roi.{name} has no ONNX operator (ONNX has RoiAlign and MaxRoiPool only: no position-sensitive, "
        "precise, rotated or multi-level pooling): export a model without it, or keep it in PyTorch")


def _symbolic():
    ops = getattr(getattr(torch, "onnx", None), "ops", None)
    if ops is None or not hasattr(ops, "symbolic"):
        raise RuntimeError("ONNX export of cupy_roi ops needs torch.onnx.ops.symbolic (PyTorch 2.8 or newer) "
                           "and the dynamo exporter (torch.onnx.export(..., dynamo=True), the default)")
    return ops.symbolic


def roi_align(input, rows, ph, pw, scale, sampling_ratio, aligned, ps):
    if ps:
        raise unsupported("ps_roi_align")
    boxes = rows[:, 1:].to(input.dtype)
    batch = rows[:, 0].to(torch.int64)
    attrs = {"coordinate_transformation_mode": "half_pixel" if aligned else "output_half_pixel",
             "mode": "avg", "output_height": int(ph), "output_width": int(pw),
             "sampling_ratio": max(int(sampling_ratio), 0), "spatial_scale": float(scale)}
    return _symbolic()("RoiAlign", (input, boxes, batch), attrs, dtype=input.dtype,
                       shape=(rows.shape[0], input.shape[1], ph, pw), version=16)


def roi_pool(input, rows, ph, pw, scale, ps):
    if ps:
        raise unsupported("ps_roi_pool")
    attrs = {"pooled_shape": [int(ph), int(pw)], "spatial_scale": float(scale)}
    return _symbolic()("MaxRoiPool", (input, rows.to(input.dtype)), attrs, dtype=input.dtype,
                       shape=(rows.shape[0], input.shape[1], ph, pw), version=1)


def prroi_pool(input, rows, ph, pw, scale, ps):
    raise unsupported("ps_prroi_pool" if ps else "prroi_pool2d")
