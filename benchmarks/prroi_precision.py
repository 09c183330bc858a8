"""PrRoIPool in float32 against float64, bins from a thousandth of a pixel to
the whole map: cupy_roi's kernels next to the original implementation's
formulation (each grid point's weight as a difference of two tent integrals,
as PreciseRoIPooling computes it), evaluated in float32 by this package's
reference path, which uses that formulation. Same float32-rounded inputs for
all; relative L2 error of the forward, the feature gradient and the box
gradient. Prints a Markdown table."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cupy_roi  # noqa: E402
from cupy_roi import _reference  # noqa: E402
from tests.cases import rel_err, thin_bin_rois  # noqa: E402


def run(kind, x, r, go, size, scale):
    xt = x.clone().requires_grad_(True)
    rt = r.clone().requires_grad_(True)
    if kind == "kernel":
        out = cupy_roi.prroi_pool2d(xt, rt, *size, scale)
    else:  # the reference path in the input's dtype: the original's formulation
        out = _reference.prroi_pool(xt, rt, size, scale, False)
    out.backward(go.to(out.device, out.dtype))
    return out.detach().cpu(), xt.grad.cpu(), rt.grad.cpu()[:, 1:]


def main():
    g = np.random.default_rng(0)
    n, c, h, w, ph, pw, scale, k = 2, 16, 64, 72, 3, 3, 0.5, 200
    lines = ["| bin width (px) | pass | original's formulation, float32 | cupy_roi kernel, float32 |",
             "|---|---|---:|---:|"]
    for bin_px in (1e-3, 1e-2, 1e-1, 1.0, "map"):
        x = torch.tensor(g.standard_normal((n, c, h, w)), dtype=torch.float32, device="cuda")
        r = torch.tensor(thin_bin_rois(g, k, n, h, w, ph, pw, scale, bin_px), dtype=torch.float32, device="cuda")
        go = torch.tensor(g.standard_normal((k, c, ph, pw)), dtype=torch.float32)
        want = run("reference", x.double().cpu(), r.double().cpu(), go, (ph, pw), scale)
        ours = run("kernel", x, r, go, (ph, pw), scale)
        original = run("reference", x, r, go, (ph, pw), scale)
        for i, label in enumerate(("forward", "feature gradient", "box gradient")):
            lines.append(f"| {bin_px} | {label} | {rel_err(original[i], want[i]):.1e} | {rel_err(ours[i], want[i]):.1e} |")
    print(f"GPU: {torch.cuda.get_device_name()}; {n}x{c}x{h}x{w}, {k} RoIs, {ph}x{pw} bins, relative L2 error "
          "against float64 on the same float32 inputs\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
