"""Two tuning questions measured before changing the package (float32 unless
noted, CUDA-graph replay, median of ``--reps``, ms):

1. Backward work order: the channel block B the backward kernels walk
   (``_rules.channel_block``; it also sets the forward's). For each case the
   rule's B and forced B in 1, 4, 16, 64, 256: forward, forward+backward, and
   their difference (the backward alone).
2. Occupancy of the grouped RoIAlign forward: the package's
   ``roi_align_forward`` compiled with ``__launch_bounds__(256, m)`` for
   minimum blocks per SM m (registers capped at 65536 / (256 m)), against the
   kernel as shipped, same launch arguments as the package's rule.
3. PrRoIPool's backward mode by bins per axis: the warp mode (the rule,
   ``_rules.channels_per_warp``) against the block mode (forced), float32,
   forward+backward with and without box gradients, for 7 to 32 bins.
4. RoIAlign with adaptive sampling (``sampling_ratio=0``: wide RoIs' sample
   columns are dense) forward and forward+backward, float32, beside
   torchvision; run it with PYTHONPATH on two trees to compare them.
5. PrRoIPool's coordinate kernel (``prroi_pool_coords``, the atomic box
   gradients) with 1, 4 or 8 output channels a thread forced (the rule:
   ``_rules.channels_per_thread``, as the forward), and with 8 on a channel
   block rounded up to 8 where the rule's block is smaller: forward+backward
   with box gradients minus features only, issue 14's cases and channels-last.

    python3 benchmarks/tuning.py [--reps 10] [--out FILE]
        [--part all|order|occupancy|prroi_bins|adaptive|prroi_coords]
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import graphed, report, step, timed  # noqa: E402
from boxes import rois_for  # noqa: E402
from multi_scale import IMAGE, NAMES, boxes_for, pyramid  # noqa: E402

import cupy_roi  # noqa: E402
from cupy_roi import _kernels, _rules  # noqa: E402

BLOCKS = (1, 4, 16, 64, 256)
MIN_BLOCKS = (5, 6, 8)


def backward_cases(gen):
    """(title, forward call, parameters that get gradients)."""
    x = torch.randn(16, 256, 200, 272, generator=gen).cuda().requires_grad_(True)
    r = rois_for(16, 512, 200, 272, 4, gen).cuda()
    yield "roi_align Mask R-CNN 7x7", (lambda: cupy_roi.roi_align(x, r, 7, 0.25, 2, True)), [x]
    xs = torch.randn(2, 256, 50, 68, generator=gen).cuda().requires_grad_(True)
    rs = rois_for(2, 512, 50, 68, 16, gen).cuda()
    yield "roi_align small", (lambda: cupy_roi.roi_align(xs, rs, 7, 1 / 16, 2, True)), [xs]
    for batch in (2, 8):
        feats = pyramid(batch, 256, torch.float32, gen)
        boxes = boxes_for(batch, 512, torch.float32, gen)
        module = cupy_roi.MultiScaleRoIAlign(NAMES, 7, 2)
        yield (f"FPN box head 7x7, batch {batch}", (lambda m=module, f=feats, b=boxes, n=batch: m(f, b, [IMAGE] * n)),
               list(feats.values()))


def backward_order(reps, lines):
    gen = torch.Generator().manual_seed(0)
    lines += ["## Backward work order (channel block B forced in forward and backward)", "",
              "| case | B | forward | forward+backward | backward |", "|---|---|---:|---:|---:|"]
    policy = _rules._channel_block
    for title, call, params in backward_cases(gen):
        go = torch.randn(call().shape, generator=gen).cuda()

        def both():
            for p in params:
                p.grad = None
            call().backward(go)

        def forward():
            with torch.no_grad():
                call()

        for block in ("rule",) + BLOCKS:
            if block != "rule":
                _rules._channel_block = lambda channels, *rest, b=block: math.gcd(channels, b)
            try:
                t_fwd = timed(graphed(forward), reps=reps)
                t_both = timed(graphed(both), reps=reps)
            finally:
                _rules._channel_block = policy
            lines.append(f"| {title} | {block} | {t_fwd:.3f} | {t_both:.3f} | {t_both - t_fwd:.3f} |")
            print(lines[-1], flush=True)
        del params
        torch.cuda.empty_cache()


def bounded_kernels(min_blocks, scalars, cpts):
    import cupy

    code = _kernels.source("roi_align")
    head = "__global__ void roi_align_forward("
    assert head in code
    code = code.replace(head, f"__global__ void __launch_bounds__({_kernels.BLOCK}, {min_blocks}) roi_align_forward(")
    keys = [(s, c) for s in scalars for c in cpts]
    names = {k: _kernels.kernel_expression("roi_align_forward", k[0], False, k[1]) for k in keys}
    module = cupy.RawModule(code=code, options=("--std=c++14",), name_expressions=list(names.values()))
    return {k: _kernels.Kernel("roi_align_forward", 0, module.get_function(n).kernel, "float32")
            for k, n in names.items()}


def occupancy(reps, lines):
    gen = torch.Generator().manual_seed(0)
    scalars, cpts = ("float32", "float16"), (1,) + _kernels.CHANNELS_PER_THREAD
    variants = {m: bounded_kernels(m, scalars, cpts) for m in MIN_BLOCKS}
    lines += ["", "## RoIAlign forward with __launch_bounds__(256, m)", "",
              "| case | layout | dtype | per thread | shipped | " + " | ".join(f"m = {m}" for m in MIN_BLOCKS) + " |",
              "|---|---|---|---:|---:|" + "---:|" * len(MIN_BLOCKS)]
    cases = [("Mask R-CNN 7x7", 16, 256, 200, 272, 4, 512, 7), ("Mask R-CNN 14x14", 16, 256, 200, 272, 4, 128, 14),
             ("small", 2, 256, 50, 68, 16, 512, 7)]
    with torch.no_grad():
        for title, n, c, h, w, stride, per_image, size in cases:
            r = rois_for(n, per_image, h, w, stride, gen).cuda().float().contiguous()
            for layout in ("nchw", "nhwc"):
                for scalar in scalars:
                    dtype = getattr(torch, scalar)
                    x = torch.randn(n, c, h, w, generator=gen).to("cuda", dtype)
                    if layout == "nhwc":
                        x = x.contiguous(memory_format=torch.channels_last)
                    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
                    out = torch.empty(r.shape[0], c, size, size, device="cuda", dtype=dtype).contiguous(
                        memory_format=fmt)
                    block = _rules.channel_block(0, x.stride(), x.shape, (size, size), c, x.element_size())
                    cpt = _rules.channels_per_thread(scalar, False, c, block)
                    args = (x.data_ptr(), n, h, w, *x.stride(), r.data_ptr(), r.shape[0], c, size, size, 1 / stride,
                            2, 1, block, out.data_ptr(), *out.stride())
                    blocks = _kernels.blocks_for(r.shape[0] * c * size * size // cpt)
                    shipped = _kernels.get_function("roi_align", "roi_align_forward", scalar, False, 0, cpt)
                    cells = []
                    for kernel in [shipped] + [variants[m][(scalar, cpt)] for m in MIN_BLOCKS]:
                        # the stream read at each call: graphed() captures on a side stream
                        cells.append(timed(graphed(lambda k=kernel: _kernels.launch(
                            k, blocks, torch.cuda.current_stream().cuda_stream, args)), reps=reps))
                    lines.append(f"| {title} | {layout} | {scalar} | {cpt} | " + " | ".join(f"{t:.3f}" for t in cells)
                                 + " |")
                    print(lines[-1], flush=True)
                    del x, out
                    torch.cuda.empty_cache()


def prroi_bins(reps, lines):
    gen = torch.Generator().manual_seed(0)
    lines += ["", "## PrRoIPool backward: warp mode against block mode by bins per axis (float32)", "",
              "| case | bins | pass | warp mode | block mode | warp / block |", "|---|---:|---|---:|---:|---:|"]
    rule = _rules.channels_per_warp
    for title, n, c, h, w, stride, per_image in (("8x256x64x64, K=4096, stride 8", 8, 256, 64, 64, 8, 512),
                                                 ("2x256x50x68, K=1024, stride 16", 2, 256, 50, 68, 16, 512)):
        x = torch.randn(n, c, h, w, generator=gen).cuda().requires_grad_(True)
        r = rois_for(n, per_image, h, w, stride, gen).cuda().requires_grad_(True)
        for size in (7, 16, 17, 24, 32):
            go = torch.randn(r.shape[0], c, size, size, generator=gen).cuda()
            for label, boxes in (("features", False), ("features and boxes", True)):
                def both(boxes=boxes):
                    x.grad = r.grad = None
                    cupy_roi.prroi_pool2d(x, r if boxes else r.detach(), size, size, 1 / stride).backward(go)

                cells = []
                for mode in ("warp", "block"):
                    if mode == "block":
                        _rules.channels_per_warp = lambda family, *rest: 0
                    try:
                        cells.append(timed(graphed(both), reps=reps))
                    finally:
                        _rules.channels_per_warp = rule
                lines.append(f"| {title} | {size} | {label} | {cells[0]:.3f} | {cells[1]:.3f} | "
                             f"{cells[0] / cells[1]:.2f} |")
                print(lines[-1], flush=True)
        del x, r
        torch.cuda.empty_cache()


def adaptive(reps, lines):
    import torchvision.ops as tv

    gen = torch.Generator().manual_seed(0)
    lines += ["", "## RoIAlign, adaptive sampling (sampling_ratio=0), float32, 7x7", "",
              "| case | pass | torchvision | cupy_roi | cupy_roi, graph |", "|---|---|---:|---:|---:|"]
    for title, n, c, h, w, stride, per_image in (("2x256x100x136, K=1024, stride 8", 2, 256, 100, 136, 8, 512),
                                                 ("8x256x64x64, K=4096, stride 8", 8, 256, 64, 64, 8, 512)):
        x = torch.randn(n, c, h, w, generator=gen).cuda().requires_grad_(True)
        r = rois_for(n, per_image, h, w, stride, gen).cuda()
        go = torch.randn(r.shape[0], c, 7, 7, generator=gen).cuda()
        for label, backward in (("forward", False), ("forward+backward", True)):
            ours = step(lambda: cupy_roi.roi_align(x, r, 7, 1 / stride, 0, True), [x], go, backward)
            theirs = step(lambda: tv.roi_align(x, r, 7, 1 / stride, 0, True), [x], go, backward)
            lines.append(f"| {title} | {label} | {timed(theirs, reps=reps):.3f} | {timed(ours, reps=reps):.3f} | "
                         f"{timed(graphed(ours), reps=reps):.3f} |")
            print(lines[-1], flush=True)
        del x, r, go
        torch.cuda.empty_cache()


def prroi_coords(reps, lines):
    gen = torch.Generator().manual_seed(0)
    lines += ["", "## PrRoIPool's coordinate kernel by channels per thread (float32; boxes minus features, graph)", "",
              "| case | features only | rule | 1 | 4 | 8 | 8, block rounded up to 8 |", "|---|---:|---:|---:|---:|---:|---:|"]
    backward, per_thread, block_rule = _rules.prroi_pool_backward, _rules.channels_per_thread, _rules.channel_block

    def forced(cpt, round_block):
        def launch(*args, **kwargs):  # the coordinate launch is the backward's only channels_per_thread call
            _rules.channels_per_thread = lambda scalar, ps, c_out, block: (
                cpt if c_out % cpt == 0 and block % cpt == 0 else 1)
            if round_block:
                _rules.channel_block = lambda *a: (lambda b: b if b == 0 else math.lcm(b, 8))(block_rule(*a))
            try:
                return backward(*args, **kwargs)
            finally:
                _rules.channels_per_thread, _rules.channel_block = per_thread, block_rule
        return launch

    for title, n, c, h, w, stride, per_image, layout in (
            ("8x256x64x64, K=4096, stride 8", 8, 256, 64, 64, 8, 512, torch.contiguous_format),
            ("16x256x200x272, K=8192, stride 4", 16, 256, 200, 272, 4, 512, torch.contiguous_format),
            ("2x256x50x68, K=1024, stride 16", 2, 256, 50, 68, 16, 512, torch.contiguous_format),
            ("8x256x64x64 channels-last", 8, 256, 64, 64, 8, 512, torch.channels_last)):
        x = torch.randn(n, c, h, w, generator=gen).cuda().contiguous(memory_format=layout).requires_grad_(True)
        r = rois_for(n, per_image, h, w, stride, gen).cuda().requires_grad_(True)
        go = torch.randn(r.shape[0], c, 7, 7, generator=gen).cuda()

        def run(boxes):
            x.grad = r.grad = None
            cupy_roi.prroi_pool2d(x, r if boxes else r.detach(), 7, 7, 1 / stride).backward(go)

        features = timed(graphed(lambda: run(False)), reps=reps)
        cells = []
        for cpt, round_block in (("rule", False), (1, False), (4, False), (8, False), (8, True)):
            if cpt != "rule":
                _rules.prroi_pool_backward = forced(cpt, round_block)
            try:
                # a rounded block moves the feature scatter too: its own features-only time
                base = timed(graphed(lambda: run(False)), reps=reps) if round_block else features
                cells.append(timed(graphed(lambda: run(True)), reps=reps) - base)
            finally:
                _rules.prroi_pool_backward = backward
        lines.append(f"| {title} | {features:.3f} | " + " | ".join(f"{t:.3f}" for t in cells) + " |")
        print(lines[-1], flush=True)
        del x, r, go
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--part", choices=("all", "order", "occupancy", "prroi_bins", "adaptive", "prroi_coords"),
                        default="all")
    args = parser.parse_args()
    lines = [f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; CUDA-graph replay, median of "
             f"{args.reps} (ms)", ""]
    if args.part in ("all", "order"):
        backward_order(args.reps, lines)
    if args.part in ("all", "occupancy"):
        occupancy(args.reps, lines)
    if args.part in ("all", "prroi_bins"):
        prroi_bins(args.reps, lines)
    if args.part in ("all", "adaptive"):
        adaptive(args.reps, lines)
    if args.part in ("all", "prroi_coords"):
        prroi_coords(args.reps, lines)
    report(lines, args.out)


if __name__ == "__main__":
    main()
