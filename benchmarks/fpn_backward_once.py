"""One FPN box-head backward of ours (multi_scale.py's case, batch 2 unless
given), for Nsight Compute:

    ncu --metrics ... -k regex:multi_scale_roi_align_backward python benchmarks/fpn_backward_once.py [batch]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_scale import IMAGE, NAMES, boxes_for, pyramid  # noqa: E402

import cupy_roi  # noqa: E402

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 2
gen = torch.Generator().manual_seed(0)
x = pyramid(batch, 256, torch.float32, gen)
boxes = boxes_for(batch, 512, torch.float32, gen)
go = torch.randn(batch * 512, 256, 7, 7, generator=gen).cuda()
cupy_roi.MultiScaleRoIAlign(NAMES, 7, 2)(x, boxes, [IMAGE] * batch).backward(go)
torch.cuda.synchronize()
