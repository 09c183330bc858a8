"""Issue 14: the kernels' work order and L2 reuse, beside torchvision, float32.

For each case and layout: forward and forward+backward, eager (CUDA events
around the call: wall clock of the queued work) and replayed from a CUDA graph
(kernel time, host work taken away), for torchvision.ops and cupy_roi. Run it
under two checkouts (PYTHONPATH) to compare kernel versions.

``--once`` runs one forward+backward per case of roi_align's Mask R-CNN case
in both layouts, for Nsight Compute (``--grouped``: RoIs in image order)::

    ncu --kernel-name regex:roi_align --metrics dram__bytes_read.sum,... \\
        python3 benchmarks/work_order.py --once
"""
import argparse
import os
import sys

import torch
import torchvision.ops as tv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import call_anchor, call_ours, graphed, rois_for, step, timed  # noqa: E402

import cupy_roi  # noqa: E402

CASES = [
    # name, ours, anchor, N, C, H, W, stride, rois/image, output, sampling, layouts
    ("roi_align Mask R-CNN 7x7", "roi_align", "roi_align", 16, 256, 200, 272, 4, 512, 7, 2, ("nchw", "nhwc")),
    ("roi_align Mask R-CNN 14x14", "roi_align", "roi_align", 16, 256, 200, 272, 4, 128, 14, 2, ("nchw", "nhwc")),
    ("roi_align small", "roi_align", "roi_align", 2, 256, 50, 68, 16, 512, 7, 2, ("nchw",)),
    ("ps_roi_align R-FCN", "ps_roi_align", "ps_roi_align", 8, 21 * 49, 38, 63, 16, 300, 7, 2, ("nchw",)),
    ("roi_pool small", "roi_pool", "roi_pool", 2, 256, 50, 68, 16, 512, 7, 0, ("nchw",)),
    ("ps_roi_pool R-FCN", "ps_roi_pool", "ps_roi_pool", 8, 21 * 49, 38, 63, 16, 300, 7, 0, ("nchw",)),
    ("prroi_pool2d detector (anchor: roi_align)", "prroi_pool2d", "roi_align", 8, 256, 64, 64, 8, 512, 7, 2,
     ("nchw",)),
    ("prroi_pool2d Mask R-CNN (anchor: roi_align)", "prroi_pool2d", "roi_align", 16, 256, 200, 272, 4, 512, 7, 2,
     ("nchw",)),
]


def inputs(n, c, h, w, stride, per_image, layout, gen, grouped=False):
    """``grouped``: RoIs in image order, as detectors hand them over
    (torchvision's MultiScaleRoIAlign concatenates each image's boxes);
    otherwise shuffled across images, the case where the RoIs running together
    read from every image."""
    x = torch.randn(n, c, h, w, generator=gen).to("cuda")
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    r = rois_for(n, per_image, h, w, stride, gen)
    if grouped:
        r = r[torch.sort(r[:, 0], stable=True).indices]
    return x.requires_grad_(True), r.to("cuda")


def once(grouped):
    gen = torch.Generator().manual_seed(0)
    title, ours, anchor, n, c, h, w, stride, per_image, size, sr, layouts = CASES[0]
    for layout in layouts:
        x, r = inputs(n, c, h, w, stride, per_image, layout, gen, grouped)
        for fn in (call_anchor, call_ours):
            x.grad = None
            out = fn(ours, x, r, size, 1.0 / stride, sr)
            out.backward(torch.ones_like(out))
            torch.cuda.synchronize()
            print(f"{fn.__name__} {layout}: done")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--grouped", action="store_true", help="RoIs in image order (see inputs)")
    parser.add_argument("--only", default="", help="the cases whose title contains this")
    args = parser.parse_args()
    if args.once:
        return once(args.grouped)
    gen = torch.Generator().manual_seed(0)
    order = "RoIs in image order" if args.grouped else "RoIs shuffled across images"
    lines = [f"{args.label}: {torch.cuda.get_device_name()}, torch {torch.__version__}, float32, {order}, "
             f"median of {args.reps} (ms)", "",
             "| case | layout | pass | torchvision | cupy_roi | ratio | torchvision, graph | cupy_roi, graph | "
             "graph ratio |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for title, ours, anchor, n, c, h, w, stride, per_image, size, sr, layouts in CASES:
        if args.only not in title:
            continue
        for layout in layouts:
            x, r = inputs(n, c, h, w, stride, per_image, layout, gen, args.grouped)
            scale = 1.0 / stride
            go = torch.randn(call_ours(ours, x, r, size, scale, sr).shape, generator=gen).to("cuda")
            passes = [("forward", False), ("forward+backward", True)]
            if ours == "prroi_pool2d":
                passes.append(("forward+backward, box gradient", "coords"))
            for label, backward in passes:
                rr = r.clone().requires_grad_(backward == "coords")

                def run(fn, name, rr):
                    return step(lambda: fn(name, x, rr, size, scale, sr), [x, rr], go, backward)

                cols = []
                # ours first: a call that cannot be captured (torchvision's
                # ps_roi_align) may leave the next capture failing too
                for fn, name, rows in ((call_ours, ours, rr), (call_anchor, anchor, r)):
                    eager = timed(run(fn, name, rows), reps=args.reps)
                    try:
                        graph = timed(graphed(run(fn, name, rows)), reps=args.reps)
                    except Exception as e:  # noqa: BLE001 - reported in the table as nan
                        print(f"# {title} {label}: no graph ({type(e).__name__})")
                        graph = float("nan")
                    cols.append((eager, graph))
                (me_e, me_g), (tv_e, tv_g) = cols
                lines.append(f"| {title} | {layout} | {label} | {tv_e:.3f} | {me_e:.3f} | {me_e / tv_e:.2f} | "
                             f"{tv_g:.3f} | {me_g:.3f} | {me_g / tv_g:.2f} |")
                print(lines[-1], flush=True)
            del x, r, go
            torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
