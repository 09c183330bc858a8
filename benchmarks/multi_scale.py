"""cupy_roi.MultiScaleRoIAlign against torchvision.ops.MultiScaleRoIAlign on
Mask R-CNN FPN shapes, side by side on one GPU; and rotated RoIAlign's cost
beside roi_align on the same boxes (torchvision has no rotated RoIAlign).

Images 800x1088, levels P2-P5 (strides 4-32), C=256; box head 7x7 with 512
RoIs per image, mask head 14x14 with 128 RoIs per image; batch 2 and 8;
float32 and float16; forward and forward+backward. Boxes are drawn so that
every level gets some (log-uniform sizes from 16 to 800 pixels). Wall clock:
CUDA events around each call, median of ``--reps`` runs after warm-up, the
host's work included (torchvision's module runs about a dozen kernels and
index ops per call, ours one launch). With ``--graph``, the same calls
replayed from a CUDA graph: the GPU time alone (torchvision's per-level
nonzero() synchronizes, so it cannot be captured: "n/a").
"""
import argparse
import math
import statistics
import sys
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import graphed, report, step, timed  # noqa: E402

import cupy_roi  # noqa: E402

IMAGE = (800, 1088)
STRIDES = (4, 8, 16, 32)
NAMES = ["p2", "p3", "p4", "p5"]
CASES = [  # (title, batch, rois per image, output size)
    ("box head 7x7", 2, 512, 7), ("box head 7x7", 8, 512, 7),
    ("mask head 14x14", 2, 128, 14), ("mask head 14x14", 8, 128, 14),
]


def pyramid(batch, channels, dtype, gen):
    return OrderedDict((name, torch.randn(batch, channels, IMAGE[0] // s, IMAGE[1] // s, generator=gen)
                        .to("cuda", dtype).requires_grad_(True)) for name, s in zip(NAMES, STRIDES))


def boxes_for(batch, per_image, dtype, gen):
    out = []
    for _ in range(batch):
        size = torch.exp(torch.rand(per_image, 2, generator=gen) * (math.log(800) - math.log(16)) + math.log(16))
        xy = torch.rand(per_image, 2, generator=gen) * (torch.tensor([IMAGE[1], IMAGE[0]]) - size * 0.5)
        out.append(torch.cat([xy, xy + size], 1).to("cuda", dtype))
    return out


def level_counts(boxes):
    s = torch.sqrt(torch.cat([(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for b in boxes]).double())
    lv = torch.clamp(torch.floor(4 + torch.log2(s / 224) + 1e-6), 2, 5) - 2
    return [int((lv == i).sum()) for i in range(4)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--graph", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torchvision

    gen = torch.Generator().manual_seed(0)
    lines = [f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; torchvision {torchvision.__version__}; "
             f"images {IMAGE[0]}x{IMAGE[1]}, P2-P5, C=256, sampling_ratio 2; median of {args.reps} runs (ms)", "",
             "| case | batch | dtype | pass | torchvision | cupy_roi | torchvision / cupy_roi |"
             + (" cupy_roi, graph |" if args.graph else ""),
             "|---|---:|---|---|---:|---:|---:|" + ("---:|" if args.graph else "")]
    speedups = []
    for title, batch, per_image, size in CASES:
        for dtype in (torch.float32, torch.float16):
            x = pyramid(batch, 256, dtype, gen)
            boxes = boxes_for(batch, per_image, dtype, gen)
            ours = cupy_roi.MultiScaleRoIAlign(NAMES, size, 2)
            theirs = torchvision.ops.MultiScaleRoIAlign(NAMES, size, 2)
            shapes = [IMAGE] * batch
            go = torch.randn(batch * per_image, 256, size, size, generator=gen).to("cuda", dtype)
            with torch.no_grad():
                a, b = ours(x, boxes, shapes), theirs(x, boxes, shapes)
                err = (a.float() - b.float()).abs().max().item()
            for label, backward in (("forward", False), ("forward+backward", True)):
                def run(module):
                    return step(lambda: module(x, boxes, shapes), list(x.values()), go, backward)
                t_tv = timed(run(theirs), reps=args.reps)
                t_ours = timed(run(ours), reps=args.reps)
                speedups.append(t_tv / t_ours)
                row = (f"| {title} | {batch} | {str(dtype).replace('torch.', '')} | {label} | {t_tv:.3f} | "
                       f"{t_ours:.3f} | {t_tv / t_ours:.2f}x |")
                if args.graph:
                    row += f" {timed(graphed(run(ours)), reps=args.reps):.3f} |"
                lines.append(row)
            lines.append(f"<!-- {title} batch {batch} {dtype}: boxes per level {level_counts(boxes)}, "
                         f"max |ours - torchvision| {err:.3g} -->")
            del x, go
            torch.cuda.empty_cache()
    geo = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
    lines += ["", f"Speed-up torchvision / cupy_roi: geometric mean {geo:.2f}x, smallest {min(speedups):.2f}x "
                  f"over {len(speedups)} rows"]

    # rotated RoIAlign beside roi_align on the same boxes and map (P3 of the batch-2 pyramid)
    lines += ["", "| rotated RoIAlign (P3 2x256x100x136, 1024 RoIs, 7x7) | dtype | pass | roi_align (angle 0 box) | "
                  "roi_align_rotated | rotated / roi_align |", "|---|---|---|---:|---:|---:|"]
    for dtype in (torch.float32, torch.float16):
        feat = torch.randn(2, 256, 100, 136, generator=gen).to("cuda", dtype).requires_grad_(True)
        k = 1024
        cxcy = torch.rand(k, 2, generator=gen) * torch.tensor([1088.0, 800.0])
        wh = torch.rand(k, 2, generator=gen) * 300 + 16
        angle = (torch.rand(k, 1, generator=gen) - 0.5) * 2 * math.pi
        bidx = torch.randint(0, 2, (k, 1), generator=gen).float()
        rot = torch.cat([bidx, cxcy, wh, angle], 1).cuda()
        ax = torch.cat([bidx, cxcy - wh / 2, cxcy + wh / 2], 1).cuda()
        go = torch.randn(k, 256, 7, 7, generator=gen).to("cuda", dtype)
        for label, backward in (("forward", False), ("forward+backward", True)):
            def run(fn):
                return step(fn, [feat], go, backward)
            t_ax = timed(run(lambda: cupy_roi.roi_align(feat, ax, 7, 1 / 8, 2, True)), reps=args.reps)
            t_rot = timed(run(lambda: cupy_roi.roi_align_rotated(feat, rot, 7, 1 / 8, 2)), reps=args.reps)
            lines.append(f"| | {str(dtype).replace('torch.', '')} | {label} | {t_ax:.3f} | {t_rot:.3f} | "
                         f"{t_rot / t_ax:.2f} |")
    report(lines, args.out)


if __name__ == "__main__":
    main()
