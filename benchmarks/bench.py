"""cupy_roi against torchvision.ops, side by side, on one GPU.

CUDA events around each call, median of many runs after warm-up, fresh random
inputs (not zeros). Prints a Markdown table (and writes it to --out).
Columns: torchvision ms, cupy_roi ms (default settings: no RoI check, no
synchronization), the ratio cupy_roi / torchvision (below 1: cupy_roi is
faster), and with ``--graph`` the same two calls replayed from a CUDA graph
(the kernel-only floor, host work taken away). torchvision has no bfloat16
kernels here: bfloat16 rows compare with its float16. The geometric mean of
the ratio closes the table.

``--deterministic`` adds a second table: cupy_roi's forward+backward with float
atomics against the deterministic backward (``deterministic=True``), eager and
from a CUDA graph, and the backward alone as graph(forward+backward) minus
graph(forward), for every case above plus multi-level (FPN) and rotated
RoIAlign; and the reference path that deterministic mode ran before.
"""
import argparse
import math
import statistics

import torch
import torchvision.ops as tv

import cupy_roi
from boxes import rois_for  # noqa: F401 (the other benchmarks import it from here too)


def report(lines, out=None):
    """Print a benchmark's Markdown lines, and write them to ``out`` when given."""
    table = "\n".join(lines)
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")


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


def step(op, params, go, backward):
    """``op()`` as one timed step: under ``torch.no_grad``, or (``backward``)
    forward+backward against ``go`` after clearing the gradients of ``params``."""
    def run():
        if not backward:
            with torch.no_grad():
                op()
            return
        for p in params:
            p.grad = None
        op().backward(go)
    return run


def forward_backward(op, x, go):
    return step(op, [x], go, True)


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


def call_ours(name, x, r, size, scale, sr, deterministic=False):
    if name in ("roi_align",):
        return cupy_roi.roi_align(x, r, size, scale, sr, True, deterministic)
    if name == "ps_roi_align":
        return cupy_roi.ps_roi_align(x, r, size, scale, sr, True, deterministic)
    if name == "roi_pool":
        return cupy_roi.roi_pool(x, r, size, scale, deterministic)
    if name == "ps_roi_pool":
        return cupy_roi.ps_roi_pool(x, r, size, scale, deterministic)
    if name == "multi_scale_roi_align":  # x: the finest level; four levels, torchvision's mapping
        levels = [x] + [x[..., ::2 ** i, ::2 ** i] for i in range(1, 4)]
        return cupy_roi.multi_scale_roi_align(levels, r, size, [scale / 2 ** i for i in range(4)], sr,
                                              deterministic=deterministic)
    if name == "roi_align_rotated":  # r: (b, cx, cy, w, h, angle)
        return cupy_roi.roi_align_rotated(x, r, size, scale, sr, True, deterministic=deterministic)
    return cupy_roi.prroi_pool2d(x, r, size, size, scale, deterministic)


# torchvision ops that cannot be captured in a CUDA graph: their graph cell
# stays nan without trying (a failed capture can fail the process's next one;
# overhead.py runs its compiled cases in fresh processes for that reason).
UNCAPTURABLE_ANCHORS = frozenset(("ps_roi_align",))


def call_anchor(name, x, r, size, scale, sr):
    if name == "roi_align":
        return tv.roi_align(x, r, size, scale, sr, True)
    if name == "ps_roi_align":
        return tv.ps_roi_align(x, r, size, scale, sr)
    if name == "roi_pool":
        return tv.roi_pool(x, r, size, scale)
    return tv.ps_roi_pool(x, r, size, scale)


def call_reference(name, x, r, size, scale, sr):
    """What deterministic mode ran before it had kernels: the pure-PyTorch
    reference path on the GPU, differentiated by autograd."""
    from cupy_roi import _reference

    if name in ("roi_align", "ps_roi_align"):
        return _reference.roi_align(x, r, (size, size), scale, sr, True, name == "ps_roi_align")
    if name in ("roi_pool", "ps_roi_pool"):
        return _reference.roi_pool(x, r, (size, size), scale, name == "ps_roi_pool")
    return _reference.prroi_pool(x, r, (size, size), scale, False)


DETERMINISTIC_CASES = CASES + [
    ("multi_scale_roi_align FPN", "multi_scale_roi_align", None, 2, 256, 200, 272, 4, 512, 7, 2),
    ("roi_align_rotated", "roi_align_rotated", None, 2, 256, 100, 136, 8, 512, 7, 2),
]


