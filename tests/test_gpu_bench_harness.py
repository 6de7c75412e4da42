"""benchmarks/gpu/bench.py, run on tiny CPU problems: the harness a GPU session runs in one call must not be found
broken only then (its numbers here mean nothing)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
import bench  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:tonno_fast. compiled CPU kernels unavailable")


def test_forward_and_both_adjoint_modes_on_the_cpu(capsys, tmp_path):
    md = tmp_path / "gpu.md"
    assert bench.main(["--device", "cpu", "--scale", "0.125", "--quick", "--backward", "--ops",
                       "backproject,slice_volume", "--budget-s", "0.2", "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    text = md.read_text()
    for row in ("| backproject |", "| backproject (backward) |", "| backproject (backward, deterministic) |",
                "| slice_volume (backward, deterministic) |"):
        assert row in text, (row, out)
    assert "failed" not in out, out


def test_dry_run_lists_the_problems(capsys):
    assert bench.main(["--dry-run"]) == 0
    assert "slice_volume" in capsys.readouterr().out
