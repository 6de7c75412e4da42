"""The README's "Train your own encoder" section runs as written (at a tiny size)."""
import re
from pathlib import Path

import pytest

pytest.importorskip("nilearn")

README = Path(__file__).resolve().parents[1] / "README.md"
SIZES = re.compile(r"^resolution, n_train, n_val, steps, n_directions = .*$", re.M)


def _training_block() -> str:
    text = README.read_text()
    start = text.index("## Train your own encoder")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else None]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the section has no python code block"
    return blocks[0]


def test_train_your_own_encoder_section_runs(tmp_path, monkeypatch, capsys):
    code = _training_block()
    assert len(SIZES.findall(code)) == 1, "the block must set its sizes on one line the test can shrink"
    code = SIZES.sub("resolution, n_train, n_val, steps, n_directions = 6, 4, 2, 3, 2", code)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert (tmp_path / "encoder.pt").exists()
    assert "best:" in out and "ToNNO" in out and "2D GradCAM" in out
