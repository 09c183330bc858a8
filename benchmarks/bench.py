"""cupy_roi against torchvision.ops, side by side, on one GPU.

CUDA events around each call, median of many runs after warm-up, fresh random
inputs (not zeros). Prints a Markdown table (and writes it to --out).
Columns: torchvision ms, cupy_roi ms (default settings: no RoI check, no
synchronization), the ratio cupy_roi / torchvision (below 1: cupy_roi is
faster), and with ``--graph`` the same two calls replayed from a CUDA graph
(the kernel-only floor, host work taken away). torchvision has no bfloat16
kernels here: bfloat16 rows compare with its float16. The geometric mean of
the ratio closes the table.
"""
import argparse
import math
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
    ("roi_align Mask R-CNN 7x7", "roi_align", "roi_align", 16, 256, 200, 272, 4, 512, 7, 2),
    ("roi_align Mask R-CNN 14x14", "roi_align", "roi_align", 16, 256, 200, 272, 4, 128, 14, 2),
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


def graphed(fn):
    """``fn`` captured once in a CUDA graph; returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--graph", action="store_true", help="add CUDA-graph replay columns")
    parser.add_argument("--only", default=None, help="run the cases whose title contains this text")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    header = "| case | dtype | pass | torchvision | cupy_roi | cupy_roi / torchvision |"
    rule = "|---|---|---|---:|---:|---:|"
    if args.graph:
        header += " torchvision, graph | cupy_roi, graph | graph ratio |"
        rule += "---:|---:|---:|"
    lines = [f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; median of {args.reps} runs (ms)", "",
             header, rule]
    ratios = []
    for (title, ours, anchor, n, c, h, w, stride, per_image, size, sr) in CASES:
        if args.only and args.only not in title:
            continue
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            anchor_dtype = torch.float16 if dtype == torch.bfloat16 else dtype
            x = torch.randn(n, c, h, w, generator=gen).to("cuda", dtype).requires_grad_(True)
            xa = x.detach().to(anchor_dtype).requires_grad_(True)
            r = rois_for(n, per_image, h, w, stride, gen).to("cuda")
            ra = r.to(anchor_dtype)  # torchvision wants RoIs in the input's dtype
            scale = 1.0 / stride
            passes = [("forward", False), ("forward+backward", True)]
            if ours == "prroi_pool2d":
                passes.append(("forward+backward, with box gradient", "coords"))
            for label, backward in passes:
                rr = r.clone().requires_grad_(backward == "coords")
                out = call_ours(ours, x, rr, size, scale, sr)
                go = torch.randn(out.shape, generator=gen).to("cuda", dtype)
                go_a = go.to(anchor_dtype)

                def mine(rr=rr):
                    return call_ours(ours, x, rr, size, scale, sr)

                def theirs():
                    return call_anchor(anchor, xa, ra, size, scale, sr)

                if backward:
                    f_mine = forward_backward(mine, x, go)
                    f_theirs = forward_backward(theirs, xa, go_a)
                else:
                    f_mine, f_theirs = mine, theirs
                with torch.no_grad() if not backward else torch.enable_grad():
                    t_tv = timed(f_theirs, reps=args.reps)
                    t_me = timed(f_mine, reps=args.reps)
                    cells = ""
                    if args.graph:
                        g = []
                        for f in (f_theirs, f_mine):
                            try:
                                g.append(timed(graphed(f), reps=args.reps))
                            except RuntimeError as e:  # a call that cannot be captured
                                print(f"# {title} {label}: no graph ({e})")
                                g.append(float("nan"))
                        cells = f" {g[0]:.3f} | {g[1]:.3f} | {g[1] / g[0]:.2f} |"
                ratios.append(t_me / t_tv)
                anchor_label = "" if backward != "coords" else " (roi_align fwd+bwd)"
                dname = str(dtype).replace("torch.", "") + (" (tv: float16)" if dtype == torch.bfloat16 else "")
                lines.append(f"| {title} | {dname} | {label}{anchor_label} | "
                             f"{t_tv:.3f} | {t_me:.3f} | {t_me / t_tv:.2f} |{cells}")
            del x, xa, r
            torch.cuda.empty_cache()
    geo = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
    lines += ["", f"Geometric mean of cupy_roi / torchvision over {len(ratios)} rows: {geo:.2f}; "
                  f"rows above 1.0: {sum(v > 1.0 for v in ratios)}"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
