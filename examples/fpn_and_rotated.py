"""Feature-pyramid RoIAlign (torchvision's MultiScaleRoIAlign, fused) and
rotated RoIAlign (oriented boxes). Runs on the CPU, and on the GPU where there
is one: python examples/fpn_and_rotated.py"""
import math
from collections import OrderedDict

import torch

import cupy_roi


def fpn(device):
    image = (800, 1088)
    # P2-P5 of a two-image batch, strides 4 to 32 (256 channels in a real detector)
    x = OrderedDict((f"p{i}", torch.randn(2, 16, image[0] // 2 ** i, image[1] // 2 ** i, device=device))
                    for i in range(2, 6))
    boxes = [torch.tensor([[10., 20., 60., 90.], [100., 100., 700., 600.]], device=device),  # small, large
             torch.tensor([[300., 200., 520., 420.]], device=device)]
    pooler = cupy_roi.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size=7, sampling_ratio=2)
    out = pooler(x, boxes, [image, image])  # one kernel launch for all four levels
    print("FPN pooled", tuple(out.shape), "scales", pooler.scales)
    # mmdetection's level mapping and RoIAlign convention
    mm = cupy_roi.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 0, aligned=True, mapping="mmdet")
    print("mmdet mapping", tuple(mm(x, boxes, [image, image]).shape))
    return out


def rotated(device):
    feat = torch.randn(1, 8, 64, 64, device=device, requires_grad=True)
    # (batch, cx, cy, w, h, angle): a 40x12 box turned 30 degrees counter-clockwise
    rois = torch.tensor([[0, 32., 32., 40., 12., math.radians(30)]], device=device)
    out = cupy_roi.roi_align_rotated(feat, rois, (3, 7), spatial_scale=1.0, sampling_ratio=2)
    out.sum().backward()
    print("rotated pooled", tuple(out.shape), "grad nonzero", int(feat.grad.count_nonzero()))
    # detectron2 rows use degrees: convert the angle column, aligned=True
    d2 = torch.tensor([[0, 32., 32., 40., 12., 30.]], device=device)
    d2[:, 5] = torch.deg2rad(d2[:, 5])
    same = cupy_roi.roi_align_rotated(feat.detach(), d2, (3, 7), 1.0, 2, aligned=True)
    print("detectron2 convention, same result:", torch.allclose(same, out.detach()))
    return out


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fpn(device)
    rotated(device)
    print("ran on:", device)
