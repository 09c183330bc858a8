"""Issue 14, part 2, worked out before the kernels: PrRoIPool through summed-area tables.

The integral of the bilinear surface over a bin [ylo, yhi] x [xlo, xhi] is separable:
``sum_h sum_w f[h, w] a_h b_w`` with ``a_h = integral of tent(y - h) over [ylo, yhi]``.
``a_h`` is exactly 1 for every row whose whole tent lies in the bin (``ylo + 1 <= h <=
yhi - 1``), and other than 0 for at most four more rows (two at each edge). So, with
``S`` the summed-area table of the plane and ``Iy``, ``Ix`` the interior ranges and
``Py``, ``Px`` the (at most four) partial rows and columns::

    I = rect(Iy, Ix) + sum_{p in Py} a_p rect(p, Ix) + sum_{q in Px} b_q rect(Iy, q)
        + sum_{p in Py, q in Px} a_p b_q f[p, q]

at most 9 rectangle sums (4 reads of S each) and 16 cells, whatever the bin's size. The
adjoint (feature gradient) adds each rectangle's weight at its 4 corners of a
(H + 1) x (W + 1) buffer G and each cell's directly; a reversed (suffix) prefix sum of G
then gives the gradient: ``grad[h, w] = cells[h, w] + sum_{h' > h, w' > w} G[h', w']``.
Edge derivatives (box gradients) are line integrals: ``dI/dyhi = sum_h tent(yhi - h)
rowb(h)`` over the two rows under the edge, ``rowb(h) = rect(h, Ix) + sum_q b_q f[h, q]``.

This script is the float64 NumPy model of that, one plane at a time:

* ``--check`` compares forward, feature gradient and box gradient with cupy_roi's CPU
  reference path (autograd) on random maps and boxes of every kind (inside, partial,
  outside, tiny, huge, inverted);
* the default prints the cost model: reads and scattered adds per bin, direct kernel
  against tables, for the three cases of the issue (boxes as in ``bench.py``).

    python3 benchmarks/prroi_sat.py --check
    python3 benchmarks/prroi_sat.py
"""
import argparse
import math

import numpy as np


def tent_cdf(t):
    """integral_{-inf}^{t} max(0, 1 - |u|) du."""
    t = min(max(t, -1.0), 1.0)
    return 0.5 * (t + 1) ** 2 if t <= 0 else 1 - 0.5 * (1 - t) ** 2


def tent(t):
    return max(0.0, 1.0 - abs(t))


def axis(lo, hi, size):
    """The interior range [i0, i1) (weight exactly 1) and the partial (index,
    weight) pairs of one bin side, clipped to the map (zero padding)."""
    i0 = max(math.ceil(lo + 1), 0)
    i1 = min(math.floor(hi - 1) + 1, size)
    i1 = max(i1, i0)
    partial = []
    for p in range(max(math.floor(lo - 1) + 1, 0), min(math.ceil(hi + 1), size)):
        if i0 <= p < i1:
            continue
        wgt = tent_cdf(hi - p) - tent_cdf(lo - p)
        if wgt != 0.0:
            partial.append((p, wgt))
    return (i0, i1), partial


def table(plane):
    """S[h, w] = sum of plane[:h, :w]; (H + 1) x (W + 1)."""
    s = np.zeros((plane.shape[0] + 1, plane.shape[1] + 1))
    s[1:, 1:] = plane.cumsum(0).cumsum(1)
    return s


def rect(s, h0, h1, w0, w1):
    if h1 <= h0 or w1 <= w0:
        return 0.0
    return s[h1, w1] - s[h0, w1] - s[h1, w0] + s[h0, w0]


