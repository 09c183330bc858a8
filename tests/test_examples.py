"""The examples run (on the CPU here; test_cuda runs example.py on the GPU)."""
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
