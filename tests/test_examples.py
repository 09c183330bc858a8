"""The examples run: on the CPU everywhere, and on the GPU where there is one (marked cuda)."""
import os
import pathlib
import runpy
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_psroialign_example(capsys):
    runpy.run_path(str(EXAMPLES / "example.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "output (5, 10, 7, 7)" in out and "ran on:" in out


def test_prroi_refinement_moves_box_onto_target():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import prroi_refine
    finally:
        sys.path.pop(0)
    before, after = prroi_refine.main(steps=100, verbose=False)
    assert before < 0.5 and after > 0.95


def run_ddp_example(nproc, *args, timeout=300, **env_vars):
    """examples/ddp_train.py under torchrun; returns its output (rank 0 prints)."""
    import os
    import subprocess

    env = dict(os.environ, NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="1", **env_vars)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(EXAMPLES / "ddp_train.py"), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    return out


def test_ddp_example_two_ranks_on_cpu():
    out = run_ddp_example(2, "--cpu", "--steps", "30")
    assert "world size 2, backend gloo" in out
    assert "gradients: largest difference between ranks 0; weights: 0" in out and "\nOK" in out


@pytest.mark.cuda
def test_ddp_example_one_process_per_gpu():
    import torch

    n = torch.cuda.device_count()
    out = run_ddp_example(n, "--steps", "40")
    assert f"world size {n}, backend nccl" in out
    assert all(f"rank {r}: device cuda:{r}" in out for r in range(n))
    assert "gradients: largest difference between ranks 0; weights: 0" in out and "\nOK" in out


@pytest.mark.cuda
def test_ddp_example_two_ranks_share_one_gpu():
    """Two processes on one GPU (gloo): where a second GPU is missing, this is
    the nearest check of two ranks' gradients through the CUDA kernels."""
    out = run_ddp_example(2, "--steps", "40", CUDA_VISIBLE_DEVICES="0")
    assert "world size 2, backend gloo" in out and "rank 1: device cuda:0" in out
    assert "gradients: largest difference between ranks 0; weights: 0" in out and "\nOK" in out


def test_fpn_and_rotated_example(capsys):
    runpy.run_path(str(EXAMPLES / "fpn_and_rotated.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "FPN pooled (3, 16, 7, 7) scales [0.25, 0.125, 0.0625, 0.03125]" in out
    assert "detectron2 convention, same result: True" in out and "ran on:" in out


def _needs(module):
    """The notebook extra's modules: CI installs it, so a missing one fails
    there; elsewhere the notebook test is skipped."""
    try:
        return __import__(module)
    except ImportError:
        message = f"{module} not installed: pip install '.[notebook]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_tour_notebook_runs(monkeypatch):
    """examples/tour.ipynb runs top to bottom in a fresh kernel on this
    checkout's code; its cells assert what they draw (RoIAlign's sampling
    points, PSRoIAlign's channel map, PrRoIPool's continuity and box gradient,
    the refined box's IoU)."""
    nbformat, nbclient = _needs("nbformat"), _needs("nbclient")
    _needs("matplotlib"), _needs("ipykernel")
    root = str(EXAMPLES.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("CUPY_ROI_TOUR_FIGURES", raising=False)
    nb = nbformat.read(str(EXAMPLES / "tour.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "IoU with the yellow bar" in text and "NumPy in -> ndarray (3, 3, 7, 7)" in text
    assert sum(o.output_type == "display_data" for o in outputs) == 5  # the five figures
