"""Host time per call on tiny inputs (the GPU work is negligible there), so the
numbers are the Python and launch overhead of each path, next to torchvision's.
``--profile`` prints where cupy_roi's time goes (cProfile, cumulative)."""
import argparse
import cProfile
import pstats
import time

import torch
import torchvision.ops as tv

import cupy_roi


def per_call_us(fn, reps):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def breakdown(x, r, reps):
    """Per-call host time of each layer under prroi_pool2d (checks off unless named)."""
    from cupy_roi import _rois, _torch_ops, array_api

    rows = r.float().contiguous()
    xc, rc = _torch_ops.as_cupy(x), _torch_ops.as_cupy(rows)
    layers = {
        "public prroi_pool2d": lambda: cupy_roi.prroi_pool2d(x, r, 7, 7, 0.5),
        "custom op (torch.ops.cupy_roi)": lambda: _torch_ops.prroi_fwd(x, rows, 7, 7, 0.5, False),
        "implementation (_prroi_fwd)": lambda: _torch_ops._prroi_fwd(x, rows, 7, 7, 0.5, False),
        "array API (CuPy arrays)": lambda: array_api.prroi_pool_forward(xc, rc, 7, 0.5),
        "as_cupy x3": lambda: (_torch_ops.as_cupy(x), _torch_ops.as_cupy(rows), _torch_ops.as_cupy(x)),
        "torch.empty + torch.cuda.device": lambda: (torch.empty(2, 4, 7, 7, device="cuda"),
                                                    torch.cuda.device(x.device).__enter__()),
        "RoI check alone (CuPy)": lambda: _rois.check_roi_values(rc, 2),
        "torch.cuda.synchronize": torch.cuda.synchronize,
    }
    print("| layer | us/call |")
    print("|---|---:|")
    with cupy_roi.roi_checks(False):
        for name, fn in layers.items():
            if "check" in name:
                with cupy_roi.roi_checks(True):
                    t = per_call_us(fn, reps)
            else:
                t = per_call_us(fn, reps)
            print(f"| {name} | {t:.1f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=500)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--breakdown", action="store_true", help="time each layer of a prroi_pool2d call")
    args = parser.parse_args()
    x = torch.randn(2, 49 * 4, 16, 16, device="cuda")
    r = torch.tensor([[0, 1, 1, 20, 20.], [1, 3, 2, 30, 25]], device="cuda")
    cases = {
        "roi_align": (lambda: cupy_roi.roi_align(x, r, 7, 0.5, 2, True), lambda: tv.roi_align(x, r, 7, 0.5, 2, True)),
        "ps_roi_align": (lambda: cupy_roi.ps_roi_align(x, r, 7, 0.5, 2), lambda: tv.ps_roi_align(x, r, 7, 0.5, 2)),
        "roi_pool": (lambda: cupy_roi.roi_pool(x, r, 7, 0.5), lambda: tv.roi_pool(x, r, 7, 0.5)),
        "prroi_pool2d": (lambda: cupy_roi.prroi_pool2d(x, r, 7, 7, 0.5), None),
    }
    print("| op | torchvision us/call | cupy_roi us/call | cupy_roi, checks off |")
    print("|---|---:|---:|---:|")
    with torch.no_grad():
        for name, (ours, theirs) in cases.items():
            t_tv = per_call_us(theirs, args.reps) if theirs else float("nan")
            t_ours = per_call_us(ours, args.reps)
            with cupy_roi.roi_checks(False):
                t_fast = per_call_us(ours, args.reps)
            print(f"| {name} | {t_tv:.1f} | {t_ours:.1f} | {t_fast:.1f} |")
        if args.breakdown:
            breakdown(x, r, args.reps)
        if args.profile:
            for checks in (True, False):
                with cupy_roi.roi_checks(checks):
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(args.reps):
                        cases["prroi_pool2d"][0]()
                    prof.disable()
                print(f"--- prroi_pool2d forward, checks {'on' if checks else 'off'}")
                pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