def deterministic_table(args, gen):
    """cupy_roi's backward, float atomics vs deterministic."""
    lines = ["", "cupy_roi forward+backward, float atomics vs deterministic=True (ms); backward = graph(fwd+bwd) "
                 "- graph(fwd); last column: the reference path deterministic mode used before (eager fwd+bwd)", "",
             "| case | dtype | gradients | fwd+bwd atomic | fwd+bwd det | atomic, graph | det, graph | "
             "backward atomic | backward det | backward det / atomic | reference path (before) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = []
    for (title, ours, _, n, c, h, w, stride, per_image, size, sr) in DETERMINISTIC_CASES:
        if args.only and args.only not in title:
            continue
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(n, c, h, w, generator=gen).to("cuda", dtype).requires_grad_(True)
            r = rois_for(n, per_image, h, w, stride, gen).to("cuda")
            if ours == "roi_align_rotated":
                centre, extent = (r[:, 1:3] + r[:, 3:5]) / 2, r[:, 3:5] - r[:, 1:3]
                angle = torch.rand(len(r), generator=gen).to("cuda") * 6.28 - 3.14
                r = torch.cat([r[:, :1], centre, extent, angle[:, None]], 1)
            kinds = [("features", False)] + ([("features and boxes", True)] if ours == "prroi_pool2d" else [])
            for label, coords in kinds:
                rr = r.clone().requires_grad_(coords)
                go = torch.randn(call_ours(ours, x, rr, size, 1.0 / stride, sr).shape, generator=gen).to("cuda", dtype)

                def op(det, rr=rr):
                    return call_ours(ours, x, rr, size, 1.0 / stride, sr, det)

                def fwd_bwd(det, rr=rr):
                    return step(lambda: op(det), [x, rr], go, True)

                with torch.no_grad():
                    t_fwd = timed(graphed(lambda: op(False)), reps=args.reps)
                t = [timed(fwd_bwd(False), reps=args.reps), timed(fwd_bwd(True), reps=args.reps),
                     timed(graphed(fwd_bwd(False)), reps=args.reps), timed(graphed(fwd_bwd(True)), reps=args.reps)]
                b_atomic, b_det = t[2] - t_fwd, t[3] - t_fwd
                ratios.append(b_det / b_atomic)
                before = "-"
                work = len(r) * c * size * size * 4
                if dtype == torch.float32 and ours not in ("multi_scale_roi_align", "roi_align_rotated") \
                        and work < 3e8:
                    def reference(rr=rr):
                        x.grad = rr.grad = None
                        call_reference(ours, x, rr, size, 1.0 / stride, sr).backward(go)
                    before = f"{timed(reference, warmup=1, reps=3):.3f}"
                dname = str(dtype).replace("torch.", "")
                lines.append(f"| {title} | {dname} | {label} | {t[0]:.3f} | {t[1]:.3f} | {t[2]:.3f} | {t[3]:.3f} | "
                             f"{b_atomic:.3f} | {b_det:.3f} | {b_det / b_atomic:.2f} | {before} |")
            del x, r
            torch.cuda.empty_cache()
    if ratios:
        lines += ["", f"Deterministic / atomic backward (graph replay, forward subtracted): max {max(ratios):.2f}, "
                      f"geometric mean "
                      f"{math.exp(sum(math.log(v) for v in ratios) / len(ratios)):.2f} over {len(ratios)} rows"]
    return lines


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
    parser.add_argument("--deterministic", action="store_true",
                        help="add the table of atomic vs deterministic backward times")
    parser.add_argument("--skip-anchor", action="store_true", help="only the deterministic table")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    header = "| case | dtype | pass | torchvision | cupy_roi | cupy_roi / torchvision |"
    rule = "|---|---|---|---:|---:|---:|"
    if args.graph:
        header += " torchvision, graph | cupy_roi, graph | graph ratio |"
        rule += "---:|---:|---:|"
    lines = [f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; median of {args.reps} runs (ms)", ""]
    if not args.skip_anchor:
        lines += [header, rule]
    ratios = []
    for (title, ours, anchor, n, c, h, w, stride, per_image, size, sr) in CASES:
        if args.skip_anchor or (args.only and args.only not in title):
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
                with torch.no_grad():  # the shape alone: no autograd graph kept alive into the captures below
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
                        for f, library in ((f_theirs, "torchvision"), (f_mine, "cupy_roi")):
                            if library == "torchvision" and anchor in UNCAPTURABLE_ANCHORS:
                                g.append(float("nan"))
                                continue
                            try:
                                g.append(timed(graphed(f), reps=args.reps))
                            except RuntimeError as e:  # a call that cannot be captured
                                print(f"# {title} {label}, {library}: no graph ({e})")
                                g.append(float("nan"))
                        cells = f" {g[0]:.3f} | {g[1]:.3f} | {g[1] / g[0]:.2f} |"
                ratios.append(t_me / t_tv)
                anchor_label = "" if backward != "coords" else " (roi_align fwd+bwd)"
                dname = str(dtype).replace("torch.", "") + (" (tv: float16)" if dtype == torch.bfloat16 else "")
                lines.append(f"| {title} | {dname} | {label}{anchor_label} | "
                             f"{t_tv:.3f} | {t_me:.3f} | {t_me / t_tv:.2f} |{cells}")
            del x, xa, r
            torch.cuda.empty_cache()
    if ratios:
        geo = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
        lines += ["", f"Geometric mean of cupy_roi / torchvision over {len(ratios)} rows: {geo:.2f}; "
                      f"rows above 1.0: {sum(v > 1.0 for v in ratios)}"]
    if args.deterministic:
        lines += deterministic_table(args, gen)
    report(lines, args.out)


if __name__ == "__main__":
    main()
