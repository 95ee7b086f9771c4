"""docs/analysis/first_step.py: the per-parameter gradients of a new run's first steps add up to the
logged gradient norm, and the official design's zero rows show as inf second moments."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
from test_reliability import SMALL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "analysis"))
import first_step  # noqa: E402


def _without_attributes(src: Path, dst: Path, lines: int) -> Path:
    """A copy of the dataset in which the first ``lines`` entities of training_attrs_1 (the source
    of the attribute bag-of-words) have no attributes."""
    shutil.copytree(src, dst)
    rows = (src / "training_attrs_1").read_text().splitlines()
    (dst / "training_attrs_1").write_text("".join(r + "\n" for r in rows[lines:]))
    return dst


def test_first_steps_add_up_and_find_the_official_overflow(tiny_synthetic, tmp_path, capsys):
    data = _without_attributes(tiny_synthetic, tmp_path / "data", 20)
    base = ["--file_dir", str(data), *SMALL]
    paper = first_step.first_steps(base, 2)
    assert [r["epoch"] for r in paper] == [1, 2]
    for rec in paper:  # the global norm is the L2 norm of the parts' norms
        assert rec["grad_norm"] == pytest.approx(math.sqrt(sum(g * g for g in rec["grad"].values())), rel=1e-6)
        assert rec["inf_second_moment"] == {}  # the paper's FFN experts keep every output off zero
    official = first_step.first_steps([*base, "--preset", "official", "--no-curriculum"], 1)[0]
    frozen = official["inf_second_moment"]
    assert frozen
    assert all(name.endswith(".center") for name in frozen)  # the linear experts' c_k, nothing else
    assert all(0 < frozen[n] <= official["entries"][n] for n in frozen)
    assert first_step.main(["--steps", "1", "--", *base]) == 0
    assert '"epoch": 1' in capsys.readouterr().out
