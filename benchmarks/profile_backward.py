"""Where a backward's GPU time goes: the kernels of one forward+backward of a
bench.py case, float atomics against deterministic=True, from the PyTorch
profiler (CUDA time per kernel, summed over the runs).

    python benchmarks/profile_backward.py --case "roi_pool small" --dtype float32
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench import CASES, call_ours, rois_for


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="roi_pool small")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    title, ours, _, n, c, h, w, stride, per_image, size, sr = next(cs for cs in CASES if args.case in cs[0])
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(n, c, h, w, generator=gen).to("cuda", dtype).requires_grad_(True)
    r = rois_for(n, per_image, h, w, stride, gen).to("cuda")
    go = torch.randn(call_ours(ours, x, r, size, 1.0 / stride, sr).shape, generator=gen).to("cuda", dtype)
    for det in (False, True):
        for _ in range(3):
            call_ours(ours, x, r, size, 1.0 / stride, sr, det).backward(go)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.runs):
                x.grad = None
                call_ours(ours, x, r, size, 1.0 / stride, sr, det).backward(go)
            torch.cuda.synchronize()
        print(f"## {title}, {args.dtype}, deterministic={det}: CUDA time per run")
        rows = [(e.key, e.device_time_total / args.runs) for e in prof.key_averages() if e.device_time_total > 0]
        for key, us in sorted(rows, key=lambda kv: -kv[1]):
            print(f"{us:10.1f} us  {key[:110]}")
        print(f"{sum(us for _, us in rows):10.1f} us  total")


if __name__ == "__main__":
    main()
