"""DistributedDataParallel training with cupy_roi: one process per GPU.

A small R-FCN-style detector head (conv backbone -> position-sensitive score
maps -> PSRoIAlign -> vote by averaging the bins -> classification loss) and an
IoU-Net-style box-quality branch (PrRoIPool2D features -> IoU prediction ->
regression loss against each RoI's true IoU, the loss IoU-Net's box refinement
is trained with), on synthetic images: one coloured rectangle per image, its
colour the class.

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node=2 examples/ddp_train.py

Each rank draws its own images; DDP all-reduces the gradients. At the end the
script checks that every rank holds the same gradients and the same weights
and that the loss went down, and exits non-zero otherwise. Backend: NCCL when
every rank has a GPU of its own, else gloo (CPU, or ranks sharing one GPU).
Plain ``python examples/ddp_train.py`` runs a single rank.
"""
import argparse
import os
import sys

# NVLink multicast (NVLS) stays off: on shared hosts it can take the GPUs down.
os.environ["NCCL_NVLS_ENABLE"] = "0"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import cupy_roi  # noqa: E402

NUM_CLASSES = 4  # background + 3 colours
IMAGE = 64
STRIDE = 2


class DetectorHead(nn.Module):
    def __init__(self, channels=32, bins=3):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=STRIDE, padding=1), nn.ReLU())
        self.score_maps = nn.Conv2d(channels, bins * bins * NUM_CLASSES, 1)
        self.ps_pool = cupy_roi.PSRoIAlign(bins, 1.0 / STRIDE, sampling_ratio=2)
        self.pr_pool = cupy_roi.PrRoIPool2D(bins, bins, 1.0 / STRIDE)
        self.iou_head = nn.Sequential(nn.Flatten(), nn.Linear(channels * bins * bins, 64), nn.ReLU(),
                                      nn.Linear(64, 1))

    def forward(self, images, rois):
        features = self.backbone(images)
        class_scores = self.ps_pool(self.score_maps(features), rois).mean(dim=(2, 3))
        iou = self.iou_head(self.pr_pool(features, rois)).squeeze(1)
        return class_scores, iou


def box_iou(a, b):
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area = (a[:, 2:] - a[:, :2]).prod(dim=1) + (b[:, 2:] - b[:, :2]).prod(dim=1)
    return inter / (area - inter)


def synthetic_batch(gen, images_per_rank, rois_per_image, device):
    """Images with one rectangle each; RoIs jittered around it and random ones."""
    n = images_per_rank
    images = 0.3 * torch.randn(n, 3, IMAGE, IMAGE, generator=gen)
    size = torch.randint(14, 40, (n, 2), generator=gen).float()
    corner = torch.rand(n, 2, generator=gen) * (IMAGE - size)
    gt = torch.cat([corner, corner + size], dim=1)
    cls = torch.randint(1, NUM_CLASSES, (n,), generator=gen)
    for i in range(n):
        x1, y1, x2, y2 = gt[i].round().int().tolist()
        images[i, cls[i] - 1, y1:y2, x1:x2] += 1.0
    half = rois_per_image // 2
    jitter = (torch.rand(n, half, 4, generator=gen) - 0.5) * 0.6 * size.repeat(1, 2)[:, None]
    near = gt[:, None] + jitter
    xy = torch.rand(n, rois_per_image - half, 2, generator=gen) * (IMAGE - 8)
    wh = 8 + torch.rand(n, rois_per_image - half, 2, generator=gen) * 32
    far = torch.cat([xy, xy + wh], dim=2)
    boxes = torch.cat([near, far], dim=1)
    top_left = boxes[..., :2].clamp(0, IMAGE - 2)
    boxes = torch.cat([top_left, torch.max(boxes[..., 2:].clamp(max=IMAGE), top_left + 1)], dim=2)
    iou = box_iou(boxes.reshape(-1, 4), gt.repeat_interleave(rois_per_image, 0))
    labels = torch.where(iou >= 0.5, cls.repeat_interleave(rois_per_image), torch.zeros_like(iou, dtype=torch.long))
    batch = torch.arange(n).repeat_interleave(rois_per_image)[:, None].float()
    rois = torch.cat([batch, boxes.reshape(-1, 4)], dim=1)
    return images.to(device), rois.to(device), labels.to(device), iou.to(device)


def flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def max_rank_difference(vector):
    """Largest difference between this rank's vector and any other rank's."""
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return max(float((g - vector).abs().max()) for g in gathered)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=4, help="images per rank and step")
    parser.add_argument("--rois", type=int, default=32, help="RoIs per image")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where there are GPUs")
    args = parser.parse_args()

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "MASTER_ADDR" not in os.environ:  # plain `python ddp_train.py`: one rank
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        gpus = torch.cuda.device_count()
        device = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(device)
        backend = "nccl" if int(os.environ.get("LOCAL_WORLD_SIZE", world)) <= gpus else "gloo"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = DetectorHead().to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if backend == "nccl" else None)
    opt = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1000 + rank)  # every rank its own images
    if rank == 0:
        name = torch.cuda.get_device_name(device) if use_cuda else "CPU"
        print(f"world size {world}, backend {backend}, rank 0 on {device} ({name})", flush=True)
    print(f"rank {rank}: device {device}", flush=True)

    losses = []
    for step in range(args.steps):
        images, rois, labels, iou = synthetic_batch(gen, args.images, args.rois, device)
        class_scores, iou_pred = ddp(images, rois)
        cls_loss = F.cross_entropy(class_scores, labels)
        iou_loss = F.smooth_l1_loss(iou_pred, iou, beta=0.1)
        loss = cls_loss + iou_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        parts = torch.stack([loss.detach(), cls_loss.detach(), iou_loss.detach()])
        dist.all_reduce(parts)
        parts /= world
        losses.append(float(parts[0]))
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {parts[0]:.4f}  (classification {parts[1]:.4f}, IoU {parts[2]:.4f})",
                  flush=True)

    # The last step's gradients (all-reduced by DDP) and the weights after it.
    grad_diff = max_rank_difference(flat_grads(model))
    param_diff = max_rank_difference(flat_params(model))
    window = max(1, min(10, args.steps // 3))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    ok = grad_diff == 0.0 and param_diff == 0.0 and last < first
    if rank == 0:
        print(f"gradients: largest difference between ranks {grad_diff:.3g}; weights: {param_diff:.3g}")
        print(f"mean loss of the first {window} steps {first:.4f}, of the last {window} {last:.4f}")
        print("OK" if ok else "FAILED")
    del ddp, opt  # DDP's reducer holds the group's pending work: release it before the group
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()
    # Leave without interpreter finalization: with gloo, PyTorch (seen with
    # 2.13 on the CPU) sometimes aborts there ("terminate called without an
    # active exception") even after destroy_process_group, with or without
    # cupy_roi in the program.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()