class Bin:
    """One bin's split into interior ranges and partial rows and columns."""

    def __init__(self, ylo, yhi, xlo, xhi, height, width):
        self.ylo, self.yhi, self.xlo, self.xhi = ylo, yhi, xlo, xhi
        (self.h0, self.h1), self.py = axis(ylo, yhi, height)
        (self.w0, self.w1), self.px = axis(xlo, xhi, width)

    def rects(self):
        """(weight, h0, h1, w0, w1) of every rectangle sum, and (weight, h, w) of every cell."""
        out = [(1.0, self.h0, self.h1, self.w0, self.w1)]
        out += [(a, p, p + 1, self.w0, self.w1) for p, a in self.py]
        out += [(b, self.h0, self.h1, q, q + 1) for q, b in self.px]
        cells = [(a * b, p, q) for p, a in self.py for q, b in self.px]
        return out, cells

    def integral(self, s, plane):
        rects, cells = self.rects()
        return sum(c * rect(s, *r) for c, *r in rects) + sum(c * plane[p, q] for c, p, q in cells)

    def scatter(self, g, grad_s, grad_cells):
        """Adjoint of integral: adds g times each weight into the corner buffer and the cells."""
        rects, cells = self.rects()
        for c, h0, h1, w0, w1 in rects:
            if h1 <= h0 or w1 <= w0:
                continue
            grad_s[h1, w1] += g * c
            grad_s[h0, w1] -= g * c
            grad_s[h1, w0] -= g * c
            grad_s[h0, w0] += g * c
        for c, p, q in cells:
            grad_cells[p, q] += g * c

    def _line(self, s, plane, pos, rows):
        """integral of the surface along one edge: sum over the two grid lines under it."""
        total = 0.0
        size = plane.shape[0] if rows else plane.shape[1]
        for i in (math.floor(pos), math.floor(pos) + 1):
            wgt = tent(pos - i)
            if wgt == 0.0 or not 0 <= i < size:
                continue
            if rows:  # row i weighted by the columns' b
                v = rect(s, i, i + 1, self.w0, self.w1) + sum(b * plane[i, q] for q, b in self.px)
            else:
                v = rect(s, self.h0, self.h1, i, i + 1) + sum(a * plane[p, i] for p, a in self.py)
            total += wgt * v
        return total

    def edge_derivatives(self, s, plane):
        """dI/d(ylo, yhi, xlo, xhi)."""
        return (-self._line(s, plane, self.ylo, True), self._line(s, plane, self.yhi, True),
                -self._line(s, plane, self.xlo, False), self._line(s, plane, self.xhi, False))


def suffix_gradient(grad_s, grad_cells):
    """grad[..., h, w] = cells[..., h, w] + sum_{h' > h, w' > w} G[..., h', w']."""
    tail = grad_s[..., ::-1, ::-1].cumsum(-2).cumsum(-1)[..., ::-1, ::-1]
    return grad_cells + tail[..., 1:, 1:]


def roi_in_map(row, scale, ph, pw):
    """Image index, corners in map coordinates, bin sizes and bin area of one RoI row."""
    b, x1, y1, x2, y2 = row
    box = x1 * scale, y1 * scale, x2 * scale, y2 * scale
    bw, bh = max(box[2] - box[0], 0.0) / pw, max(box[3] - box[1], 0.0) / ph
    return int(b), box, bw, bh, bw * bh


def box_derivatives(d_ylo, d_yhi, d_xlo, d_xhi, integral, i, j, ph, pw, box):
    """area * d(integral / area) / d(sx1, sy1, sx2, sy2) of bin (i, j) (scalars, or
    arrays that broadcast) from the integral's derivatives along its four edges:
    the edges move with the box (ylo = sy1 + i * bh, yhi = sy1 + (i + 1) * bh,
    bh = (sy2 - sy1) / ph), and so does the area, (sx2 - sx1)(sy2 - sy1) / (ph pw)."""
    sx1, sy1, sx2, sy2 = box
    d_sy1 = d_ylo * (1 - i / ph) + d_yhi * (1 - (i + 1) / ph) + integral / (sy2 - sy1)
    d_sy2 = d_ylo * (i / ph) + d_yhi * ((i + 1) / ph) - integral / (sy2 - sy1)
    d_sx1 = d_xlo * (1 - j / pw) + d_xhi * (1 - (j + 1) / pw) + integral / (sx2 - sx1)
    d_sx2 = d_xlo * (j / pw) + d_xhi * ((j + 1) / pw) - integral / (sx2 - sx1)
    return d_sx1, d_sy1, d_sx2, d_sy2


def prroi_sat(x, rows, ph, pw, scale, go):
    """Forward, feature gradient and box gradient of PrRoIPool (not position-
    sensitive) through tables, for grad_output ``go``."""
    n, c, h, w = x.shape
    out = np.zeros((len(rows), c, ph, pw))
    gx = np.zeros_like(x)
    grows = np.zeros((len(rows), 5))
    tables = {}
    grad_s = np.zeros((n, c, h + 1, w + 1))
    for k, row in enumerate(rows):
        b, box, bw, bh, area = roi_in_map(row, scale, ph, pw)
        if not area > 0:
            continue
        sx1, sy1 = box[0], box[1]
        for ch in range(c):
            plane = x[b, ch]
            s = tables.setdefault((b, ch), table(plane))
            for i in range(ph):
                for j in range(pw):
                    ylo, xlo = sy1 + i * bh, sx1 + j * bw
                    bn = Bin(ylo, ylo + bh, xlo, xlo + bw, h, w)
                    integral = bn.integral(s, plane)
                    out[k, ch, i, j] = integral / area
                    g = go[k, ch, i, j]
                    bn.scatter(g / area, grad_s[b, ch], gx[b, ch])
                    d = box_derivatives(*bn.edge_derivatives(s, plane), integral, i, j, ph, pw, box)
                    grows[k, 1:] += g / area * scale * np.array(d)
    return out, suffix_gradient(grad_s, gx), grows


