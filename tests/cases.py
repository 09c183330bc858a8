"""Random inputs shared by the CPU and GPU tests: fresh draws every run.

Every generator comes from :func:`rng`, which records its seed; a failing test
prints the seeds it drew (see ``conftest.py``), and setting
``CUPY_ROI_TEST_SEED`` to one of them replays the failure.
"""
import os
from pathlib import Path

import numpy as np
import torch

SEED_ENV = "CUPY_ROI_TEST_SEED"
seeds_drawn = []  # the seeds of the running test, reported by conftest.py on failure


def rng():
    """A fresh NumPy generator; its seed is ``$CUPY_ROI_TEST_SEED`` when set."""
    seed = os.environ.get(SEED_ENV)
    seed = int(seed) if seed else int(np.random.SeedSequence().entropy % (1 << 63))
    seeds_drawn.append(seed)
    return np.random.default_rng(seed)


OPS = {
    # name: (torch function, slow oracle, takes sampling/aligned, position-sensitive)
    "roi_align": ("roi_align", False),
    "ps_roi_align": ("roi_align", True),
    "roi_pool": ("roi_pool", False),
    "ps_roi_pool": ("roi_pool", True),
    "prroi_pool": ("prroi_pool", False),
    "ps_prroi_pool": ("prroi_pool", True),
}


def boxes(rng, k, n, height, width, scale, kinds=("inside", "partial", "outside", "tiny", "huge")):
    """[K, 5] rows in image coordinates, mixing box kinds, batch order shuffled."""
    img_h, img_w = height / scale, width / scale
    rows = []
    for idx in range(k):
        kind = kinds[idx % len(kinds)]
        if kind == "inside":
            x1, y1 = rng.uniform(0, 0.6 * img_w), rng.uniform(0, 0.6 * img_h)
            x2, y2 = x1 + rng.uniform(0.1, 0.4) * img_w, y1 + rng.uniform(0.1, 0.4) * img_h
        elif kind == "partial":
            x1, y1 = rng.uniform(-0.3, 0.8) * img_w, rng.uniform(-0.3, 0.8) * img_h
            x2, y2 = x1 + rng.uniform(0.3, 0.7) * img_w, y1 + rng.uniform(0.3, 0.7) * img_h
        elif kind == "outside":
            x1, y1 = rng.uniform(1.2, 1.5) * img_w, rng.uniform(-0.5, 1.5) * img_h
            x2, y2 = x1 + rng.uniform(0.1, 0.3) * img_w, y1 + rng.uniform(0.1, 0.3) * img_h
        elif kind == "tiny":
            x1, y1 = rng.uniform(0, img_w), rng.uniform(0, img_h)
            x2, y2 = x1 + rng.uniform(0.05, 0.9) / scale, y1 + rng.uniform(0.05, 0.9) / scale
        else:  # huge
            x1, y1 = rng.uniform(-0.6, -0.2) * img_w, rng.uniform(-0.6, -0.2) * img_h
            x2, y2 = rng.uniform(1.2, 1.8) * img_w, rng.uniform(1.2, 1.8) * img_h
        rows.append([rng.integers(0, n), x1, y1, x2, y2])
    rows = np.array(rows, dtype=np.float64)
    rng.shuffle(rows)
    return rows


def thin_bin_rois(g, k, n, h, w, ph, pw, scale, bin_px):
    """[K, 5] RoIs whose bins are ``bin_px`` feature pixels wide and high
    (``"map"``: one box over the whole map), anywhere on the map, also across
    grid points and the border."""
    if bin_px == "map":
        return np.array([[i % n, 0, 0, w / scale, h / scale] for i in range(k)], dtype=np.float64)
    bw, bh = bin_px * pw, bin_px * ph
    x1 = g.uniform(-bw, w - 1 + bw, k)
    y1 = g.uniform(-bh, h - 1 + bh, k)
    x1[: k // 4] = np.round(x1[: k // 4]) - bw / 2  # straddling a grid point
    return np.stack([g.integers(0, n, k), x1 / scale, y1 / scale, (x1 + bw) / scale, (y1 + bh) / scale], 1)


def features(rng, n, c, h, w):
    return rng.standard_normal((n, c, h, w))


def make(rng, *, n=3, c_out=3, h=11, w=13, ph=3, pw=2, k=10, scale=0.5, ps=False, kinds=None):
    c = c_out * ph * pw if ps else c_out
    x = features(rng, n, c, h, w)
    r = boxes(rng, k, n, h, w, scale, **({"kinds": kinds} if kinds else {}))
    return x, r


def call(name, x, rois, ph, pw, scale, sampling_ratio=2, aligned=True, deterministic=False):
    import cupy_roi

    size = (ph, pw)
    if name == "roi_align":
        return cupy_roi.roi_align(x, rois, size, scale, sampling_ratio, aligned, deterministic)
    if name == "ps_roi_align":
        return cupy_roi.ps_roi_align(x, rois, size, scale, sampling_ratio, aligned, deterministic)
    if name == "roi_pool":
        return cupy_roi.roi_pool(x, rois, size, scale, deterministic)
    if name == "ps_roi_pool":
        return cupy_roi.ps_roi_pool(x, rois, size, scale, deterministic)
    if name == "prroi_pool":
        return cupy_roi.prroi_pool2d(x, rois, ph, pw, scale, deterministic)
    return cupy_roi.ps_prroi_pool(x, rois, size, scale, deterministic)


def slow(name, x, rois, ph, pw, scale, sampling_ratio=2, aligned=True):
    from . import slow_reference as sr

    family, ps = OPS[name]
    if family == "roi_align":
        return sr.roi_align(x, rois, ph, pw, scale, sampling_ratio, aligned, ps)
    return getattr(sr, family)(x, rois, ph, pw, scale, ps)


def rel_err(a, b):
    a = torch.as_tensor(a).double().cpu()
    b = torch.as_tensor(b).double().cpu()
    assert not torch.isnan(a).any(), "NaN in result"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def testdata(name="prroi_pool_2x2_s0.5"):
    """Golden data carried by the project (``tests/data/<name>/``, with its README)."""
    return Path(__file__).resolve().parent / "data" / name
