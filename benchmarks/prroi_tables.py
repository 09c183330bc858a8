"""PrRoIPool through summed-area tables (issue 14, part 2): the candidate
kernels of ``candidates/prroi_pool_tables.cu`` against the package's, float32,
7x7, the issue's three cases, boxes as in bench.py. Forward (table build
included) and feature backward (corner buffer, then its suffix sums), CUDA
events around the launches, median (ms); the candidate's outputs (poisoned with
NaN first) against the package's.

    python3 benchmarks/prroi_tables.py [--reps 10] [--out FILE]
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import report, timed  # noqa: E402
from boxes import rois_for  # noqa: E402

import cupy_roi  # noqa: E402
from cupy_roi import _kernels, _rules  # noqa: E402

HERE = Path(__file__).resolve().parent
CASES = [("8x256x64x64, K=4096, stride 8", 8, 256, 64, 64, 8, 512),
         ("16x256x200x272, K=8192, stride 4", 16, 256, 200, 272, 4, 512),
         ("2x256x50x68, K=1024, stride 16", 2, 256, 50, 68, 16, 512)]
SIGNATURES = {
    "prroi_tables_rows<float>": "piiiiqqqqp",
    "prroi_tables_columns": "pqii",
    "prroi_table_geometry<float>": "pqiiiiiap",
    "prroi_forward_tables<float>": "ppiiiiqqqqpqiiaippqqqq",
    "prroi_backward_tables<float>": "pqqqqpqiiiiiiaipp",
    "prroi_corner_rows": "pqii",
    "prroi_corner_columns<float>": "pqiiipqqqq",
}


class Compiled:
    """What _kernels.launch needs of a kernel, for the candidate's own signatures."""

    def __init__(self, function, signature):
        self._function = function
        self.handle = int(function.ptr)
        self.packer = _kernels.ArgumentPacker(signature, "float32")
        self.device = 0


def compile_candidate():
    import cupy

    code = _kernels.source("prroi_pool") + "\n" + (HERE / "candidates" / "prroi_pool_tables.cu").read_text()
    module = cupy.RawModule(code=code, options=("--std=c++14",), name_expressions=list(SIGNATURES))
    return {name: Compiled(module.get_function(name).kernel, sig) for name, sig in SIGNATURES.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    fn = compile_candidate()
    launch = _kernels.launch
    gen = torch.Generator().manual_seed(0)
    size = 7
    lines = [f"GPU: {torch.cuda.get_device_name()}; float32, {size}x{size}; median of {args.reps} (ms); "
             "candidate: summed-area tables, one warp per (RoI, channel)", "",
             "| case | package forward | tables forward (build + pool) | package fwd+bwd (features) | "
             "tables fwd+bwd | tables backward alone | forward diff | gradient diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    stage_lines = ["", "Candidate stages alone (ms):", "",
                   "| case | table build | geometry | pool | corner zero-fill | scatter | suffix sums |",
                   "|---|---:|---:|---:|---:|---:|---:|"]
    for title, n, c, h, w, stride, per_image in CASES:
        x = torch.randn(n, c, h, w, generator=gen).to("cuda")
        r = rois_for(n, per_image, h, w, stride, gen).to("cuda")
        rows = r.float().contiguous()
        k = rows.shape[0]
        scale = 1.0 / stride
        go = torch.randn(k, c, size, size, generator=gen).to("cuda")
        stream = torch.cuda.current_stream().cuda_stream
        planes = n * c
        tables = torch.empty(planes * (h + 1) * (w + 1), dtype=torch.float64, device="cuda")
        corners = torch.empty_like(tables)
        out = torch.empty(k, c, size, size, device="cuda")
        grad = torch.empty_like(x)
        # AxisRuns<float> per RoI and axis (1136 bytes; rounded up)
        geo = torch.empty(k * 2 * 2048, dtype=torch.uint8, device="cuda")
        block = _rules.channel_block(0, x.stride(), x.shape, (size, size), c, 8)
        warp_blocks = min(-(-k * c // 8), 1 << 22)

        def geometry():
            launch(fn["prroi_table_geometry<float>"], _kernels.blocks_for(2 * k), stream,
                   (rows.data_ptr(), k, n, h, w, size, size, scale, geo.data_ptr()))

        def build():
            launch(fn["prroi_tables_rows<float>"], min(-(-planes * (h + 1) // 8), 1 << 22), stream,
                   (x.data_ptr(), n, c, h, w, *x.stride(), tables.data_ptr()))
            launch(fn["prroi_tables_columns"], _kernels.blocks_for(planes * (w + 1)), stream,
                   (tables.data_ptr(), planes, h, w))

        def pool():
            launch(fn["prroi_forward_tables<float>"], warp_blocks, stream,
                   (tables.data_ptr(), x.data_ptr(), n, c, h, w, *x.stride(), rows.data_ptr(), k, size, size, scale,
                    block, geo.data_ptr(), out.data_ptr(), *out.stride()))

        def scatter():
            launch(fn["prroi_backward_tables<float>"], warp_blocks, stream,
                   (go.data_ptr(), *go.stride(), rows.data_ptr(), k, n, c, h, w, size, size, scale, block,
                    geo.data_ptr(), corners.data_ptr()))

        def suffix_sums():
            launch(fn["prroi_corner_rows"], _kernels.blocks_for(planes * (h + 1)), stream,
                   (corners.data_ptr(), planes, h, w))
            launch(fn["prroi_corner_columns<float>"], _kernels.blocks_for(planes * w), stream,
                   (corners.data_ptr(), planes, c, h, w, grad.data_ptr(), *grad.stride()))

        def forward():
            build()
            geometry()
            pool()

        def backward():
            corners.zero_()
            geometry()
            scatter()
            suffix_sums()

        def both():
            forward()
            backward()

        xg = x.clone().requires_grad_(True)

        def package_forward():
            with torch.no_grad():
                return cupy_roi.prroi_pool2d(x, r, size, size, scale)

        def package_both():
            xg.grad = None
            cupy_roi.prroi_pool2d(xg, r, size, size, scale).backward(go)

        ref_out = package_forward().double()
        package_both()
        ref_grad = xg.grad.double()
        out.fill_(float("nan"))
        grad.fill_(float("nan"))
        both()
        torch.cuda.synchronize()
        d_out = float((out.double() - ref_out).norm() / ref_out.norm())
        d_grad = float((grad.double() - ref_grad).norm() / ref_grad.norm())
        t = [timed(package_forward, reps=args.reps), timed(forward, reps=args.reps),
             timed(package_both, reps=args.reps), timed(both, reps=args.reps), timed(backward, reps=args.reps)]
        lines.append(f"| {title} | " + " | ".join(f"{v:.3f}" for v in t) + f" | {d_out:.1e} | {d_grad:.1e} |")
        print(lines[-1], flush=True)
        stages = {"table build": build, "geometry": geometry, "pool": pool, "corner zero-fill": corners.zero_,
                  "scatter": scatter, "suffix sums": suffix_sums}
        stage_lines.append(f"| {title} | " + " | ".join(f"{timed(f, reps=args.reps):.3f}" for f in stages.values())
                           + " |")
        print(stage_lines[-1], flush=True)
        del x, tables, corners, out, grad, xg, geo
        torch.cuda.empty_cache()
    report(lines + stage_lines, args.out)


if __name__ == "__main__":
    main()
