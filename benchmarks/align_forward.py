"""RoIAlign forward kernel versions side by side (issue 14): the package's
``roi_align_forward`` against ``candidates/roi_align_forward_cpt.cu`` (several
output channels per thread) and torchvision, kernel launches only (no host
layers), median of CUDA-event timings, float32 and float16, NCHW and
channels_last. Each candidate's output is compared with the package's (relative
difference of the norms; NaN rows of invalid RoIs excluded).

    python3 benchmarks/align_forward.py [--reps 20] [--cpt 2,4,8] [--out FILE]
        [--case SUBSTRING] [--layout nchw|nhwc] [--dtype float32|float16]

The filters pick one configuration, e.g. to profile it under Nsight Compute
with ``--reps 1`` (each kernel then runs 1 + 5 warm-up times).
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torchvision.ops as tv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import report, timed  # noqa: E402
from boxes import rois_for  # noqa: E402

from cupy_roi import _kernels, _rules  # noqa: E402

HERE = Path(__file__).resolve().parent
CASES = [
    # title, N, C, H, W, stride, RoIs per image, output, position-sensitive
    ("roi_align Mask R-CNN 7x7", 16, 256, 200, 272, 4, 512, 7, False),
    ("roi_align Mask R-CNN 14x14", 16, 256, 200, 272, 4, 128, 14, False),
    ("roi_align small", 2, 256, 50, 68, 16, 512, 7, False),
    ("ps_roi_align R-FCN", 8, 21 * 49, 38, 63, 16, 300, 7, True),
]


def compile_candidates(cpts, scalars):
    """{(scalar, ps, cpt): Kernel} of the candidate, compiled after the package's roi_align.cu."""
    import cupy

    code = _kernels.source("roi_align") + "\n" + (HERE / "candidates" / "roi_align_forward_cpt.cu").read_text()
    keys = [(s, ps, cpt) for s in scalars for ps in (False, True) for cpt in cpts]
    names = {k: f"roi_align_forward_cpt<{_kernels.CUDA_TYPES[k[0]]}, {'true' if k[1] else 'false'}, {k[2]}>"
             for k in keys}
    module = cupy.RawModule(code=code, options=("--std=c++14",), name_expressions=list(names.values()))
    return {k: _kernels.Kernel("roi_align_forward", 0, module.get_function(n).kernel,
                               "float64" if k[0] == "float64" else "float32") for k, n in names.items()}


def launcher(kernel, x, rows, size, scale, ps, cpt):
    n, c, h, w = x.shape
    c_out = c // (size * size) if ps else c
    fmt = torch.channels_last if x.stride(1) == 1 else torch.contiguous_format
    out = torch.empty((rows.shape[0], c_out, size, size), dtype=x.dtype, device=x.device).contiguous(
        memory_format=fmt)
    block = _rules.channel_block(0, x.stride(), x.shape, (size, size), c_out, x.element_size())
    args = (x.data_ptr(), n, h, w, *x.stride(), rows.data_ptr(), rows.shape[0], c_out, size, size, scale, 2, 1,
            block, out.data_ptr(), *out.stride())
    groups = -(-c_out // cpt)
    blocks = _kernels.blocks_for(rows.shape[0] * groups * size * size)
    return (lambda: _kernels.launch(kernel, blocks, torch.cuda.current_stream().cuda_stream, args)), out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--cpt", default="2,4,8", help="channels per thread of the candidates")
    parser.add_argument("--out", default=None)
    parser.add_argument("--case", default="", help="only cases whose title contains this")
    parser.add_argument("--layout", choices=("nchw", "nhwc"), default=None)
    parser.add_argument("--dtype", choices=("float32", "float16"), default=None)
    args = parser.parse_args()
    cpts = [int(v) for v in args.cpt.split(",")]
    scalars = ("float32", "float16")
    candidates = compile_candidates(cpts, scalars)
    gen = torch.Generator().manual_seed(0)
    lines = [f"GPU: {torch.cuda.get_device_name()}; kernel launches only, median of {args.reps} (ms); "
             "diff: relative to the package's kernel", "",
             "| case | layout | dtype | torchvision | package | " +
             " | ".join(f"{c} ch/thread | diff" for c in cpts) + " |",
             "|---|---|---|---:|---:|" + "---:|---:|" * len(cpts)]
    with torch.no_grad():
        for title, n, c, h, w, stride, per_image, size, ps in CASES:
            if args.case not in title:
                continue
            for layout in ("nchw", "nhwc"):
                if (ps and layout == "nhwc") or args.layout not in (None, layout):
                    continue
                for dtype in (torch.float32, torch.float16):
                    scalar = str(dtype).replace("torch.", "")
                    if args.dtype not in (None, scalar):
                        continue
                    x = torch.randn(n, c, h, w, generator=gen).to("cuda", dtype)
                    if layout == "nhwc":
                        x = x.contiguous(memory_format=torch.channels_last)
                    r = rois_for(n, per_image, h, w, stride, gen).to("cuda")
                    rows = r.float().contiguous()
                    scale = 1.0 / stride
                    rt = r.to(dtype)
                    anchor = (lambda: tv.ps_roi_align(x, rt, size, scale, 2)) if ps else \
                        (lambda: tv.roi_align(x, rt, size, scale, 2, True))
                    package = _kernels.get_function("roi_align", "roi_align_forward", scalar, ps, 0)
                    run_pkg, ref = launcher(package, x, rows, size, scale, ps, 1)
                    cells = [timed(anchor, reps=args.reps), timed(run_pkg, reps=args.reps)]
                    ref = ref.double()
                    diffs = []
                    for cpt in cpts:
                        run, out = launcher(candidates[(scalar, ps, cpt)], x, rows, size, scale, ps, cpt)
                        out.fill_(float("nan"))  # poisoned: every element must be written
                        cells.append(timed(run, reps=args.reps))
                        got = out.double()
                        diffs.append(float((got - ref).norm() / ref.norm()))
                    row = f"| {title} | {layout} | {scalar} | {cells[0]:.3f} | {cells[1]:.3f} | " + " | ".join(
                        f"{t:.3f} | {d:.1e}" for t, d in zip(cells[2:], diffs)) + " |"
                    lines.append(row)
                    print(row, flush=True)
                    del x, r
                    torch.cuda.empty_cache()
    report(lines, args.out)


if __name__ == "__main__":
    main()
