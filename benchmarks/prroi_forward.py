"""PrRoIPool forward kernel alone at issue 3's detector scale (N=8, C=256,
64x64 map, stride 8, 512 RoIs per image, 7x7), next to torchvision's
roi_align forward, RoI checks off, median of CUDA-event timings (ms).

``--source LABEL=PATH`` adds a candidate ``prroi_pool.cu`` (its
``roi_common.cuh`` include is taken from the same folder when one is there,
else from the package) to compare kernel versions in one run; each must keep
the package's ``prroi_pool_forward`` signature. ``--profile`` runs each kernel
once (for ncu) instead of timing."""
import argparse
from pathlib import Path

import torch
import torchvision.ops as tv

import cupy_roi
from cupy_roi import _kernels, _rules

from bench import report, rois_for, timed


def compile_source(path):
    import cupy
    path = Path(path)
    header = path.with_name(_kernels.HEADER)
    header = header if header.is_file() else Path(_kernels.source_dir()) / _kernels.HEADER
    code = path.read_text().replace(f'#include "{_kernels.HEADER}"', header.read_text(), 1)
    names = [_kernels.kernel_expression("prroi_pool_forward", s, False) for s in ("float32", "float16")]
    module = cupy.RawModule(code=code, options=("--std=c++14",), name_expressions=names)
    return {s: _kernels.Kernel("prroi_pool_forward", 0, module.get_function(n).kernel, "float32")
            for s, n in zip(("float32", "float16"), names)}


def launcher(kernel, x, r, size, scale):
    """Launch ``kernel`` with the package's forward arguments."""
    rows = r.float().contiguous()
    out = torch.empty((rows.shape[0], x.shape[1]) + size, dtype=x.dtype, device=x.device)
    n, c, h, w = x.shape
    block = _rules.channel_block(x.device.index or 0, x.stride(), x.shape, size, c, x.element_size())
    args = (x.data_ptr(), n, h, w, *x.stride(), rows.data_ptr(), rows.shape[0], c, *size, scale, block,
            out.data_ptr(), *out.stride())
    blocks = _kernels.blocks_for(out.numel())
    return lambda: _kernels.launch(kernel, blocks, torch.cuda.current_stream().cuda_stream, args), out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--source", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    n, c, h, w, stride, per_image, size = 8, 256, 64, 64, 8, 512, 7
    scale = 1.0 / stride
    candidates = {"cupy_roi": None}
    candidates.update({lab: compile_source(p) for lab, p in (s.split("=", 1) for s in args.source)})
    lines = [f"GPU: {torch.cuda.get_device_name()}; N={n} C={c} {h}x{w} stride {stride}, {per_image} RoIs/image, "
             f"{size}x{size}; kernel only, median of {args.reps} runs (ms)", "",
             "| dtype | kernel | ms | / roi_align | rel. diff to cupy_roi |", "|---|---|---:|---:|---:|"]
    with torch.no_grad():
        for dtype in (torch.float32, torch.float16):
            scalar = str(dtype).replace("torch.", "")
            x = torch.randn(n, c, h, w, generator=gen).to("cuda", dtype)
            r = rois_for(n, per_image, h, w, stride, gen).to("cuda")
            rt = r.to(dtype)
            runs = {"torchvision roi_align": (lambda: tv.roi_align(x, rt, size, scale, 2, True), None)}
            for label, functions in candidates.items():
                if functions is None:
                    runs[label] = (lambda: cupy_roi.prroi_pool2d(x, r, size, size, scale), None)
                else:
                    runs[label] = launcher(functions[scalar], x, r, (size, size), scale)
            if args.profile:
                for fn, _ in runs.values():
                    fn()
                torch.cuda.synchronize()
                continue
            base = cupy_roi.prroi_pool2d(x, r, size, size, scale).double()
            t_anchor = None
            for label, (fn, out) in runs.items():
                t = timed(fn, reps=args.reps)
                t_anchor = t_anchor or t
                diff = "" if out is None else \
                    f"{float((torch.as_tensor(out, device='cuda').double() - base).norm() / base.norm()):.1e}"
                lines.append(f"| {scalar} | {label} | {t:.3f} | {t / t_anchor:.2f} | {diff} |")
    if not args.profile:
        report(lines, args.out)


if __name__ == "__main__":
    main()
