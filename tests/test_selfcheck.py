"""``python -m cupy_roi`` (the self-check) and the errors that say what to
install when a GPU piece is missing."""
import subprocess
import sys

import pytest
import torch

import cupy_roi
from cupy_roi import __main__ as selfcheck
from cupy_roi import _gpu, _kernels


def test_selfcheck_runs_and_passes():
    res = subprocess.run([sys.executable, "-m", "cupy_roi", "--no-timing"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all operators agree with the reference" in res.stdout
    assert f"torch {torch.__version__}" in res.stdout
    assert res.stdout.count(": ok (relative error") == len(selfcheck.OPERATORS)


def test_selfcheck_fails_on_a_broken_operator(monkeypatch, capsys):
    call, family, ps = selfcheck.OPERATORS["ps_roi_align"]
    monkeypatch.setitem(selfcheck.OPERATORS, "ps_roi_align", (lambda x, r: call(x, r) * 1.001, family, ps))
    assert selfcheck.main(["--no-timing"]) == 1
    out = capsys.readouterr().out
    assert "ps_roi_align on" in out and "MISMATCH" in out and "FAILED: ps_roi_align" in out


@pytest.fixture
def without_cupy(monkeypatch):
    """CuPy hidden from the import system, and nothing compiled yet."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(_gpu, "_cupy", [])
    monkeypatch.setattr(_kernels, "_functions", {})


def test_missing_cupy_names_the_package(without_cupy):
    with pytest.raises(_gpu.GPUSupportError, match=r"pip install cupy-cuda1[23]x"):
        _gpu.import_cupy()


def test_import_does_not_import_cupy():
    code = "import sys, cupy_roi; print('cupy' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "False", res.stdout + res.stderr


@pytest.mark.cuda
def test_cuda_tensor_without_cupy_says_what_to_install(without_cupy):
    major = int(torch.version.cuda.split(".")[0])
    x = torch.randn(1, 4, 6, 6, device="cuda")
    r = torch.tensor([[0, 0, 0, 4, 4.]], device="cuda")
    with pytest.raises(_gpu.GPUSupportError, match=f"cupy-cuda{major}x"):
        cupy_roi.roi_align(x, r, 2)


@pytest.mark.cuda
def test_kernel_that_does_not_compile_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_kernels, "_functions", {})
    monkeypatch.setattr(_kernels, "source", lambda family: "this is not CUDA C")
    x = torch.randn(1, 4, 6, 6, device="cuda")
    r = torch.tensor([[0, 0, 0, 4, 4.]], device="cuda")
    with pytest.raises(_gpu.GPUSupportError, match="could not compile or load its roi_align kernels"):
        cupy_roi.roi_align(x, r, 2)
