"""Probe (NOTES.md session 28): does the plane forward lose its last wave? Its grid is one block per (image,
channel) with one block an SM (the plane fills shared memory): Mask R-CNN's 16 x 256 = 4096 blocks on 132 SMs
are 31.03 waves, so the last wave runs 4 blocks. The same RoIs on maps of other channel counts, around
multiples of the SM count, tell: where the time steps with whole waves, the tail costs up to a block's time;
where it grows with the channels, it does not. Mask R-CNN 7x7 float32 NCHW, 512 RoIs an image, graph replay
(median of 10 replays of 10 forwards), ms, and ms a wave.

    python benchmarks/plane_tail.py
"""
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
n, h, w, stride = 16, 200, 272, 4
sms = torch.cuda.get_device_properties(0).multi_processor_count
rois = rois_for(n, 512, h, w, stride, gen).cuda()
print(f"GPU: {torch.cuda.get_device_name()}, {sms} SMs\n")
print("| channels | blocks | waves | ms | ms a wave (whole waves) | ms a block-wave (fractional) |")
print("|---:|---:|---:|---:|---:|---:|")
for c in (240, 248, 256, 264, 272):
    x = torch.randn(n, c, h, w, generator=gen).cuda()
    ms = graph_ms(lambda: cupy_roi.roi_align(x, rois, (7, 7), 1.0 / stride, 2, True))
    waves = n * c / sms
    print(f"| {c} | {n * c} | {waves:.2f} | {ms:.3f} | {ms / -(-n * c // sms):.4f} | {ms / waves:.4f} |")
    del x
