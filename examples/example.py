"""PSROIAlignExample: position-sensitive RoI Align forward and backward on an
R-FCN-style feature map (4 images, 10 classes x 7x7 bins), on the GPU when there
is one and on the CPU otherwise."""
import torch

from cupy_roi import PSROIAlign


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    features = torch.randn(4, 490, 30, 40, device=device, requires_grad=True)
    # (batch_index, x1, y1, x2, y2) in image pixels; the map has stride 16
    rois = torch.tensor([[0, 16.0, 32.0, 320.0, 240.0],
                         [1, 100.5, 60.2, 400.0, 470.9],
                         [3, 0.0, 0.0, 639.0, 479.0],
                         [2, 250.0, 130.0, 330.0, 210.0],
                         [0, 600.0, 400.0, 700.0, 520.0]], device=device)
    pool = PSROIAlign(spatial_scale=1 / 16, roi_size=7, sampling_ratio=2, pooled_dim=10)
    out = pool(features, rois)
    out.mean().backward()
    print(f"ran on: {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    print(f"module: {pool}")
    print(f"features {tuple(features.shape)}, rois {tuple(rois.shape)} -> output {tuple(out.shape)}")
    print(f"grad of features: {tuple(features.grad.shape)}, "
          f"non-zero entries {int((features.grad != 0).sum())}")


if __name__ == "__main__":
    main()
