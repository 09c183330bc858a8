"""Issue 14: where the RoIAlign forward's plane mode pays (``_rules.forward_plane``).

On the Mask R-CNN map (16x256x200x272, NCHW), for RoI densities from a few
to many samples per map cell, 7x7 and 14x14 bins (sampling 2), float32 and
float16: the forward's kernel time (CUDA-graph replay) with the flat grid and
with the plane mode, each forced through the rule's policy ``_plane_pays``.
The rule's ``PLANE_MIN_SAMPLES_PER_CELL`` comes from this table.

    python3 benchmarks/plane_rule.py [--reps 10]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import graphed, rois_for, timed  # noqa: E402

import cupy_roi  # noqa: E402
from cupy_roi import _rules  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    n, c, h, w, stride = 16, 256, 200, 272, 4
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, NCHW {n}x{c}x{h}x{w}, sampling 2, "
          f"RoIs shuffled across images; kernel time (graph replay), median of {args.reps} (ms)\n")
    print("| bins | dtype | RoIs an image | samples a cell | flat grid | plane mode | plane / flat |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    policy = _rules._plane_pays
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(n, c, h, w, generator=gen).to("cuda", dtype)
        for size, counts in ((7, (16, 32, 64, 128, 256, 512)), (14, (8, 16, 32, 64, 128))):
            for per_image in counts:
                r = rois_for(n, per_image, h, w, stride, gen).to("cuda")
                density = len(r) * size * size * 4 / (n * h * w)
                times = []
                for pays in (False, True):
                    _rules._plane_pays = lambda *a, pays=pays: pays
                    try:
                        replay = graphed(lambda: cupy_roi.roi_align(x, r, size, 1 / stride, 2, False))
                        times.append(timed(replay, reps=args.reps))
                    finally:
                        _rules._plane_pays = policy
                print(f"| {size}x{size} | {str(dtype)[6:]} | {per_image} | {density:.2f} | {times[0]:.3f} | "
                      f"{times[1]:.3f} | {times[1] / times[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