def roi_axis(lo, bin_size, bins, size):
    """One RoI's bins along one axis on shared cuts: the sorted table indices
    ``u`` that split the axis into runs on which every bin's weight is constant
    (a partial row alone, or a run of rows interior to one bin), and the
    weights ``[bins, len(u) - 1]``. Neighbouring bins share their cuts, so a
    RoI needs ``len(u_y) * len(u_x)`` table reads for all its bins."""
    cuts, per_bin = set(), []
    for i in range(bins):
        (i0, i1), partial = axis(lo + i * bin_size, lo + (i + 1) * bin_size, size)
        per_bin.append(((i0, i1), partial))
        if i1 > i0:
            cuts.update((i0, i1))
        for p, _ in partial:
            cuts.update((p, p + 1))
    u = sorted(cuts)
    at = {v: t for t, v in enumerate(u)}
    weights = np.zeros((bins, max(len(u) - 1, 0)))
    for i, ((i0, i1), partial) in enumerate(per_bin):
        if i1 > i0:
            weights[i, at[i0]:at[i1]] = 1.0
        for p, a in partial:
            weights[i, at[p]] = a
    return np.array(u, dtype=np.int64), weights


def edge_rows(e, size):
    """(row, tent weight) of the grid lines under an edge at e."""
    return [(i, tent(e - i)) for i in (math.floor(e), math.floor(e) + 1) if 0 <= i < size and tent(e - i) > 0]


def prroi_sat_tiles(x, rows, ph, pw, scale, go):
    """prroi_sat with each RoI's bins computed together from one grid of table
    values (the kernel design: one thread group per RoI and channel block)."""
    n, c, h, w = x.shape
    out = np.zeros((len(rows), c, ph, pw))
    grad_s = np.zeros((n, c, h + 1, w + 1))
    grows = np.zeros((len(rows), 5))
    tables = {}
    for k, row in enumerate(rows):
        b, box, bw, bh, area = roi_in_map(row, scale, ph, pw)
        if not area > 0:
            continue
        sx1, sy1 = box[0], box[1]
        uy, ay = roi_axis(sy1, bh, ph, h)
        ux, bx = roi_axis(sx1, bw, pw, w)
        if len(uy) < 2 or len(ux) < 2:  # wholly outside the map
            continue
        for ch in range(c):
            s = tables.setdefault((b, ch), table(x[b, ch]))
            grid = s[np.ix_(uy, ux)]
            blocks = grid[1:, 1:] - grid[:-1, 1:] - grid[1:, :-1] + grid[:-1, :-1]
            integral = ay @ blocks @ bx.T
            out[k, ch] = integral / area
            g = go[k, ch] / area
            d_blocks = ay.T @ g @ bx
            d_grid = np.zeros_like(grid)
            d_grid[1:, 1:] += d_blocks
            d_grid[:-1, 1:] -= d_blocks
            d_grid[1:, :-1] -= d_blocks
            d_grid[:-1, :-1] += d_blocks
            grad_s[b, ch][np.ix_(uy, ux)] += d_grid
            # box gradients: line integrals along each bin edge, from the same grid rows
            line_y = np.zeros((ph + 1, pw))  # integral of the surface along y-edge i over bin column j
            for i in range(ph + 1):
                for r, t in edge_rows(sy1 + i * bh, h):
                    row = s[r + 1, ux] - s[r, ux]
                    line_y[i] += t * (bx @ (row[1:] - row[:-1]))
            line_x = np.zeros((pw + 1, ph))
            for j in range(pw + 1):
                for q, t in edge_rows(sx1 + j * bw, w):
                    col = s[uy, q + 1] - s[uy, q]
                    line_x[j] += t * (ay @ (col[1:] - col[:-1]))
            d = box_derivatives(-line_y[:-1], line_y[1:], -line_x[:-1].T, line_x[1:].T, integral,
                                np.arange(ph).reshape(-1, 1), np.arange(pw).reshape(1, -1), ph, pw, box)
            grows[k, 1:] += scale * np.array([(g * v).sum() for v in d])
    return out, suffix_gradient(grad_s, np.zeros_like(x)), grows


