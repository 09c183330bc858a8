"""How far float32 arithmetic alone puts RoIAlign's feature gradient from
float64, on the cases of tests/test_cuda.py's
test_small_bins_scatter_like_the_reference (same RoIs and inputs per seed),
through the CPU reference path: the floor under that test's float32 bound.

    python3 benchmarks/float32_scatter_error.py [--seeds 40]

Prints, per (bins, sampling ratio), the largest error as a share of the
gradient's scale (max |grad|) and how many seeds break the old bound (1e-5
absolute and relative) and the test's (2e-5 of the scale, 1e-5 relative).
CPU only."""
import argparse

import numpy as np
import torch

import cupy_roi


def case(seed, size, sampling_ratio):
    """The test's float32 RoIs, features and output gradient for ``seed``."""
    g = np.random.default_rng(seed)
    (ph, pw), n, h, c, w, stretch = size, 2, 12, 4, 41, 1.0137
    rows = []
    for side in (0.1, 0.5, 1.0, 1.7, 2.5, 4.0, 9.0):
        span_y, span_x = ph * side * stretch, pw * side * stretch
        for x1, y1 in ((g.uniform(0, max(w - span_x, 0)), g.uniform(0, max(h - span_y, 0))),
                       (w - 0.5 * span_x, h - 0.5 * span_y), (-0.4 * span_x, -0.3 * span_y), (w - span_x, 0.0)):
            rows.append([float(g.integers(0, n)), x1, y1, x1 + span_x, y1 + span_y])
        x1, y1 = g.uniform(0, w), g.uniform(0, h)
        rows.append([float(g.integers(0, n)), x1 + span_x, y1, x1, y1 + span_y])
    as32 = lambda a: np.asarray(a).astype(np.float32).astype(np.float64)  # noqa: E731
    return as32(rows), as32(g.standard_normal((n, c, h, w))), as32(g.standard_normal((len(rows), c, ph, pw)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=40)
    args = parser.parse_args()
    print("| bins | sampling | max error / max abs grad | seeds past 1e-5 | seeds past 2e-5 of the scale |")
    print("|---|---:|---:|---:|---:|")
    for size in ((3, 4), (2, 9)):
        for sampling_ratio in (2, 0, 3):
            worst, old, new = 0.0, 0, 0
            for seed in range(args.seeds):
                r, x, go = case(seed, size, sampling_ratio)
                bad_old = bad_new = False
                for multi in (False, True):
                    for aligned in (True, False):
                        def call(t, b):
                            if multi:
                                return cupy_roi.multi_scale_roi_align([t, t[..., ::2, ::2]], b, size, [1.0, 0.5],
                                                                      sampling_ratio, aligned, mapping="mmdet",
                                                                      finest_scale=2)
                            return cupy_roi.roi_align(t, b, size, 1.0, sampling_ratio, aligned)
                        grads = []
                        for dtype in (torch.float64, torch.float32):
                            t = torch.tensor(x, dtype=dtype, requires_grad=True)
                            call(t, torch.tensor(r, dtype=dtype)).backward(torch.tensor(go, dtype=dtype))
                            grads.append(t.grad.double())
                        want, got = grads
                        scale = float(want.abs().max())
                        worst = max(worst, float((got - want).abs().max()) / scale)
                        bad_old |= not torch.allclose(got, want, rtol=1e-5, atol=1e-5)
                        bad_new |= not torch.allclose(got, want, rtol=1e-5, atol=2e-5 * scale)
                old += bad_old
                new += bad_new
            print(f"| {size[0]}x{size[1]} | {sampling_ratio} | {worst:.2e} | {old} of {args.seeds} | "
                  f"{new} of {args.seeds} |", flush=True)


if __name__ == "__main__":
    main()
