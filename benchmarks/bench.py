"""cupy_roi against torchvision.ops, side by side, on one GPU.

CUDA events around each call, median of many runs after warm-up, fresh random
inputs (not zeros). Prints a Markdown table (and writes it to --out).
Columns: torchvision ms, cupy_roi ms (default: RoI check on, one small
device-to-host copy per call), cupy_roi ms with ``roi_checks(False)``, and the
ratio cupy_roi / torchvision (below 1: cupy_roi is faster).
"""
import argparse
import statistics

import torch
import torchvision.ops as tv

import cupy_roi


def rois_for(n, per_image, height, width, stride, gen):
    img_h, img_w = height * stride, width * stride
    k = n * per_image
    size = torch.rand(k, 2, generator=gen) * 0.5 * torch.tensor([img_w, img_h]) + 16
    xy = torch.rand(k, 2, generator=gen) * torch.tensor([img_w, img_h]) - size / 2
    b = torch.arange(n).repeat_interleave(per_image)[torch.randperm(k, generator=gen)]
    return torch.cat([b[:, None].float(), xy, xy + size], dim=1)


def timed(fn, warmup=5, reps=30):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def forward_backward(op, x, go):
    def run():
        x.grad = None
        op().backward(go)
    return run


CASES = [
    # name, ours, anchor, N, C, H, W, stride, rois/image, output, sampling
    ("ps_roi_align R-FCN", "ps_roi_align", "ps_roi_align", 8, 21 * 49, 38, 63, 16, 300, 7, 2),
    ("ps_roi_align Light-Head", "ps_roi_align", "ps_roi_align", 8, 10 * 49, 50, 84, 16, 1000, 7, 2),
    ("roi_align Mask R-CNN", "roi_align", "roi_align", 16, 256, 200, 272, 4, 512, 7, 2),
    ("roi_align small", "roi_align", "roi_align", 2, 256, 50, 68, 16, 512, 7, 2),
    ("roi_pool small", "roi_pool", "roi_pool", 2, 256, 50, 68, 16, 512, 7, 0),
    ("ps_roi_pool R-FCN", "ps_roi_pool", "ps_roi_pool", 8, 21 * 49, 38, 63, 16, 300, 7, 0),
    ("prroi_pool2d detector (anchor: roi_align)", "prroi_pool2d", "roi_align", 8, 256, 64, 64, 8, 512, 7, 2),
]


def call_ours(name, x, r, size, scale, sr):
    if name in ("roi_align",):
        return cupy_roi.roi_align(x, r, size, scale, sr, True)
    if name == "ps_roi_align":
        return cupy_roi.ps_roi_align(x, r, size, scale, sr)
    if name == "roi_pool":
        return cupy_roi.roi_pool(x, r, size, scale)
    if name == "ps_roi_pool":
        return cupy_roi.ps_roi_pool(x, r, size, scale)
    return cupy_roi.prroi_pool2d(x, r, size, size, scale)


def call_anchor(name, x, r, size, scale, sr):
    if name == "roi_align":
        return tv.roi_align(x, r, size, scale, sr, True)
    if name == "ps_roi_align":
        return tv.ps_roi_align(x, r, size, scale, sr)
    if name == "roi_pool":
        return tv.roi_pool(x, r, size, scale)
    return tv.ps_roi_pool(x, r, size, scale)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    lines = [f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; median of {args.reps} runs (ms)", "",
             "| case | dtype | pass | torchvision | cupy_roi | cupy_roi, checks off | cupy_roi / torchvision |",
             "|---|---|---|---:|---:|---:|---:|"]
    for (title, ours, anchor, n, c, h, w, stride, per_image, size, sr) in CASES:
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(n, c, h, w, generator=gen).to("cuda", dtype).requires_grad_(True)
            r = rois_for(n, per_image, h, w, stride, gen).to("cuda", dtype)
            scale = 1.0 / stride
            passes = [("forward", False), ("forward+backward", True)]
            if ours == "prroi_pool2d":
                passes.append(("forward+backward, with box gradient", "coords"))
            for label, backward in passes:
                rr = r.float().clone().requires_grad_(backward == "coords")
                out = call_ours(ours, x, rr, size, scale, sr)
                go = torch.randn(out.shape, generator=gen).to("cuda", dtype)

                def mine(rr=rr):
                    return call_ours(ours, x, rr, size, scale, sr)

                def theirs():
                    return call_anchor(anchor, x, r, size, scale, sr)

                if backward:
                    f_mine = forward_backward(mine, x, go)
                    f_theirs = forward_backward(theirs, x, go)
                else:
                    f_mine, f_theirs = mine, theirs
                with torch.no_grad() if not backward else torch.enable_grad():
                    t_tv = timed(f_theirs, reps=args.reps)
                    t_me = timed(f_mine, reps=args.reps)
                    with cupy_roi.roi_checks(False):
                        t_fast = timed(f_mine, reps=args.reps)
                anchor_label = "" if backward != "coords" else " (roi_align fwd+bwd)"
                lines.append(f"| {title} | {str(dtype).replace('torch.', '')} | {label}{anchor_label} | "
                             f"{t_tv:.3f} | {t_me:.3f} | {t_fast:.3f} | {t_me / t_tv:.2f} |")
            del x, r
            torch.cuda.empty_cache()
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
