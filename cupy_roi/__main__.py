"""``python -m cupy_roi``: the library's self-check and tour.

Prints the versions it runs on, compiles (or loads from CuPy's cache) every
kernel family with the time it took, runs every operator forward and backward
on a small random case against the float64 reference path (on the CPU: the
float32 result against float64, and the backward by finite differences), and,
with a GPU and torchvision, times each operator beside torchvision's. Exits
non-zero when any operator disagrees.

``--precompile`` compiles every family and dtype for every visible GPU into
CuPy's on-disk cache (for container images) and says where that cache is.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

import cupy_roi
from cupy_roi import _gpu, _kernels, _reference

#: name -> (public call, reference family, position-sensitive)
OPERATORS = {
    "roi_align": (lambda x, r: cupy_roi.roi_align(x, r, (3, 2), 0.5, 2, True), "roi_align", False),
    "ps_roi_align": (lambda x, r: cupy_roi.ps_roi_align(x, r, (3, 2), 0.5, 2), "roi_align", True),
    "roi_pool": (lambda x, r: cupy_roi.roi_pool(x, r, (3, 2), 0.5), "roi_pool", False),
    "ps_roi_pool": (lambda x, r: cupy_roi.ps_roi_pool(x, r, (3, 2), 0.5), "roi_pool", True),
    "prroi_pool2d": (lambda x, r: cupy_roi.prroi_pool2d(x, r, 3, 2, 0.5), "prroi_pool", False),
    "ps_prroi_pool": (lambda x, r: cupy_roi.ps_prroi_pool(x, r, (3, 2), 0.5), "prroi_pool", True),
}
_REFERENCE_ARGS = {"roi_align": (0.5, 2, True), "roi_pool": (0.5,), "prroi_pool": (0.5,)}


def versions():
    lines = [f"cupy_roi {cupy_roi.__version__}", f"torch {torch.__version__} (CUDA build {torch.version.cuda})"]
    try:
        cupy = _gpu.import_cupy()
        lines.append(f"CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
                     f"NVRTC {'.'.join(map(str, cupy.cuda.nvrtc.getVersion()))}")
    except Exception as e:  # reported, not fatal: the CPU path needs no CuPy
        lines.append(f"CuPy: not usable ({e})")
    if torch.cuda.is_available():
        lines += [f"GPU {d}: {torch.cuda.get_device_name(d)}" for d in range(torch.cuda.device_count())]
    else:
        lines.append("GPU: none (CPU only)")
    return lines


def cache_dir():
    return os.environ.get("CUPY_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache"))


def compile_all(devices, scalar_types):
    """Compile every family for each device and scalar type; (family, seconds) rows."""
    rows = []
    for device in devices:
        for family in sorted(_kernels.FAMILIES):
            start = time.perf_counter()
            for scalar in scalar_types:
                _kernels.compile_family(family, scalar, device)
            rows.append((f"{family} on GPU {device}", time.perf_counter() - start))
    return rows


def _case(rng, ps, device):
    c = 2 * 3 * 2 if ps else 4
    x = rng.standard_normal((2, c, 9, 11))
    k = 7
    x1 = rng.uniform(-4, 16, k)
    y1 = rng.uniform(-4, 14, k)
    r = np.stack([rng.integers(0, 2, k), x1, y1, x1 + rng.uniform(1, 14, k), y1 + rng.uniform(1, 12, k)], 1)
    if not ps:  # distinct values keep RoIPool's max unique
        x = rng.permutation(x.size).reshape(x.shape) / x.size
    return x, r


def check_operator(name, device, rng):
    """Largest relative error of the forward and the feature gradient against
    the float64 reference (or the finite-difference check on the CPU)."""
    call, family, ps = OPERATORS[name]
    x, r = _case(rng, ps, device)
    ref_args = _REFERENCE_ARGS[family] + (ps,)
    size = (3, 2)
    xr = torch.tensor(x, requires_grad=True)
    want = getattr(_reference, family)(xr, torch.tensor(r), size, *ref_args)
    go = torch.tensor(rng.standard_normal(tuple(want.shape)))
    want.backward(go)
    xt = torch.tensor(x, dtype=torch.float32, device=device, requires_grad=True)
    got = call(xt, torch.tensor(r, dtype=torch.float32, device=device))
    got.backward(go.to(device, torch.float32))

    def rel(a, b):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        return float("inf") if not torch.isfinite(a).all() else float((a - b).norm() / b.norm().clamp(min=1e-30))

    errors = [rel(got, want), rel(xt.grad, xr.grad)]
    if device == "cpu":  # the op is the reference there: check its backward by finite differences
        small = torch.tensor(x[:1, :, :5, :6], requires_grad=True)
        rows = torch.tensor([[0, 1.3, 0.7, 9.1, 8.2]])
        ok = torch.autograd.gradcheck(lambda t: call(t, rows), (small,), raise_exception=False)
        errors.append(0.0 if ok else float("inf"))
    return max(errors)


def time_against_torchvision(device):
    import torchvision.ops as tv

    x = torch.randn(2, 10 * 49, 38, 50, device=device, requires_grad=True)
    k = 256
    xy = torch.rand(k, 2, device=device) * 500
    r = torch.cat([torch.randint(0, 2, (k, 1), device=device).float(), xy, xy + 60 + torch.rand(k, 2, device=device) * 200], 1)
    pairs = {
        "roi_align": (lambda: cupy_roi.roi_align(x, r, 7, 1 / 16, 2, True), lambda: tv.roi_align(x, r, 7, 1 / 16, 2, True)),
        "ps_roi_align": (lambda: cupy_roi.ps_roi_align(x, r, 7, 1 / 16, 2), lambda: tv.ps_roi_align(x, r, 7, 1 / 16, 2)),
        "roi_pool": (lambda: cupy_roi.roi_pool(x, r, 7, 1 / 16), lambda: tv.roi_pool(x, r, 7, 1 / 16)),
        "ps_roi_pool": (lambda: cupy_roi.ps_roi_pool(x, r, 7, 1 / 16), lambda: tv.ps_roi_pool(x, r, 7, 1 / 16)),
        "prroi_pool2d (vs roi_align)": (lambda: cupy_roi.prroi_pool2d(x, r, 7, 7, 1 / 16),
                                        lambda: tv.roi_align(x, r, 7, 1 / 16, 2, True)),
    }

    def median_ms(fn):
        for _ in range(3):
            fn().sum().backward()
        times = []
        for _ in range(15):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn().sum().backward()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    lines = ["| operator, forward+backward (2x490x38x50, 256 RoIs, 7x7) | torchvision ms | cupy_roi ms |",
             "|---|---:|---:|"]
    for name, (ours, theirs) in pairs.items():
        lines.append(f"| {name} | {median_ms(theirs):.3f} | {median_ms(ours):.3f} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cupy_roi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--precompile", action="store_true",
                        help="compile every kernel family and dtype for every visible GPU into CuPy's cache")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    args = parser.parse_args(argv)
    for line in versions():
        print(line)
    gpu = torch.cuda.is_available()
    devices = list(range(torch.cuda.device_count())) if gpu else []
    if args.precompile:
        if not gpu:
            print("--precompile: no GPU visible, nothing to compile")
            return 1
        for what, seconds in compile_all(devices, sorted(_kernels.CUDA_TYPES)):
            print(f"compiled {what}, every dtype: {seconds:.2f} s")
        print(f"CuPy's kernel cache: {cache_dir()} (set CUPY_CACHE_DIR to move it)")
        return 0
    if gpu:
        for what, seconds in compile_all(devices[:1], ("float32",)):
            print(f"kernels {what} (float32, compiled or loaded from {cache_dir()}): {seconds:.2f} s")
    device = "cuda" if gpu else "cpu"
    rng = np.random.default_rng()
    failed = []
    for name in OPERATORS:
        try:
            err = check_operator(name, device, rng)
            verdict = "ok" if err < 1e-5 else "MISMATCH"
            detail = f"relative error {err:.1e}"
        except Exception as e:  # a verdict per operator, whatever broke
            verdict, detail = "ERROR", f"{type(e).__name__}: {e}"
        if verdict != "ok":
            failed.append(name)
        print(f"{name:>14} on {device}, forward and backward: {verdict} ({detail})")
    if gpu and not args.no_timing and not failed:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            print("(torchvision not installed: no timing table)")
        else:
            print()
            print("\n".join(time_against_torchvision(device)))
    print("all operators agree with the reference" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
