"""Where an FPN forward+backward's time goes, ours beside torchvision's
MultiScaleRoIAlign (the multi_scale.py cases): host time of the forward call
and of the backward call (perf_counter around each, no synchronization: what
the Python side costs before it returns), wall clock (CUDA events, as
multi_scale.py), and the GPU time of each kernel (PyTorch profiler, per run).
Wall clock minus the summed kernel times is the time the GPU sat idle.

    python benchmarks/profile_fpn.py --runs 10
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_scale import CASES, IMAGE, NAMES, boxes_for, pyramid  # noqa: E402

import cupy_roi  # noqa: E402


def host_times(module, x, boxes, shapes, go, runs):
    fwd, bwd, wall = [], [], []
    for _ in range(runs):
        for t in x.values():
            t.grad = None
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        out = module(x, boxes, shapes)
        t1 = time.perf_counter()
        out.backward(go)
        t2 = time.perf_counter()
        end.record()
        end.synchronize()
        fwd.append((t1 - t0) * 1e3)
        bwd.append((t2 - t1) * 1e3)
        wall.append(start.elapsed_time(end))
    return statistics.median(fwd), statistics.median(bwd), statistics.median(wall)


def kernels(module, x, boxes, shapes, go, runs):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            for t in x.values():
                t.grad = None
            module(x, boxes, shapes).backward(go)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / runs / 1e3, e.count / runs) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def host_breakdown(batch, dtype, runs):
    """Host time of the pieces of our call (median, ms), then cProfile of the
    forward and of the backward's implementation (both in this thread)."""
    import cProfile
    import pstats
    from cupy_roi import _torch_ops as ops
    gen = torch.Generator().manual_seed(0)
    x = pyramid(batch, 256, dtype, gen)
    boxes = boxes_for(batch, 512, dtype, gen)
    shapes = [IMAGE] * batch
    go = torch.randn(batch * 512, 256, 7, 7, generator=gen).to("cuda", dtype)
    module = cupy_roi.MultiScaleRoIAlign(NAMES, 7, 2)
    feats = list(x.values())
    out = module(x, boxes, shapes)
    rows, _ = ops.prepare_levels(feats, boxes, 7)
    ctx_args = ([v for f in feats for v in f.shape], [0.25, 0.125, 0.0625, 0.03125], 2, False, 1, 224.0, 4, 2, 5,
                False, False)

    def median_host(fn):
        times = []
        for _ in range(runs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        return statistics.median(times)

    def fwd_bwd():
        for t in feats:
            t.grad = None
        module(x, boxes, shapes).backward(go)

    pieces = [
        ("rows from the list of boxes (prepare_levels)", lambda: ops.prepare_levels(feats, boxes, 7)),
        ("forward, no grad", lambda: _no_grad(module, x, boxes, shapes)),
        ("forward, autograd", lambda: module(x, boxes, shapes)),
        ("forward+backward", fwd_bwd),
        ("backward implementation (multi_scale_backward_cuda)",
         lambda: ops.multi_scale_backward_cuda(go, rows, *ctx_args)),
        ("4 zero-filled buffers", lambda: [torch.zeros(f.shape, dtype=torch.float32, device="cuda") for f in feats]),
        ("empty tensor x4", lambda: [torch.empty(f.shape, dtype=torch.float32, device="cuda") for f in feats]),
    ]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fwd_bwd()
        torch.cuda.synchronize()
    print(f"## CPU profile of forward+backward, box head batch {batch} {str(dtype)[6:]}, {runs} runs")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70))
    class Dummy(torch.autograd.Function):
        """Engine cost alone: a backward that returns ready gradients."""
        @staticmethod
        def forward(ctx, *levels):
            return torch.empty(1, device="cuda")

        @staticmethod
        def backward(ctx, grad):
            return tuple(ready)

    class DummyZeros(Dummy):
        @staticmethod
        def backward(ctx, grad):
            return tuple(torch.zeros(f.shape, dtype=f.dtype, device=f.device) for f in feats)

    ready = [torch.zeros_like(f) for f in feats]
    one = torch.ones(1, device="cuda")

    def dummy_bwd(fn):
        def run():
            for t in feats:
                t.grad = None
            fn.apply(*feats).backward(one)
        return run

    pieces_engine = [("dummy Function, ready gradients: forward+backward", dummy_bwd(Dummy)),
                     ("dummy Function, zero-filled gradients: forward+backward", dummy_bwd(DummyZeros))]
    def backward_only(busy, fn=None):
        times = []
        for _ in range(runs):
            for t in feats:
                t.grad = None
            out = module(x, boxes, shapes) if fn is None else fn.apply(*feats)
            torch.cuda.synchronize()
            if busy:
                torch.cuda._sleep(5_000_000)
            t0 = time.perf_counter()
            out.backward(go if fn is None else one)
            times.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
        return statistics.median(times)

    print(f"## backward call alone (ms): GPU idle {backward_only(False):.3f}, GPU busy {backward_only(True):.3f}; "
          f"dummy: idle {backward_only(False, DummyZeros):.3f}, busy {backward_only(True, DummyZeros):.3f}")
    print(f"## host time per piece, box head batch {batch} {str(dtype)[6:]} (median of {runs}, ms)")
    for name, fn in pieces + pieces_engine:
        fn()
        print(f"   {median_host(fn):8.3f}  {name}")
    for name, fn in (("forward, autograd", lambda: module(x, boxes, shapes)),
                     ("backward implementation", lambda: ops.multi_scale_backward_cuda(go, rows, *ctx_args))):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(runs):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        print(f"## cProfile: {name}, {runs} calls")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def _no_grad(module, x, boxes, shapes):
    with torch.no_grad():
        return module(x, boxes, shapes)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--only", default="box head")
    parser.add_argument("--host", action="store_true", help="host-time breakdown of our call only")
    args = parser.parse_args()
    if args.host:
        for batch, dtype in ((2, torch.float32), (8, torch.float16)):
            host_breakdown(batch, dtype, args.runs)
        return
    import torchvision
    gen = torch.Generator().manual_seed(0)
    for title, batch, per_image, size in CASES:
        if args.only not in title:
            continue
        for dtype in (torch.float32, torch.float16):
            x = pyramid(batch, 256, dtype, gen)
            boxes = boxes_for(batch, per_image, dtype, gen)
            shapes = [IMAGE] * batch
            go = torch.randn(batch * per_image, 256, size, size, generator=gen).to("cuda", dtype)
            for name, module in (("torchvision", torchvision.ops.MultiScaleRoIAlign(NAMES, size, 2)),
                                 ("cupy_roi", cupy_roi.MultiScaleRoIAlign(NAMES, size, 2))):
                for _ in range(5):
                    module(x, boxes, shapes).backward(go)
                f, b, w = host_times(module, x, boxes, shapes, go, args.runs)
                ks = kernels(module, x, boxes, shapes, go, args.runs)
                gpu = sum(k[1] for k in ks)
                print(f"## {title} batch {batch} {str(dtype)[6:]} {name}: host fwd {f:.3f} ms, host bwd {b:.3f} ms, "
                      f"wall {w:.3f} ms, kernels {gpu:.3f} ms, GPU idle {w - gpu:.3f} ms")
                for key, ms, count in ks[:12]:
                    print(f"   {ms:8.3f} ms  x{count:4.1f}  {key[:100]}")
            del x, go
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
