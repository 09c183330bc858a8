"""IoU-Net-style box refinement: a box that starts off a target moves onto it by
gradient steps on its coordinates through prroi_pool2d.

The objective matches the PrRoIPool features of the moving box to those of the
target box (a stand-in for IoU-Net's learned IoU predictor); because PrRoIPool's
gradient w.r.t. the box is exact and continuous, plain gradient steps work.
Runs on the GPU when there is one, otherwise on the CPU.
"""
import torch
import torch.nn.functional as F

from cupy_roi import prroi_pool2d


def iou(a, b):
    lt, rb = torch.max(a[:2], b[:2]), torch.min(a[2:], b[2:])
    inter = (rb - lt).clamp(min=0).prod()
    return float(inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter))


def main(steps=150, verbose=True):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    stride = 8.0
    # smooth random features (a detector's map would be smooth at this stride)
    noise = torch.randn(1, 16, 64, 64, device=device)
    blur = torch.ones(16, 1, 7, 7, device=device) / 49
    features = F.conv2d(F.pad(noise, (3, 3, 3, 3), mode="reflect"), blur, groups=16)
    target = torch.tensor([180.0, 150.0, 330.0, 290.0], device=device)
    box = torch.tensor([140.0, 190.0, 300.0, 320.0], device=device, requires_grad=True)
    template = prroi_pool2d(features, torch.cat([torch.zeros(1, device=device), target])[None], 7, 7, 1 / stride)
    opt = torch.optim.Adam([box], lr=2.0)
    start_iou = iou(box.detach(), target)
    if verbose:
        print(f"ran on: {device}; target box {target.tolist()}")
    for step in range(steps + 1):
        pooled = prroi_pool2d(features, torch.cat([torch.zeros(1, device=device), box])[None], 7, 7, 1 / stride)
        loss = F.mse_loss(pooled, template)
        if verbose and step % 25 == 0:
            print(f"step {step:3d}  loss {loss.item():.5f}  box {[round(v, 1) for v in box.tolist()]}  "
                  f"IoU {iou(box.detach(), target):.3f}")
        if step < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return start_iou, iou(box.detach(), target)


if __name__ == "__main__":
    before, after = main()
    print(f"IoU with the target: {before:.3f} -> {after:.3f}")
