"""Host time per call on tiny inputs (the GPU work is negligible there), so the
numbers are the Python and launch overhead of each path, next to torchvision's.

Forward (no grad) and forward+backward of every operator; torchvision has no
PrRoIPool, so its roi_align stands beside ours. ``--breakdown`` times the
layers under one prroi_pool2d forward; ``--compiled`` adds calls compiled with
``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs);
``--profile`` prints where a roi_align forward+backward's Python time goes (cProfile)."""
import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time

import torch
import torchvision.ops as tv

import cupy_roi


def per_call_us(fn, reps, rounds=5):
    """Median over ``rounds`` of the mean host time per call over ``reps``
    calls (the host is shared: single rounds vary by tens of percent)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    means = []
    for _ in range(rounds):
        means.append(_round_us(fn, reps // rounds))
    return statistics.median(means)


def _round_us(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def fwd_bwd(leaf, op):
    """One forward+backward call: ``op().sum().backward()``, ``leaf``'s gradient cleared first."""
    def run():
        leaf.grad = None
        op().sum().backward()
    return run


def paired_us(theirs, ours, reps, rounds=9):
    """Host time per call of two callables measured in alternating rounds
    (order swapped every round), so that drift of the shared host (clocks,
    neighbours) hits both alike. Returns (median theirs, median ours, median
    of the per-round ratios ours / theirs)."""
    for _ in range(50):
        theirs()
        ours()
    torch.cuda.synchronize()
    t_theirs, t_ours = [], []
    for i in range(rounds):
        pair = ((theirs, t_theirs), (ours, t_ours))
        for fn, times in (pair if i % 2 == 0 else pair[::-1]):
            times.append(_round_us(fn, max(reps // rounds, 1)))
    ratios = [b / a for a, b in zip(t_theirs, t_ours)]
    return statistics.median(t_theirs), statistics.median(t_ours), statistics.median(ratios)


def breakdown(x, r, reps):
    """Per-call host time of each layer under a prroi_pool2d forward."""
    from cupy_roi import _kernels, _rules, _torch_ops

    rows = r.float().contiguous()
    out = torch.empty(2, 4, 7, 7, device="cuda")
    fn = _kernels.get_function("prroi_pool", "prroi_pool_forward", "float32", True, 0)
    stream = torch.cuda.current_stream().cuda_stream
    # channel_block 4 = C_out: the RoI-major order the rule picks for this small map
    args = (x.data_ptr(), 2, 16, 16, *x.stride(), rows.data_ptr(), 2, 4, 7, 7, 0.5, 4, out.data_ptr(), *out.stride())
    layers = {
        "public ps_prroi_pool": lambda: cupy_roi.ps_prroi_pool(x, r, 7, 0.5),
        "prepare (argument checks)": lambda: _torch_ops.prepare(x, r, 7, True),
        "implementation (prroi_forward_cuda)": lambda: _torch_ops.prroi_forward_cuda(x, rows, 7, 7, 0.5, True),
        "custom op (torch.compile's path)": lambda: _torch_ops._prroi_op(x, rows, 7, 7, 0.5, True, False),
        "torch.empty": lambda: torch.empty(2, 4, 7, 7, device="cuda"),
        "rule + launch (_rules.prroi_pool_forward)": lambda: _rules.prroi_pool_forward(
            0, stream, "float32", True, (x.data_ptr(), x.stride()), (2, 196, 16, 16), rows.data_ptr(), 2, (7, 7),
            0.5, (out.data_ptr(), out.stride())),
        "launch alone (_kernels.launch)": lambda: _kernels.launch(fn, 2, stream, args),
        "argument packing alone": lambda: fn.packer.pack(args),
    }
    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            return g

    xg = x.detach().requires_grad_(True)
    go = torch.ones(2, 196, 7, 7, device="cuda")
    backward_body = per_call_us(lambda: _torch_ops.roi_align_backward_cuda(go, rows, 2, 196, 16, 16, 0.5, 2, True,
                                                                          False, False, False), reps)
    print("| baseline | us/call |")
    print("|---|---:|")
    print(f"| (x * 1).sum().backward(), no custom code | {per_call_us(fwd_bwd(xg, lambda: xg * 1), reps):.1f} |")
    print(f"| Python autograd.Function identity, .sum().backward() | "
          f"{per_call_us(fwd_bwd(xg, lambda: Identity.apply(xg)), reps):.1f} |")
    print(f"| roi_align_backward_cuda called directly (our backward's body) | {backward_body:.1f} |")

    class TorchvisionInPython(torch.autograd.Function):
        """torchvision's own roi_align kernels (its C++ ops) behind a Python
        autograd node: the least any Python-level operator can cost."""

        @staticmethod
        def forward(ctx, t, rois):
            ctx.save_for_backward(rois)
            ctx.shape = t.shape
            return torch.ops.torchvision.roi_align(t, rois, 0.5, 7, 7, 2, True)

        @staticmethod
        def backward(ctx, g):
            (rois,) = ctx.saved_tensors
            n, c, h, w = ctx.shape
            return torch.ops.torchvision._roi_align_backward(g, rois, 0.5, 7, 7, n, c, h, w, 2, True), None

    # timed as main's roi_align forward+backward row, so that the two compare: what a
    # Python autograd node costs beside torchvision's C++ one, before any work of ours
    t_tv, t_this, ratio = paired_us(fwd_bwd(xg, lambda: tv.roi_align(xg, r, 7, 0.5, 2, True)),
                                    fwd_bwd(xg, lambda: TorchvisionInPython.apply(xg, r)), reps)
    print()
    print("| forward+backward, .sum().backward() (alternating rounds) | torchvision us | this us | this / tv |")
    print("|---|---:|---:|---:|")
    print(f"| torchvision's roi_align kernels in a Python autograd.Function | {t_tv:.1f} | {t_this:.1f} | "
          f"{ratio:.2f} |")
    print()
    print("| layer of one ps_prroi_pool forward | us/call |")
    print("|---|---:|")
    with torch.no_grad():
        for name, f in layers.items():
            print(f"| {name} | {per_call_us(f, reps):.1f} |")


COMPILED = {
    "ps_roi_align": (lambda a, b: cupy_roi.ps_roi_align(a, b, 7, 0.5, 2), lambda a, b: tv.ps_roi_align(a, b, 7, 0.5, 2)),
    "roi_align": (lambda a, b: cupy_roi.roi_align(a, b, 7, 0.5, 2, True),
                  lambda a, b: tv.roi_align(a, b, 7, 0.5, 2, True)),
    "prroi_pool2d": (lambda a, b: cupy_roi.prroi_pool2d(a, b, 7, 7, 0.5), None),
    # no RoI op at all: what torch's CUDA-graph call path costs by itself
    "baseline a * 2 + b.sum() (no RoI op)": (None, lambda a, b: a * 2 + b.sum()),
}


def compiled_case(spec, reps, explain):
    """One compiled call in this (fresh) process: a failed CUDA-graph capture
    poisons the process's later captures, so each case runs in its own."""
    library, name = spec.split(":")
    fn = COMPILED[name][0 if library == "cupy_roi" else 1]
    x = torch.randn(2, 49 * 4, 16, 16, device="cuda")
    r = torch.tensor([[0, 1, 1, 20, 20.], [1, 3, 2, 30, 25]], device="cuda")
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    result = {}
    try:
        with torch.no_grad():
            result["us"] = per_call_us(lambda: compiled(x, r), reps)
            result["max_abs_diff_vs_eager"] = float((compiled(x, r) - fn(x, r)).abs().max())
    except Exception as e:  # e.g. an op that cannot be captured in a CUDA graph
        result["error"] = f"{type(e).__name__}: {(str(e) or '').splitlines()[0] if str(e) else ''}"
    from torch._dynamo.utils import counters
    result["inductor_counters"] = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    if explain and "us" in result:
        prof = cProfile.Profile()
        with torch.no_grad():
            prof.enable()
            for _ in range(200):
                compiled(x, r)
            prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(15)
    print("RESULT " + json.dumps(result))


def compiled_rows(reps, explain):
    rows = []
    env = dict(os.environ)
    if explain:
        env["TORCH_LOGS"] = "perf_hints"
    for name, (_, theirs) in COMPILED.items():
        times = []
        for library in ("torchvision", "cupy_roi"):
            if COMPILED[name][0 if library == "cupy_roi" else 1] is None:
                times.append(float("nan"))
                continue
            proc = subprocess.run([sys.executable, __file__, "--compiled-case", f"{library}:{name}", "--reps",
                                   str(reps)] + (["--explain"] if explain else []),
                                  capture_output=True, text=True, env=env, timeout=600)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            result = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr.strip().splitlines()[-1:]}
            if explain or "error" in result:
                print(f"# {library} {name}: {json.dumps(result)}")
            if explain:
                hints = [ln for ln in proc.stderr.splitlines() if "cudagraph" in ln.lower() or "skipping" in ln]
                print("\n".join(f"#   {ln}" for ln in hints[:10]))
                print("\n".join(f"#   {ln}" for ln in proc.stderr.splitlines() if ln.strip()[:1].isdigit())[:3000])
            times.append(result.get("us", float("nan")))
        rows.append(f"| {name}, compiled reduce-overhead, forward | {times[0]:.1f} | {times[1]:.1f} | "
                    f"{times[1] / times[0]:.2f} |")
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=1000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--breakdown", action="store_true", help="time each layer of a ps_prroi_pool call")
    parser.add_argument("--compiled", action="store_true", help="add torch.compile reduce-overhead rows")
    parser.add_argument("--explain", action="store_true",
                        help="with --compiled: print CUDA-graph skip reasons and a profile of the compiled call")
    parser.add_argument("--trace", action="store_true",
                        help="torch.profiler tables (host ops and kernels) of forward+backward calls")
    parser.add_argument("--compiled-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compiled_case:
        return compiled_case(args.compiled_case, args.reps, args.explain)
    x = torch.randn(2, 49 * 4, 16, 16, device="cuda", requires_grad=True)
    r = torch.tensor([[0, 1, 1, 20, 20.], [1, 3, 2, 30, 25]], device="cuda")
    rc = r.clone().requires_grad_(True)
    ops = {
        "roi_align": (lambda b: cupy_roi.roi_align(x, b, 7, 0.5, 2, True), lambda: tv.roi_align(x, r, 7, 0.5, 2, True)),
        "ps_roi_align": (lambda b: cupy_roi.ps_roi_align(x, b, 7, 0.5, 2), lambda: tv.ps_roi_align(x, r, 7, 0.5, 2)),
        "roi_pool": (lambda b: cupy_roi.roi_pool(x, b, 7, 0.5), lambda: tv.roi_pool(x, r, 7, 0.5)),
        "ps_roi_pool": (lambda b: cupy_roi.ps_roi_pool(x, b, 7, 0.5), lambda: tv.ps_roi_pool(x, r, 7, 0.5)),
        "prroi_pool2d (tv: roi_align)": (lambda b: cupy_roi.prroi_pool2d(x, b, 7, 7, 0.5),
                                         lambda: tv.roi_align(x, r, 7, 0.5, 2, True)),
        "ps_prroi_pool (tv: ps_roi_align)": (lambda b: cupy_roi.ps_prroi_pool(x, b, 7, 0.5),
                                             lambda: tv.ps_roi_align(x, r, 7, 0.5, 2)),
    }

    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; x {tuple(x.shape)}, 2 RoIs, 7x7; "
          f"host microseconds per call: torchvision and cupy_roi timed in 9 alternating rounds of "
          f"{args.reps // 9} calls; medians, and the median of the per-round ratios")
    print()
    print("| call | torchvision us/call | cupy_roi us/call | cupy_roi / torchvision |")
    print("|---|---:|---:|---:|")
    for name, (ours, theirs) in ops.items():
        with torch.no_grad():
            t_tv, t_me, ratio = paired_us(theirs, lambda: ours(r), args.reps)
        print(f"| {name}, forward | {t_tv:.1f} | {t_me:.1f} | {ratio:.2f} |")
        t_tv, t_me, ratio = paired_us(fwd_bwd(x, theirs), fwd_bwd(x, lambda: ours(r)), args.reps)
        print(f"| {name}, forward+backward | {t_tv:.1f} | {t_me:.1f} | {ratio:.2f} |")
        if name.startswith("prroi"):
            t_tv, t_me, ratio = paired_us(fwd_bwd(x, theirs), fwd_bwd(x, lambda: ours(rc)), args.reps)
            print(f"| {name}, forward+backward with box gradients | {t_tv:.1f} | {t_me:.1f} | {ratio:.2f} |")
    if args.breakdown:
        print()
        breakdown(x.detach(), r, args.reps)
    if args.compiled:
        print()
        for row in compiled_rows(args.reps, args.explain):
            print(row)
    if args.trace:
        from torch.profiler import ProfilerActivity, profile
        for label, fn in (("torchvision roi_align", fwd_bwd(x, ops["roi_align"][1])),
                          ("cupy_roi roi_align", fwd_bwd(x, lambda: ops["roi_align"][0](r))),
                          ("cupy_roi prroi_pool2d, box gradients", fwd_bwd(x, lambda: ops["prroi_pool2d (tv: roi_align)"][0](rc)))):
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(50):
                    fn()
                torch.cuda.synchronize()
            print(f"\n## torch.profiler, 50 forward+backward calls: {label}\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.reps):
            fwd_bwd(x, lambda: ops["roi_align"][0](r))()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
