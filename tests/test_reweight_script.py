"""docs/analysis/reweight.py: a finished run's test metrics under other modality weightings of the same
unimodal embeddings. CPU, the tiny synthetic pair, a few seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_iterative import IL_SMALL

import train
from loss import contrastive_alignment_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "analysis"))
import reweight  # noqa: E402  (docs/analysis is on the path only now)


def test_the_reweighting_script_rebuilds_the_runs_own_numbers(tiny_synthetic, tmp_path):
    """docs/analysis/reweight.py recovers each unimodal embedding from the fused one and the weights; with
    the learned weights it ranks the test pairs exactly as the run's last evaluation did, and a weighting
    that names an unknown modality is refused."""
    argv = ["--file_dir", str(tiny_synthetic), *IL_SMALL, "--out_dir", str(tmp_path), "--run_name", "plain"]
    res = train.main(*train.parse_args([*argv, "--epochs", "6"]))
    run = reweight.load_run(tmp_path / "plain")
    assert len(run["pairs"]) == res["pairs"]["test"]
    learned = reweight.score(run, run["weights"])
    for key in ("hits@1", "hits@10", "mrr"):
        assert learned[key] == pytest.approx(res["last_epoch"]["test"]["avg"][key], abs=1e-6)
    assert reweight.score(run, np.ones(len(run["modalities"])))["mrr"] != pytest.approx(learned["mrr"], abs=1e-6)
    # The run's final checkpoint, embedded again, gives the same unimodal embeddings and numbers.
    again = reweight.load_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    assert again["modalities"] == run["modalities"]
    assert np.array_equal(np.sort(again["pairs"], 0), np.sort(run["pairs"], 0))
    np.testing.assert_allclose(again["unimodal"][run["present"]], run["unimodal"][run["present"]], atol=1e-5)
    assert reweight.score(again, again["weights"])["mrr"] == pytest.approx(learned["mrr"], abs=1e-6)
    with pytest.raises(train.DataError, match="no such checkpoint file"):
        reweight.load_checkpoint(tmp_path / "plain" / "nothing.pt")
    with pytest.raises(train.DataError, match="'sound' is not one of the run's modalities"):
        reweight.parse_mix("graph=0.5,sound=0.5", run["modalities"])


def test_a_router_holdout_checkpoint_adds_its_held_out_pairs(tiny_synthetic, tmp_path, capsys):
    """For a --router_holdout run the script also ranks the held-out seed pairs, among themselves and with
    the test entities as distractors (more candidates: never an easier Hits@1)."""
    argv = ["--file_dir", str(tiny_synthetic), *IL_SMALL, "--out_dir", str(tmp_path), "--run_name", "held"]
    train.main(*train.parse_args([*argv, "--epochs", "4", "--router_holdout", "0.25"]))
    ckpt = tmp_path / "held" / "checkpoint.pt"
    run = reweight.load_checkpoint(ckpt)
    held = run["held_out"]
    res = json.loads((tmp_path / "held" / "results.json").read_text())
    assert len(held) == res["pairs"]["router_holdout"] == 3  # a quarter of the 12 seed pairs
    assert not set(held[:, 0]) & set(run["pairs"][:, 0])  # seed pairs, not test ones
    alone = reweight.score(run, run["weights"], held)
    among = reweight.score(run, run["weights"], held, distractors=True)
    assert among["mrr"] <= alone["mrr"] + 1e-9
    assert reweight.main([str(ckpt), "--loss_tau", "0.1,0.05"]) == 0
    out = capsys.readouterr().out
    assert "| 3 held-out pairs among themselves, Hits@1 |" in out and "their L_f^CL at tau 0.05 |" in out
    assert out.count("|") > 8 * len(reweight.weightings(run, []))
    # the loss is Eq. 13 on those pairs, the fused rows rebuilt from the learned weights
    w = run["weights"] / run["weights"].sum(1, keepdims=True)
    f = [torch.as_tensor((run["unimodal"][held[:, i]] * w[held[:, i], :, None]).reshape(len(held), -1))
         for i in (0, 1)]
    eq13 = float(contrastive_alignment_loss(f[0], f[1], 0.05))
    assert reweight.held_out_loss(run, run["weights"], 0.05) == pytest.approx(eq13, rel=1e-5)
    assert reweight.held_out_loss(run, run["weights"], 0.1) != pytest.approx(eq13, rel=1e-3)
    assert reweight.main([str(tmp_path / "held" / "checkpoint.pt"), "--loss_tau", "x"]) == 2


def test_fit_chooses_factors_on_held_links_that_never_rank_them_worse(tiny_synthetic, tmp_path, capsys):
    """--fit N: the factors fitted on N test links (standing in for validation links) rank those links at
    least as well as the learned weights do; each draw is judged on the other links; a bad N is refused."""
    argv = ["--file_dir", str(tiny_synthetic), *IL_SMALL, "--out_dir", str(tmp_path), "--run_name", "plain"]
    train.main(*train.parse_args([*argv, "--epochs", "6"]))
    run = reweight.load_run(tmp_path / "plain")
    held, rest = run["pairs"][:8], run["pairs"][8:]
    extra = (rest[:, 0], rest[:, 1])
    factors = reweight.fit_factors(run, held, extra)
    fitted = reweight.score(run, run["weights"] * factors, held, extra=extra)["mrr"]
    assert fitted >= reweight.score(run, run["weights"], held, extra=extra)["mrr"]
    for distractors in (True, False):
        draws = reweight.fit_draws(run, 8, 2, distractors=distractors)
        assert len(draws) == 2 and all(len(d["factors"]) == len(run["modalities"]) for d in draws)
    assert reweight.main([str(tmp_path / "plain"), "--fit", "8", "--draws", "2", "--no-distractors"]) == 0
    assert "fitted minus learned, Hits@1: mean" in capsys.readouterr().out
    assert reweight.main([str(tmp_path / "plain"), "--fit", str(len(run["pairs"]))]) == 2


def test_mutual_share_is_the_label_free_calibrations_criterion(tiny_synthetic, tmp_path, capsys):
    """--mutual: under the run's own weights the share of mutual nearest neighbours among the entities in no
    training pair equals the one --calibrate_unlabelled logged for them, and under its fitted factors the
    one it reached; the column is printed for every weighting."""
    argv = ["--file_dir", str(tiny_synthetic), *IL_SMALL, "--out_dir", str(tmp_path), "--run_name", "plain"]
    res = train.main(*train.parse_args([*argv, "--epochs", "6"]))
    cal = res["last_epoch"]["calibrated_unlabelled"]
    run = reweight.load_run(tmp_path / "plain")
    left, right = reweight.unaligned(tmp_path / "plain")
    for side, again in zip((left, right), reweight.load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["unaligned"]):
        assert np.array_equal(side, again)  # a checkpoint given instead of the folder: the same entities
    assert reweight.mutual_share(run, run["weights"], left, right) == pytest.approx(cal["mutual_share_learned"])
    factors = np.array([cal["factors"][m] for m in run["modalities"]])
    assert reweight.mutual_share(run, run["weights"] * factors, left, right) == pytest.approx(cal["mutual_share"])
    assert reweight.main([str(tmp_path / "plain"), "--mutual"]) == 0
    out = capsys.readouterr().out
    assert "| weighting | test Hits@1 | MRR | mutual share |" in out
    assert sum(line.count("|") == 5 for line in out.splitlines()) == len(reweight.weightings(run, [])) + 2
