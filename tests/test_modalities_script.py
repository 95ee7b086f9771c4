"""docs/analysis/modalities.py: each modality's weight and health Hits@1 from a run folder's metrics.jsonl or a
record, on constructed evaluations (no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "analysis"))
import modalities  # noqa: E402  (docs/analysis is on the path only now)


def evaluation(epoch: int, hits1: float, graph_test: float) -> dict:
    """A metrics.jsonl line of a run with the graph and attribute text; relation BOW switched off."""
    return {"epoch": epoch, "loss": 1.0, "test": {"avg": {"hits@1": hits1, "mrr": hits1 + 0.1}},
            "health": {"weight": {"graph": 0.6, "attr_text": 0.4},
                       "hits1": {"test": {"graph": graph_test, "attr_text": 0.2, "fused": 0.7},
                                 "train": {"graph": 1.0, "attr_text": 0.5, "fused": 1.0}}}}


@pytest.fixture
def run_dirs(tmp_path):
    runs, records = tmp_path / "runs", tmp_path / "records"
    (runs / "a").mkdir(parents=True)
    lines = [{"epoch": 5, "loss": 2.0}, evaluation(10, 0.30, 0.41), evaluation(20, 0.35, 0.45)]
    (runs / "a" / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    records.mkdir()
    rec = {"epoch": 20, "test": {"avg": {"hits@1": 0.5, "mrr": 0.6}}, "weight": {"rel_bow": 1.0},
           "hits1": {"test": {"rel_bow": 0.1, "fused": 0.1}, "train": {"rel_bow": 0.9, "fused": 0.9}}}
    (records / "b.json").write_text(json.dumps({"source": "x", "results": {"x": 1}, "metrics": [rec]}))
    return ["--runs", str(runs), "--records", str(records)]


def rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| run")]


def test_the_last_evaluation_of_a_folder_and_of_a_record(run_dirs, capsys):
    assert modalities.main(["a", "b", *run_dirs]) == 0
    a, b = rows(capsys.readouterr().out)
    # columns: run, epoch, test H@1, graph, rel_bow, attr_text, fused
    assert a == ["a", "20", "0.3500", "0.60 / 0.450 / 1.000", "-", "0.40 / 0.200 / 0.500", "0.700 / 1.000"]
    assert b == ["b", "20", "0.5000", "-", "1.00 / 0.100 / 0.900", "-", "0.100 / 0.900"]


def test_a_curve_and_a_given_epoch(run_dirs, capsys):
    assert modalities.main(["a", "--curve", "10,20", *run_dirs]) == 0
    assert [(r[1], r[3]) for r in rows(capsys.readouterr().out)] == [("10", "0.60 / 0.410 / 1.000"),
                                                                    ("20", "0.60 / 0.450 / 1.000")]
    assert modalities.main(["a", "--epoch", "10", *run_dirs]) == 0
    assert rows(capsys.readouterr().out)[0][2] == "0.3000"


def test_bad_input_is_named(run_dirs, capsys):
    assert modalities.main(["a", "--epoch", "30", *run_dirs]) == 2
    assert "no evaluation at epoch 30; it has 10 to 20" in capsys.readouterr().err
    assert modalities.main(["nope", *run_dirs]) == 2
    assert "nope: neither" in capsys.readouterr().err
    assert modalities.main(["a", "b", "--curve", "10", *run_dirs]) == 2
    assert "--curve shows one run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        modalities.main(["a", "--epoch", "ten", *run_dirs])
