"""Small cases for compute-sanitizer: every operator, dtype and layout, forward
and backward (box gradients for PrRoIPool), through the torch ops and the CuPy
array API, with invalid RoIs left unchecked (they must read nothing).

    compute-sanitizer --tool memcheck  python tests/sanitize_cases.py
    compute-sanitizer --tool racecheck python tests/sanitize_cases.py

Not a pytest module: run it under the sanitizer, which reads its summary.
"""
import sys

import numpy as np
import torch

import cupy_roi
from cupy_roi import array_api

OPS = {
    "roi_align": lambda x, r: cupy_roi.roi_align(x, r, (2, 3), 0.5, 2, True),
    "roi_align adaptive": lambda x, r: cupy_roi.roi_align(x, r, (2, 3), 0.5, 0, False),
    "ps_roi_align": lambda x, r: cupy_roi.ps_roi_align(x, r, (2, 3), 0.5, 2),
    "roi_pool": lambda x, r: cupy_roi.roi_pool(x, r, (2, 3), 0.5),
    "ps_roi_pool": lambda x, r: cupy_roi.ps_roi_pool(x, r, (2, 3), 0.5),
    "prroi_pool2d": lambda x, r: cupy_roi.prroi_pool2d(x, r, 2, 3, 0.5),
    "ps_prroi_pool": lambda x, r: cupy_roi.ps_prroi_pool(x, r, (2, 3), 0.5),
}


def rois(rng, n, h, w):
    good = [[rng.integers(0, n), *rng.uniform(-4, 2 * w, 2), *rng.uniform(2, 2.5 * w, 2)] for _ in range(6)]
    good += [[0, -30, -30, 3 * w, 3 * h], [n - 1, 2 * w + 5, 2 * h + 5, 2 * w + 9, 2 * h + 9],  # huge, outside
             [0, 3.2, 3.2, 3.2004, 3.2004]]  # a sliver
    bad = [[n, 1, 1, 5, 5], [-1, 1, 1, 5, 5], [0.5, 1, 1, 5, 5], [0, float("nan"), 1, 5, 5],
           [0, 1, 1, float("inf"), 5], [1e9, 1, 1, 5, 5]]
    return np.array(good + bad, dtype=np.float64)


def layouts(x):
    yield "nchw", x
    yield "channels_last", x.to(memory_format=torch.channels_last)
    wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    yield "strided view", wide[..., ::2]


def main():
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    n, c, h, w = 2, 12, 7, 9
    r = rois(rng, n, h, w)
    count = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        base = torch.tensor(rng.standard_normal((n, c, h, w)), dtype=dtype, device="cuda")
        for name, op in OPS.items():
            for layout, x in layouts(base):
                x = x.detach().requires_grad_(True)
                rt = torch.tensor(r, device="cuda", dtype=torch.float32 if dtype != torch.float64 else dtype,
                                  requires_grad=name.endswith("prroi_pool") or name == "prroi_pool2d")
                out = op(x, rt)
                out.backward(torch.ones_like(out))
                count += 1
        # zero RoIs
        out = OPS["roi_align"](base.detach().requires_grad_(True), torch.zeros(0, 5, device="cuda"))
        out.sum().backward()
    import cupy

    xc = cupy.asarray(rng.standard_normal((n, c, h, w)))
    rc = cupy.asarray(r)
    out = array_api.ps_roi_align_forward(xc, rc, (2, 3), 0.5, 2)
    array_api.ps_roi_align_backward(out, rc, xc.shape, (2, 3), 0.5, 2)
    out, argmax = array_api.roi_pool_forward(xc, rc, (2, 3), 0.5)
    array_api.roi_pool_backward(out, rc, argmax, xc.shape, (2, 3), 0.5)
    out = array_api.prroi_pool_forward(xc, rc, (2, 3), 0.5, True)
    array_api.prroi_pool_backward(out, xc, rc, (2, 3), 0.5, True)
    torch.cuda.synchronize()
    cupy.cuda.Device().synchronize()
    print(f"sanitize_cases: {count} torch forward+backward calls (4 dtypes x {len(OPS)} ops x 3 layouts), "
          "array API calls, unchecked invalid RoIs: done")


if __name__ == "__main__":
    main()
