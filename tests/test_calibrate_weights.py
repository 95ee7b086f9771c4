"""--calibrate_weights: one factor per modality on the router's weights, fitted to the validation links at
every evaluation (docs/accuracy.md, "Calibrating the weights on validation links"). CPU, seconds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_iterative import IL_SMALL

import train
from layers import calibrated_weights
from model import Embeddings


def test_calibrated_weights_scale_each_modality_and_renormalise_per_entity():
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0], [0.0, 1.0, 0.0]])
    out = calibrated_weights(weights, torch.tensor([2.0, 0.0, 1.0]))
    # by hand: (1.0, 0, 0.2) / 1.2; (1.2, 0, 0) / 1.2; the third has only the modality set to 0: it keeps its own
    expected = torch.tensor([[1.0 / 1.2, 0.0, 0.2 / 1.2], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(calibrated_weights(weights, torch.ones(3)), weights)


def test_the_fit_finds_the_best_factors_on_the_grid_and_never_moves_on_a_tie():
    target = np.array([0.0, 2.0, 1.0, 4.0])
    calls = []

    def score(f):
        calls.append(f.copy())
        return -float(((f - target) ** 2).sum())

    factors, best, learned = train.fit_factors(score, 4)
    np.testing.assert_array_equal(factors, target)
    assert best == 0.0
    assert learned == -float(((np.ones(4) - target) ** 2).sum())
    np.testing.assert_array_equal(calls[0], np.ones(4))  # it starts from the learned weights
    # A score that no factor changes keeps the learned weights: a change must raise the score.
    factors, _, _ = train.fit_factors(lambda f: 0.5, 4)
    np.testing.assert_array_equal(factors, np.ones(4))
    # All factors zero is never tried (no fused embedding would be left).
    seen = []
    train.fit_factors(lambda f: seen.append(f.copy()) or -float(f.sum()), 2)
    assert all(f.any() for f in seen)


def test_each_step_takes_the_best_change_not_the_first_that_helps():
    """The search's failure in the FB15K-YAGO15K split run (docs/accuracy.md): a change of the first modality
    helps a little and blocks the better change of the second. Taking the first rise stops at (0, 1); the best
    single change at each step reaches (1, 2)."""
    table = {(1.0, 1.0): 0.0, (0.0, 1.0): 1.0, (1.0, 2.0): 2.0, (1.0, 4.0): 1.5, (0.0, 2.0): 0.5}
    factors, best, learned = train.fit_factors(lambda f: table.get(tuple(f), -1.0), 2)
    np.testing.assert_array_equal(factors, [1.0, 2.0])
    assert (best, learned) == (2.0, 0.0)


def _random_embeddings(n: int, dims=(8, 5, 6), seed=0):
    """Unit-norm unimodal rows for entities 0..n-1 and router weights with some modalities absent (0)."""
    g = torch.Generator().manual_seed(seed)
    unimodal = [torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1) for d in dims]
    weights = torch.rand(n, len(dims), generator=g) * (torch.rand(n, len(dims), generator=g) > 0.2)
    weights[0] = torch.tensor([0.0, 1.0, 0.0])  # only the second modality: factor 0 there falls back
    weights[weights.sum(1) == 0, 0] = 1.0
    return unimodal, weights / weights.sum(1, keepdim=True)


@pytest.mark.parametrize("csls", [True, False])
def test_the_objective_is_the_mrr_of_the_calibrated_fused_embeddings(csls):
    """factor_objective ranks from per-modality dot products; it must give what ranking the calibrated fused
    embeddings gives (train.alignment_metrics), for the learned weights, zeros, and the all-but-one fallback."""
    n = 100  # entities 90..99 are in no pair and no candidate set
    unimodal, weights = _random_embeddings(n)
    pairs = np.stack([np.arange(0, 20), np.arange(40, 60)], axis=1)
    pairs[0] = [0, 40]
    extra = (np.arange(20, 40), np.arange(60, 90))
    cfg = SimpleNamespace(csls=csls, csls_k=3, eval_chunk=7)
    score = train.factor_objective(unimodal, weights, pairs, cfg, extra=extra)
    for factors in ([1.0, 1.0, 1.0], [2.0, 0.5, 4.0], [0.0, 1.0, 2.0], [4.0, 0.0, 0.0], [0.0, 0.0, 1.0]):
        w = calibrated_weights(weights, torch.tensor(factors))
        fused = torch.cat([w[:, i:i + 1] * u for i, u in enumerate(unimodal)], dim=-1)
        expected = train.alignment_metrics(fused, pairs, cfg, extra_candidates=extra)["avg"]["mrr"]
        assert score(np.array(factors)) == pytest.approx(expected, abs=1e-9)
    # rows given for the entities ``ids`` only, as calibrated_evaluation embeds them: the same numbers
    ids = np.arange(90)
    sub_score = train.factor_objective([u[ids] for u in unimodal], weights[ids], pairs, cfg, ids=ids, extra=extra)
    assert sub_score(np.array([2.0, 0.5, 4.0])) == score(np.array([2.0, 0.5, 4.0]))


class _TwoModalities:
    """A stand-in model: modality "clean" puts each link's two entities on the same unit vector, "noise" gives
    every entity its own random one; the router gives noise 0.9 of the weight."""

    modalities = ("clean", "noise")

    def __init__(self, links: np.ndarray, num_entities: int, dim: int = 64):
        g = torch.Generator().manual_seed(0)
        clean = torch.nn.functional.normalize(torch.randn(num_entities, dim, generator=g), dim=-1)
        clean[torch.as_tensor(links[:, 1])] = clean[torch.as_tensor(links[:, 0])]
        self.u = {"clean": clean,
                  "noise": torch.nn.functional.normalize(torch.randn(num_entities, dim, generator=g), dim=-1)}

    def embed(self, ids, inputs):
        ids = torch.as_tensor(ids)
        unimodal = {m: u[ids] for m, u in self.u.items()}
        weights = torch.tensor([0.1, 0.9]).expand(len(ids), 2)
        fused = torch.cat([weights[:, :1] * unimodal["clean"], weights[:, 1:] * unimodal["noise"]], dim=-1)
        return Embeddings(unimodal, {}, {}, weights, fused)


def test_calibration_takes_the_weight_from_a_modality_that_does_not_align():
    links = np.stack([np.arange(0, 120), np.arange(120, 240)], axis=1)
    valid, test = links[:20], links[20:]
    model = _TwoModalities(links, 240)
    cfg = SimpleNamespace(csls=True, csls_k=3, eval_chunk=4096, seed=0)
    raw = train.alignment_metrics(model.embed(np.unique(test), None).fused, test, cfg, ids=np.unique(test))
    heldout, out = train.calibrated_evaluation(model, None, valid, test, cfg)
    everyone = np.unique(links)
    assert heldout == train.alignment_metrics(model.embed(everyone, None).fused, valid, cfg, ids=everyone,
                                              extra_candidates=(test[:, 0], test[:, 1]))
    assert out["distractors"] == 100  # every test entity of a side: fewer than CALIBRATION_DISTRACTORS
    assert out["factors"]["noise"] < 1.0 or out["factors"]["clean"] > 1.0
    assert out["valid_mrr"] > out["valid_mrr_learned"]
    assert out["test"]["avg"]["hits@1"] > raw["avg"]["hits@1"] + 0.1
    assert out["test"]["avg"]["hits@1"] == pytest.approx(1.0)


def test_a_run_with_calibrate_weights_records_the_calibrated_test_at_every_evaluation(tiny_synthetic, tmp_path,
                                                                                     capsys):
    argv = ["--file_dir", str(tiny_synthetic), *IL_SMALL, "--out_dir", str(tmp_path), "--epochs", "4",
            "--val_ratio", "0.3"]
    plain = train.main(*train.parse_args([*argv, "--run_name", "plain"]))
    res = train.main(*train.parse_args([*argv, "--run_name", "cal", "--calibrate_weights"]))
    history = [json.loads(line) for line in (tmp_path / "cal" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [h for h in history if "test" in h]
    assert evaluations and all("calibrated" in h for h in evaluations)
    for h in evaluations:
        c = h["calibrated"]
        assert set(c["factors"]) == set(res["modalities"])
        assert c["valid_mrr"] >= c["valid_mrr_learned"]
        if all(f == 1.0 for f in c["factors"].values()):
            assert c["test"]["avg"]["mrr"] == pytest.approx(h["test"]["avg"]["mrr"], abs=1e-6)
    # the calibration changes nothing in the training, and its embedding gives the same held-out validation
    # ranking as evaluate(distractors=test): the numbers of the run without it
    assert res["last_epoch"]["test"] == plain["last_epoch"]["test"]
    assert res["last_epoch"]["valid_heldout"] == plain["last_epoch"]["valid_heldout"]
    assert res["last_epoch"]["calibrated"] == train.rounded(evaluations[-1]["calibrated"])
    best = max(evaluations, key=lambda h: (h["calibrated"]["valid_mrr"], -h["epoch"]))
    assert res["best_calibrated_valid_epoch"]["epoch"] == best["epoch"]
    assert "last epoch, calibrated" in train.format_results(res)
    # --eval_only fits the factors again at the final checkpoint (with this version's search): the last record's
    again = train.main(*train.parse_args(["--resume", str(tmp_path / "cal"), "--eval_only"]))
    assert again["calibrated"]["factors"] == evaluations[-1]["calibrated"]["factors"]
    assert again["calibrated"]["test"]["avg"] == pytest.approx(evaluations[-1]["calibrated"]["test"]["avg"])
    assert "test, calibrated" in capsys.readouterr().out


def test_the_fit_s_distractors_are_a_fixed_sample_of_each_side_of_the_test_entities(monkeypatch):
    test = np.stack([np.arange(0, 50), np.arange(100, 150)], axis=1)
    monkeypatch.setattr(train, "CALIBRATION_DISTRACTORS", 20)
    left, right = train.calibration_distractors(test, seed=7)
    assert len(left) == len(right) == 20 and set(left) <= set(test[:, 0]) and set(right) <= set(test[:, 1])
    again = train.calibration_distractors(test, seed=7)
    assert np.array_equal(left, again[0]) and np.array_equal(right, again[1])  # the same at every evaluation
    other = train.calibration_distractors(test, seed=8)
    assert not np.array_equal(left, other[0])
    # the sides are drawn apart: a left entity's gold counterpart is not forced into the sample
    assert set(right - 100) != set(left)


def test_calibrate_weights_needs_a_validation_split(tiny_synthetic, tmp_path):
    with pytest.raises(train.DataError, match="--calibrate_weights fits the modality weights to the validation"):
        train.main(*train.parse_args(["--file_dir", str(tiny_synthetic), *IL_SMALL, "--epochs", "2",
                                      "--out_dir", str(tmp_path), "--calibrate_weights"]))


def test_pseudo_labels_under_the_calibrated_weights_take_the_modality_that_aligns():
    """--il_weights calibrated: the mutual nearest neighbours of the calibrated fused embeddings. With the
    noise modality's factor at 0 every remaining link of the clean modality is found; under the router's
    weights (0.9 on noise) fewer are."""
    links = np.stack([np.arange(0, 120), np.arange(120, 240)], axis=1)
    model = _TwoModalities(links, 240)
    data = SimpleNamespace(num_entities=240, kg=np.repeat([0, 1], 120), modalities=model.modalities)
    cfg = SimpleNamespace(csls_k=3, eval_chunk=64)
    seeds = links[:20]
    router, _ = train.pseudo_label_candidates(model, None, data, seeds, cfg)
    ones, _ = train.pseudo_label_candidates(model, None, data, seeds, cfg, np.ones(2))
    calibrated, _ = train.pseudo_label_candidates(model, None, data, seeds, cfg, np.array([1.0, 0.0]))
    assert np.array_equal(ones, router)  # factors of one change nothing
    right = {tuple(p) for p in links[20:]}
    assert {tuple(p) for p in calibrated} == right
    assert len({tuple(p) for p in router} & right) < len(right)


def test_an_iterative_run_labels_with_the_last_evaluation_s_factors(tiny_synthetic, tmp_path):
    argv = ["--file_dir", str(tiny_synthetic), *IL_SMALL, "--out_dir", str(tmp_path), "--epochs", "4",
            "--val_ratio", "0.3", "--calibrate_weights", "--il", "--il_epochs", "4", "--il_step", "2"]
    train.main(*train.parse_args([*argv, "--run_name", "cal_il", "--il_weights", "calibrated"]))
    history = [json.loads(line) for line in (tmp_path / "cal_il" / "metrics.jsonl").read_text().splitlines()]
    ckpt = train.read_checkpoint(tmp_path / "cal_il" / "checkpoint.pt")
    steps = ckpt["pseudo_steps"]
    assert steps
    for step in steps:  # each step: the factors of the last evaluation before it (the step comes first)
        last = [h for h in history if "calibrated" in h and h["epoch"] < step["epoch"]][-1]
        assert step["factors"] == last["calibrated"]["factors"]
    assert "pseudo_factors=" in (tmp_path / "cal_il" / "log.txt").read_text()
    with pytest.raises(train.DataError, match="--il_weights calibrated labels with the factors"):
        train.main(*train.parse_args(["--file_dir", str(tiny_synthetic), *IL_SMALL, "--epochs", "2", "--il",
                                      "--out_dir", str(tmp_path), "--il_weights", "calibrated"]))