def check(seed, cases):
    import torch

    import cupy_roi

    rng = np.random.default_rng(seed)
    worst = {}
    for _ in range(cases):
        n, c, h, w = int(rng.integers(1, 3)), int(rng.integers(1, 3)), int(rng.integers(2, 14)), int(
            rng.integers(2, 14))
        ph, pw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        scale = float(rng.choice([1.0, 0.5, 0.37]))
        k = int(rng.integers(1, 6))
        rows = []
        for _ in range(k):
            kind = rng.choice(["inside", "partial", "outside", "tiny", "huge", "inverted"])
            lo = rng.uniform(0, [w, h])
            ext = {"inside": rng.uniform(0.5, 0.6 * min(h, w), 2), "partial": rng.uniform(0.5, 1.5, 2) * [w, h],
                   "outside": rng.uniform(0.1, 2, 2), "tiny": rng.uniform(1e-3, 0.3, 2),
                   "huge": rng.uniform(2, 4, 2) * [w, h], "inverted": -rng.uniform(0.01, 2, 2)}[kind]
            if kind == "outside":
                lo = lo + [w + 1.5, 0]
            if kind in ("partial", "huge"):
                lo = lo - ext / 2
            rows.append([int(rng.integers(0, n)), *(lo / scale), *((lo + ext) / scale)])
        rows = np.array(rows)
        x = rng.standard_normal((n, c, h, w))
        go = rng.standard_normal((k, c, ph, pw))
        xt = torch.tensor(x, requires_grad=True)
        rt = torch.tensor(rows, requires_grad=True)
        ref = cupy_roi.prroi_pool2d(xt, rt, ph, pw, scale)
        ref.backward(torch.tensor(go))
        want = (ref.detach().numpy(), xt.grad.numpy(), rt.grad.numpy())
        for name, fn in (("per bin", prroi_sat), ("per RoI", prroi_sat_tiles)):
            got = fn(x, rows, ph, pw, scale, go)
            errs = [np.abs(got[i] - want[i]).max() / max(1.0, np.abs(want[i]).max()) for i in range(3)]
            worst[name] = [max(a, b) for a, b in zip(worst.get(name, [0.0] * 3), errs)]
    for name, (e_out, e_x, e_rows) in worst.items():
        print(f"{name}: {cases} random calls against cupy_roi's CPU reference (float64): largest relative "
              f"difference forward {e_out:.1e}, feature gradient {e_x:.1e}, box gradient {e_rows:.1e}")
        assert max(e_out, e_x, e_rows) < 1e-10


def costs():
    """Reads and scattered adds per bin and channel on the issue's cases (boxes
    as in bench.py, 7x7 bins): the direct kernel (every cell the bin's tents
    reach), tables per bin (at most 9 rectangles and 16 cells), and tables per
    RoI (one grid of table values shared by all the RoI's bins). The backward
    of the direct kernel adds once per cell; the table forms add once per read
    into the corner buffer, then one suffix-sum pass per plane."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from boxes import rois_for
    import torch

    print("| case | direct, per bin | tables, per bin | tables, per RoI (per bin) | "
          "plane cells per bin (table build + suffix sum) |")
    print("|---|---:|---:|---:|---:|")
    size = 7
    for title, n, h, w, stride, per_image in (("8x256x64x64, K=4096, stride 8", 8, 64, 64, 8, 512),
                                              ("16x256x200x272, K=8192, stride 4", 16, 200, 272, 4, 512),
                                              ("2x256x50x68, K=1024, stride 16", 2, 50, 68, 16, 512)):
        r = rois_for(n, per_image, h, w, stride, torch.Generator().manual_seed(0)).double().numpy()
        direct = per_bin = per_roi = 0.0
        for _, x1, y1, x2, y2 in r:
            sx1, sy1, sx2, sy2 = x1 / stride, y1 / stride, x2 / stride, y2 / stride
            bh, bw = (sy2 - sy1) / size, (sx2 - sx1) / size
            ys = [axis(sy1 + i * bh, sy1 + (i + 1) * bh, h) for i in range(size)]
            xs = [axis(sx1 + j * bw, sx1 + (j + 1) * bw, w) for j in range(size)]
            for i in range(size):
                lo = sy1 + i * bh
                rows_touched = max(0, min(math.ceil(lo + bh), h - 1) - max(math.floor(lo), 0) + 1)
                for j in range(size):
                    lo_x = sx1 + j * bw
                    cols_touched = max(0, min(math.ceil(lo_x + bw), w - 1) - max(math.floor(lo_x), 0) + 1)
                    direct += rows_touched * cols_touched
                    (h0, h1), py = ys[i]
                    (w0, w1), px = xs[j]
                    per_bin += 4 * (1 + len(py) + len(px)) + len(py) * len(px)
            uy, _ = roi_axis(sy1, bh, size, h)
            ux, _ = roi_axis(sx1, bw, size, w)
            per_roi += len(uy) * len(ux)
        bins = len(r) * size * size
        print(f"| {title} | {direct / bins:.1f} | {per_bin / bins:.1f} | {per_roi / bins:.1f} | "
              f"{n * (h + 1) * (w + 1) / bins:.2f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=200)
    args = parser.parse_args()
    if args.check:
        check(args.seed, args.cases)
    else:
        costs()


if __name__ == "__main__":
    main()
