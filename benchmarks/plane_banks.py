"""Shared-memory wavefronts of the plane forward's reads (roi_align_forward_plane, 7x7 bins, sampling 2), on
paper: which RoIs share a warp decides how many of its lanes' words fall in one bank. Two RoIs a warp (the
image's RoIs in the order's consecutive pairs), lane j of each its x sample j; each of a sample row's four
reads (upper and lower row, left and right column) is one instruction over both RoIs' 14 lanes, and takes as
many wavefronts as the most distinct words of one bank. The benchmark's Mask R-CNN boxes (benchmarks/boxes.py),
two images. No GPU needed.

    python benchmarks/plane_banks.py

Session 27 (NOTES.md): pairs as the order gives them now (any order within an image's part) 2.50 wavefronts a
read; RoIs sorted by width within the image 2.28, in classes of 1, 2 or 4 pixels of width 2.29, 2.31, 2.38.
Nsight Compute counts 2.9 a read on the GPU for the order as it is; the model is for comparing orders.
"""
import math

import numpy as np
import torch

from boxes import rois_for

H, W, STRIDE, BINS, N = 200, 272, 4, 7, 2
ROW_WORDS = 272  # the plane's row stride in shared memory, float32


def axis(start, size, extent):
    """Each sample's (lower, upper) index along an axis, as axis_weights clamps them; off the map: None."""
    step = size / BINS
    out = []
    for i in range(BINS):
        for k in range(N):
            p = start + i * step + (k + 0.5) * step / N
            if p < -1 or p > extent:
                out.append(None)
                continue
            low = int(math.floor(max(p, 0.0)))
            out.append((extent - 1, extent - 1) if low >= extent - 1 else (low, low + 1))
    return out


def reads(box):
    """The RoI's word addresses: [sample row][upper/lower][left/right column][x sample]."""
    x1, y1, x2, y2 = box * (1.0 / STRIDE) - 0.5  # aligned=True, as bench.py calls it
    cols = [c or (0, 0) for c in axis(x1, x2 - x1, W)]  # a column off the map: its lanes read column 0
    rows = [r or (H, H) for r in axis(y1, y2 - y1, H)]  # a row off the map: the zero row below the plane
    return [[[[rows[s][u] * ROW_WORDS + cols[j][v] for j in range(len(cols))] for v in (0, 1)] for u in (0, 1)]
            for s in range(len(rows))]


def wavefronts(words):
    per_bank = {}
    for a in set(words):
        per_bank[a % 32] = per_bank.get(a % 32, 0) + 1
    return max(per_bank.values())


def mean_wavefronts(geometry, order):
    total = count = 0
    for i in range(0, len(order) - 1, 2):
        a, b = geometry[order[i]], geometry[order[i + 1]]
        for s in range(len(a)):
            for u in (0, 1):
                for v in (0, 1):
                    total += wavefronts(a[s][u][v] + b[s][u][v])
                    count += 1
    return total / count


def main():
    gen = torch.Generator().manual_seed(0)
    rows = rois_for(16, 512, H, W, STRIDE, gen).double().numpy()
    keep = rows[:, 0] < 2  # two images
    rows = rows[keep]
    geometry = [reads(r[1:]) for r in rows]
    image, width = rows[:, 0].astype(int), (rows[:, 3] - rows[:, 1]) / STRIDE
    rng = np.random.default_rng(0)
    orders = {"any order within the image (now)": np.lexsort((rng.random(len(rows)), image))}
    orders["sorted by width"] = np.lexsort((width, image))
    for step in (1, 2, 4):
        orders[f"width classes of {step} px"] = np.lexsort((rng.random(len(rows)), np.floor(width / step), image))
    print("| order of an image's RoIs | wavefronts a read |\n|---|---:|")
    for name, order in orders.items():
        print(f"| {name} | {mean_wavefronts(geometry, list(order)):.2f} |")


if __name__ == "__main__":
    main()
