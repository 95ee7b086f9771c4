"""docs/analysis/calibration_search.py: the factors each search chooses at a --val_ratio checkpoint, against the
best of the whole grid. CPU, the tiny synthetic pair, seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_iterative import IL_SMALL

import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "analysis"))
import calibration_search  # noqa: E402  (docs/analysis is on the path only now)


def test_the_second_version_stops_where_steepest_ascent_goes_on():
    """The local optimum of docs/accuracy.md in small: the first rise (modality 0 to 0) blocks the better
    change (modality 1 to 2), which steepest ascent takes."""
    table = {(1.0, 1.0): 0.0, (0.0, 1.0): 1.0, (1.0, 2.0): 2.0, (1.0, 4.0): 1.5, (0.0, 2.0): 0.5}
    score = calibration_search.counted(lambda f: table.get(tuple(f), -1.0))
    factors, best = calibration_search.coordinate_ascent(score, 2)
    np.testing.assert_array_equal(factors, [0.0, 1.0])
    assert best == 1.0 and score.calls > 1
    np.testing.assert_array_equal(train.fit_factors(score, 2)[0], [1.0, 2.0])


def test_the_script_lists_each_search_and_the_grid_s_best(tiny_synthetic, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "CALIBRATION_GRID", (0.0, 1.0, 2.0))  # 3^M - 1 vectors: seconds
    argv = ["--file_dir", str(tiny_synthetic), *IL_SMALL, "--out_dir", str(tmp_path), "--epochs", "4"]
    res = train.main(*train.parse_args([*argv, "--run_name", "cal", "--val_ratio", "0.3", "--calibrate_weights"]))
    ckpt = tmp_path / "cal" / "checkpoint.pt"
    given = "/".join(["1"] * (len(res["modalities"]) - 1) + ["2"])
    assert calibration_search.main([str(ckpt), "--top", "2", "--factors", given]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| factors")]
    assert [r.split(":")[0] for r in rows] == ["| coordinate ascent (second version)",
                                               "| steepest ascent (train.fit_factors)", "| grid, best 1",
                                               "| grid, best 2", "| given"]
    valid = [float(r.split("|")[2]) for r in rows]
    assert valid[2] >= max(valid[0], valid[1]) and valid[2] >= valid[3]  # no search beats the whole grid
    # a checkpoint without validation links, and a bad --factors, are refused with a message
    train.main(*train.parse_args([*argv, "--run_name", "plain"]))
    assert calibration_search.main([str(tmp_path / "plain" / "checkpoint.pt")]) == 2
    assert calibration_search.main([str(ckpt), "--factors", "1/2"]) == 2
    err = capsys.readouterr().err
    assert "has no validation links" in err and "expected" in err
    with pytest.raises(SystemExit):
        calibration_search.main([str(ckpt), "--top", "x"])
