"""Probe for the next change to the plane forward (NOTES.md session 27, item 9): Mask R-CNN 7x7 float32 NCHW
forward (graph replay) with the benchmark's shuffled RoIs, against the same RoIs arranged so that
roi_image_order places each image's parts sorted by width. It relies on that kernel's placement (a warp's
claims in place order: warp, then iteration, then load, then lane, cuda_src/roi_align.cu), and checks that
both give each RoI the same output, bit for bit. Times: median of 10 replays of a graph of 10 forwards.

    python benchmarks/plane_width_order.py    # ONCE=1: the check alone (for ncu)

Session 27 (H100, one call): 1.017-1.019 ms shuffled, 0.998-0.999 ms width-arranged; ncu: shared wavefronts
170.7 M -> 163.9 M, kernel 1.17 -> 1.15 ms (locked clocks).
"""
import os
import sys

import torch

import cupy_roi
from boxes import rois_for


def graph_ms(call, reps=10):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(2): call()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10): call()
    for _ in range(2): g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) / 10)
    return sorted(ts)[reps // 2]


gen = torch.Generator().manual_seed(0)
n, c, h, w, stride = 16, 256, 200, 272, 4
x = torch.randn(n, c, h, w, generator=gen).cuda()
r = rois_for(n, 512, h, w, stride, gen)
k = len(r)
width = r[:, 3] - r[:, 1]
# positions in the order kernel's claim order: warp, then iteration, then load, then lane
pos = sorted(range(k), key=lambda i: ((i % 1024) // 32, i // 4096, (i % 4096) // 1024, i % 32))
arranged = torch.empty_like(r)
arranged[torch.tensor(pos)] = r[torch.argsort(width)]
ra, rb = r.cuda(), arranged.cuda()
fa = lambda: cupy_roi.roi_align(x, ra, (7, 7), 1.0 / stride, 2, True)
fb = lambda: cupy_roi.roi_align(x, rb, (7, 7), 1.0 / stride, 2, True)
# same outputs, row for row of the same RoI
oa, ob = fa(), fb()
perm = torch.empty(k, dtype=torch.long); perm[torch.tensor(pos)] = torch.argsort(width)
assert torch.equal(ob.cpu(), oa.cpu()[perm]), "outputs differ"
if os.environ.get("ONCE"):
    sys.exit(0)
for rnd in range(3):
    print(f"round {rnd}: shuffled {graph_ms(fa):.4f} ms, width-arranged {graph_ms(fb):.4f} ms", flush=True)
