"""PrRoIPool on issue 14's three cases (float32, 7x7, boxes as in bench.py):
forward, forward+backward (features), forward+backward with box gradients,
eager (CUDA events, median) and replayed from a CUDA graph (kernels only),
beside torchvision's roi_align forward+backward on the same input (sampling
ratio 2), and the original implementation's H100 times from the issue.

    python3 benchmarks/prroi_cases.py [--reps 10] [--label NAME] [--out FILE]

Run it with PYTHONPATH pointing at another tree to compare versions; --label
names the tree in the table. ``--layouts`` adds the detector case's
forward+backward with box gradients in the other layouts and modes:
channels-last, position-sensitive (ps_prroi_pool, 10 x 49 channels) and
deterministic.
"""
import argparse
import os
import sys

import torch
import torchvision.ops as tv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import forward_backward, graphed, report, timed  # noqa: E402
from boxes import rois_for  # noqa: E402

import cupy_roi  # noqa: E402

# title, N, C, H, W, stride, RoIs per image; the original's H100 ms from issue 14
# (forward / + feature backward / + box backward)
CASES = [("8x256x64x64, K=4096, stride 8", 8, 256, 64, 64, 8, 512, (2.97, 16.90, 124.92)),
         ("16x256x200x272, K=8192, stride 4", 16, 256, 200, 272, 4, 512, (57.46, 450.97, 695.89)),
         ("2x256x50x68, K=1024, stride 16", 2, 256, 50, 68, 16, 512, (0.75, 4.37, 32.50))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--out", default=None)
    parser.add_argument("--once", type=int, default=None, metavar="CASE",
                        help="run forward+backward with box gradients of case CASE (0-2) once, for ncu")
    parser.add_argument("--layouts", action="store_true",
                        help="add the detector case with box gradients in other layouts and modes")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    lines = [f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; tree: {args.label}; float32, 7x7; "
             f"median of {args.reps} runs (ms; graph: replayed from a CUDA graph)", "",
             "| case | pass | cupy_roi | cupy_roi, graph | torchvision roi_align fwd+bwd | ratio to it "
             "| original (H100, issue 14) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for case, (title, n, c, h, w, stride, per_image, original) in enumerate(CASES):
        if args.once is not None and case != args.once:
            continue
        x = torch.randn(n, c, h, w, generator=gen).to("cuda").requires_grad_(True)
        r = rois_for(n, per_image, h, w, stride, gen).to("cuda")
        scale = 1.0 / stride
        go = torch.randn(len(r), c, 7, 7, generator=gen).to("cuda")
        rr = r.clone().requires_grad_(True)

        def boxes():
            x.grad = rr.grad = None
            cupy_roi.prroi_pool2d(x, rr, 7, 7, scale).backward(go)

        def forward():
            with torch.no_grad():
                cupy_roi.prroi_pool2d(x, r, 7, 7, scale)

        if args.once is not None:
            boxes()
            torch.cuda.synchronize()
            return
        anchor = forward_backward(lambda: tv.roi_align(x, r, 7, scale, 2), x, go)
        t_anchor = timed(anchor, reps=args.reps)
        runs = [("forward", forward),
                ("forward+backward", forward_backward(lambda: cupy_roi.prroi_pool2d(x, r, 7, 7, scale), x, go)),
                ("forward+backward, with box gradients", boxes)]
        for (label, fn), t_orig in zip(runs, original):
            t = timed(fn, reps=args.reps)
            t_graph = timed(graphed(fn), reps=args.reps)
            lines.append(f"| {title} | {label} | {t:.3f} | {t_graph:.3f} | {t_anchor:.3f} | {t / t_anchor:.2f} "
                         f"| {t_orig:.2f} |")
        del x, r, rr, go
        torch.cuda.empty_cache()
    if args.layouts:
        lines += layout_rows(gen, args.reps)
    report(lines, args.out)


def layout_rows(gen, reps):
    """The detector case (8 images, 64x64, 4096 RoIs, stride 8) with box
    gradients in the layouts and modes the main table does not take."""
    n, h, w, stride = 8, 64, 64, 8
    r = rois_for(n, 512, h, w, stride, gen).to("cuda")
    lines = ["", "| detector case, forward+backward with box gradients | cupy_roi | cupy_roi, graph |",
             "|---|---:|---:|"]
    variants = [("channels-last, 256 channels", 256, torch.channels_last, False, False),
                ("ps_prroi_pool, 10 x 49 channels", 490, torch.contiguous_format, True, False),
                ("deterministic, 256 channels", 256, torch.contiguous_format, False, True)]
    for label, c, layout, ps, det in variants:
        x = torch.randn(n, c, h, w, generator=gen).to("cuda").contiguous(memory_format=layout).requires_grad_(True)
        rr = r.clone().requires_grad_(True)
        c_out = c // 49 if ps else c
        go = torch.randn(len(r), c_out, 7, 7, generator=gen).to("cuda")

        def boxes():
            x.grad = rr.grad = None
            if ps:
                out = cupy_roi.ps_prroi_pool(x, rr, 7, 1.0 / stride, deterministic=det)
            else:
                out = cupy_roi.prroi_pool2d(x, rr, 7, 7, 1.0 / stride, deterministic=det)
            out.backward(go)

        lines.append(f"| {label} | {timed(boxes, reps=reps):.3f} | {timed(graphed(boxes), reps=reps):.3f} |")
        del x, rr, go
        torch.cuda.empty_cache()
    return lines


if __name__ == "__main__":
    main()
