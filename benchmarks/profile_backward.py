"""Where a backward's GPU time goes: the kernels of one forward+backward of a
bench.py case, float atomics against deterministic=True (and, with
--anchor, torchvision's), from the PyTorch profiler (CUDA time per kernel,
averaged over the runs).

    python benchmarks/profile_backward.py --case "roi_pool small" --dtype float32 [--anchor] [--channels-last]

``--channels-last``: the input channels-last; the output's gradient stays
contiguous, as a box head's flatten hands it back.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench import CASES, call_anchor, call_ours, rois_for


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="roi_pool small")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--anchor", action="store_true", help="also torchvision's forward+backward")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    title, ours, anchor, n, c, h, w, stride, per_image, size, sr = next(cs for cs in CASES if args.case in cs[0])
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(n, c, h, w, generator=gen).to("cuda", dtype)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    r = rois_for(n, per_image, h, w, stride, gen).to("cuda")
    go = torch.randn(call_ours(ours, x, r, size, 1.0 / stride, sr).shape, generator=gen).to("cuda", dtype)
    runs = {f"deterministic={det}": (lambda det=det: call_ours(ours, x, r, size, 1.0 / stride, sr, det))
            for det in (False, True)}
    if args.anchor:  # torchvision takes boxes in the input's dtype
        runs["torchvision"] = lambda: call_anchor(anchor, x, r.to(dtype), size, 1.0 / stride, sr)
    for label, call in runs.items():
        for _ in range(3):
            call().backward(go)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.runs):
                x.grad = None
                call().backward(go)
            torch.cuda.synchronize()
        layout = "channels-last" if args.channels_last else "NCHW"
        print(f"## {title}, {args.dtype}, {layout}, {label}: CUDA time per run")
        rows = [(e.key, e.device_time_total / args.runs) for e in prof.key_averages() if e.device_time_total > 0]
        for key, us in sorted(rows, key=lambda kv: -kv[1]):
            print(f"{us:10.1f} us  {key[:110]}")
        print(f"{sum(us for _, us in rows):10.1f} us  total")


if __name__ == "__main__":
    main()
