"""End to end: train.py on a small synthetic pair writes a complete run folder and learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import train
from data_process.synthetic import generate_pair

# Small enough for seconds on one CPU thread, large enough that chance Hits@1 (1/160) is tiny.
SMALL = dict(n1=260, n2=240, n_links=200, n_relations1=20, n_relations2=10, n_attributes1=12,
             n_attributes2=15, avg_degree1=10.0, avg_degree2=6.0, img_dim=32, text_dim=16,
             image_coverage=0.8, seed=3)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    return generate_pair(tmp_path_factory.mktemp("e2e") / "small", **SMALL)


@pytest.fixture(scope="module")
def finished_run(small_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = ["--file_dir", str(small_pair), "--rate", "0.2", "--epochs", "40", "--check_point", "10",
            "--hidden_units", "64,64,64", "--out_dir", str(out), "--run_name", "e2e", "--save_every", "20",
            "--device", "cpu", "--val_ratio", "0.25"]
    assert train.cli(argv) == 0
    return out / "e2e"


def test_run_folder_is_complete(finished_run):
    for name in ("config.json", "log.txt", "metrics.jsonl", "checkpoint.pt", "entity_embeddings.npy",
                 "modality_weights.npy", "expert_gates.npz", "predictions.tsv", "results.json"):
        assert (finished_run / name).is_file(), name
    res = json.loads((finished_run / "results.json").read_text())
    assert res["last_epoch"]["epoch"] == 40
    assert res["best_valid_epoch"] is not None and "valid" in res["best_valid_epoch"]
    assert "TEST" in res["best_test_epoch"]["note"]
    assert res["config"]["rate"] == 0.2
    history = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 10, 20, 30, 40]  # 0: the untrained model


def test_learns_far_above_chance(finished_run):
    res = json.loads((finished_run / "results.json").read_text())
    test_pairs = res["pairs"]["test"]
    chance = 1.0 / test_pairs
    assert res["last_epoch"]["test"]["avg"]["hits@1"] > 20 * chance


def test_predictions_carry_names_and_match_metrics(finished_run, small_pair):
    lines = (finished_run / "predictions.tsv").read_text().splitlines()
    header, rows = lines[0].split("\t"), [r.split("\t") for r in lines[1:]]
    assert header[:4] == ["left_id", "left_name", "pred_right_id", "pred_right_name"]
    names = dict(line.split("\t", 1) for line in (small_pair / "ent_ids_1").read_text().splitlines())
    assert all(names[r[0]] == r[1] for r in rows)
    res = json.loads((finished_run / "results.json").read_text())
    l2r = res["last_epoch"]["test_directions"]["l2r"]
    assert np.mean([r[7] == "1" for r in rows]) == pytest.approx(l2r["hits@1"])


def test_outputs_have_the_right_shapes(finished_run, small_pair):
    n = SMALL["n1"] + SMALL["n2"]
    emb = np.load(finished_run / "entity_embeddings.npy")
    weights = np.load(finished_run / "modality_weights.npy")
    gates = np.load(finished_run / "expert_gates.npz")
    assert emb.shape == (n, 6 * 64)
    assert weights.shape == (n, 6) and np.allclose(weights.sum(1), 1.0, atol=1e-5)
    assert list(gates["modalities"]) == ["graph", "image", "rel_bow", "rel_text", "attr_bow", "attr_text"]
    assert gates["image"].shape == (n, 5)


def test_checkpoint_reloads_for_evaluation(finished_run, capsys):
    res = train.main(*train.parse_args(["--resume", str(finished_run), "--eval_only", "--device", "cpu"]))
    saved = json.loads((finished_run / "results.json").read_text())["last_epoch"]["test"]["avg"]
    assert res["avg"]["hits@1"] == pytest.approx(saved["hits@1"], abs=1e-6)
    assert res["avg"]["mrr"] == pytest.approx(saved["mrr"], abs=1e-6)
    ckpt = torch.load(finished_run / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 40
