"""The benchmarks' RoIs: random boxes as a detector's proposals look, every image
of the batch, shuffled. No GPU or torchvision needed (``prroi_sat.py`` runs on a laptop)."""
import torch


def rois_for(n, per_image, height, width, stride, gen):
    img_h, img_w = height * stride, width * stride
    k = n * per_image
    size = torch.rand(k, 2, generator=gen) * 0.5 * torch.tensor([img_w, img_h]) + 16
    xy = torch.rand(k, 2, generator=gen) * torch.tensor([img_w, img_h]) - size / 2
    b = torch.arange(n).repeat_interleave(per_image)[torch.randperm(k, generator=gen)]
    return torch.cat([b[:, None].float(), xy, xy + size], dim=1)
