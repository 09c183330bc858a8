"""Cold start: where the first call's seconds go, each step in a fresh process.

Steps, timed in order inside one new interpreter: import torch; create the
CUDA context (the floor no GPU library avoids); import cupy_roi; import CuPy;
load (or compile) the kernel family; the first forward+backward of one
operator; then the first forward+backward of three more families' operators.
Run twice: with CuPy's kernel cache warm and with an empty cache
(``CUPY_CACHE_DIR`` pointed at a new folder). Prints a Markdown table."""
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, time
t = {}
s = time.perf_counter(); import torch; t["import torch"] = time.perf_counter() - s
s = time.perf_counter(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()
t["CUDA context"] = time.perf_counter() - s
s = time.perf_counter(); import cupy_roi; t["import cupy_roi"] = time.perf_counter() - s
x = torch.randn(2, 8 * 4, 20, 20, device="cuda", requires_grad=True)
r = torch.tensor([[0, 1, 1, 30, 30.], [1, 4, 2, 20, 35]], device="cuda", requires_grad=True)
torch.cuda.synchronize()
s = time.perf_counter(); import cupy; t["import cupy"] = time.perf_counter() - s
from cupy_roi import _kernels
s = time.perf_counter(); _kernels.compile_family("roi_align", "float32", 0)
t["load roi_align kernels (float32)"] = time.perf_counter() - s
s = time.perf_counter(); cupy_roi.roi_align(x, r, 2, 0.5, 2).sum().backward(); torch.cuda.synchronize()
t["first roi_align forward+backward"] = time.perf_counter() - s
s = time.perf_counter()
cupy_roi.ps_roi_align(x, r, 2, 0.5, 2).sum().backward()
cupy_roi.roi_pool(x, r, 2, 0.5).sum().backward()
cupy_roi.prroi_pool2d(x, r, 2, 2, 0.5).sum().backward()
torch.cuda.synchronize()
t["three more operators (2 more families), first forward+backward"] = time.perf_counter() - s
print("TIMES" + json.dumps(t))
"""


def run(env):
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    line = [l for l in res.stdout.splitlines() if l.startswith("TIMES")]
    if res.returncode or not line:
        raise RuntimeError(res.stdout + res.stderr)
    return json.loads(line[0][5:])


def main():
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as empty:
        cold = run(dict(env, CUPY_CACHE_DIR=empty))
        warm = run(dict(env, CUPY_CACHE_DIR=empty))  # the cache the cold run filled
    print("| step (fresh process) | warm CuPy cache, s | empty cache, s |")
    print("|---|---:|---:|")
    for step in warm:
        print(f"| {step} | {warm[step]:.3f} | {cold[step]:.3f} |")
    after_context = ["import cupy_roi", "import cupy", "load roi_align kernels (float32)",
                     "first roi_align forward+backward"]
    print(f"| **first forward+backward of one operator beyond the CUDA context** | "
          f"{sum(warm[s] for s in after_context):.3f} | {sum(cold[s] for s in after_context):.3f} |")


if __name__ == "__main__":
    main()
