"""--calibrate_unlabelled (on by default): at the end of a run, one factor per modality on the router's weights,
fitted to the share of mutual CSLS nearest neighbours among the entities in no training pair; no link is read
(docs/accuracy.md, "Calibrating the weights without labels"). CPU, seconds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from test_calibrate_weights import _TwoModalities
from test_iterative import IL_SMALL

import train

# 120 links (left 0..119, right 120..239), 24 of them training pairs; 10 entities of each KG linked to nothing.
LINKS = np.stack([np.arange(0, 120), np.arange(120, 240)], axis=1)
KG = np.array([0] * 120 + [1] * 120 + [0] * 10 + [1] * 10)
DATA = SimpleNamespace(num_entities=len(KG), kg=KG)
TRAIN, TEST = LINKS[:24], LINKS[24:]
CFG = SimpleNamespace(csls=True, csls_k=3, eval_chunk=50, seed=0)


def test_the_candidates_are_each_kg_s_entities_in_no_training_pair():
    left, right = train.unaligned_entities(DATA, TRAIN)
    np.testing.assert_array_equal(left, np.r_[24:120, 240:250])
    np.testing.assert_array_equal(right, np.r_[144:240, 250:260])


def test_the_fit_takes_the_weight_from_a_modality_that_does_not_align():
    """The router gives "noise" 0.9 of the weight; fewer entities are each other's best match under it than
    under "clean", so the fit moves the weight to "clean" and the test pairs rank better."""
    model = _TwoModalities(LINKS, len(KG))
    ids = np.unique(TEST)
    raw = train.alignment_metrics(model.embed(ids, None).fused, TEST, CFG, ids=ids)
    out = train.unlabelled_calibration(model, None, DATA, TRAIN, TEST, CFG)
    assert out["candidates"] == [106, 106]
    assert out["factors"]["noise"] < 1.0 or out["factors"]["clean"] > 1.0
    assert out["mutual_share"] > out["mutual_share_learned"]
    assert out["test"]["avg"]["hits@1"] > raw["avg"]["hits@1"] + 0.1
    assert out["test"]["avg"]["hits@1"] == pytest.approx(1.0)
    # the share is that of utils.mutual_nearest_pairs under the learned weights, by hand
    left, right = train.unaligned_entities(DATA, TRAIN)
    emb = model.embed(np.r_[left, right], None)
    mutual = train.mutual_nearest_pairs(emb.fused[:len(left)], emb.fused[len(left):], left, right, 3)
    assert out["mutual_share_learned"] == pytest.approx(len(mutual) / 106)


def test_the_fit_reads_no_link():
    """The factors are the same whichever pairs are given as the test pairs: only the ranking after the fit
    reads them."""
    model = _TwoModalities(LINKS, len(KG))
    wrong = np.stack([TEST[:, 0], np.roll(TEST[:, 1], 7)], axis=1)
    right = train.unlabelled_calibration(model, None, DATA, TRAIN, TEST, CFG)
    shuffled = train.unlabelled_calibration(model, None, DATA, TRAIN, wrong, CFG)
    assert shuffled["factors"] == right["factors"] and shuffled["mutual_share"] == right["mutual_share"]
    assert shuffled["test"]["avg"]["hits@1"] < 0.1


def test_a_kg_whose_every_entity_is_a_seed_has_nothing_to_fit_on():
    data = SimpleNamespace(num_entities=4, kg=np.array([0, 0, 1, 1]))
    with pytest.raises(train.DataError, match="no entity is left to fit the weights on"):
        train.unlabelled_calibration(_TwoModalities(np.array([[0, 2], [1, 3]]), 4), None, data,
                                     np.array([[0, 2], [1, 3]]), np.zeros((0, 2), dtype=np.int64), CFG)


def test_a_run_records_it_at_the_end_and_the_training_is_unchanged(tiny_synthetic, tmp_path, capsys):
    argv = ["--file_dir", str(tiny_synthetic), *IL_SMALL, "--out_dir", str(tmp_path), "--epochs", "4"]
    res = train.main(*train.parse_args([*argv, "--run_name", "cal"]))
    off = train.main(*train.parse_args([*argv, "--run_name", "off", "--no-calibrate_unlabelled"]))
    cal = res["last_epoch"]["calibrated_unlabelled"]
    assert set(cal["factors"]) == set(res["modalities"])
    assert cal["mutual_share"] >= cal["mutual_share_learned"]
    if all(f == 1.0 for f in cal["factors"].values()):
        assert cal["test"]["avg"]["mrr"] == pytest.approx(res["last_epoch"]["test"]["avg"]["mrr"], abs=1e-6)
    assert "calibrated_unlabelled" not in off["last_epoch"]
    assert res["last_epoch"]["test"] == off["last_epoch"]["test"]  # it changes nothing in the training
    assert json.loads((tmp_path / "cal" / "results.json").read_text())["last_epoch"]["calibrated_unlabelled"] == cal
    assert "last, no-label calib. (4)" in train.format_results(res)
    # --eval_only fits it again at the final checkpoint, also for a run that finished without it
    capsys.readouterr()
    again = train.main(*train.parse_args(["--resume", str(tmp_path / "off"), "--eval_only"]))
    assert again["calibrated_unlabelled"]["factors"] == cal["factors"]
    assert again["calibrated_unlabelled"]["test"]["avg"] == pytest.approx(cal["test"]["avg"], abs=1e-6)  # rounded
    assert "test, no-label calibrated" in capsys.readouterr().out
    quiet = train.main(*train.parse_args(["--resume", str(tmp_path / "cal"), "--eval_only",
                                          "--no-calibrate_unlabelled"]))
    assert "calibrated_unlabelled" not in quiet


def test_add_calibration_records_it_for_a_run_that_finished_without_it(tiny_synthetic, tmp_path, capsys):
    argv = ["--file_dir", str(tiny_synthetic), *IL_SMALL, "--out_dir", str(tmp_path), "--epochs", "4"]
    with_it = train.main(*train.parse_args([*argv, "--run_name", "with"]))
    train.main(*train.parse_args([*argv, "--run_name", "old", "--no-calibrate_unlabelled"]))
    path = tmp_path / "old" / "results.json"
    before = json.loads(path.read_text())
    capsys.readouterr()
    added = train.main(*train.parse_args(["--resume", str(tmp_path / "old"), "--add_calibration"]))
    after = json.loads(path.read_text())
    cal = after["last_epoch"]["calibrated_unlabelled"]
    assert f"mutual_share={cal['mutual_share']:.4f}" in capsys.readouterr().out  # it says what it chose
    assert after["last_epoch"]["calibrated_unlabelled"] == with_it["last_epoch"]["calibrated_unlabelled"]
    assert added == after and "git_commit" in after["calibrated_unlabelled_added"]
    # every other entry is kept as it was
    del after["last_epoch"]["calibrated_unlabelled"], after["calibrated_unlabelled_added"]
    assert after == before
    with pytest.raises(train.DataError, match="already has last_epoch.calibrated_unlabelled; nothing was changed"):
        train.main(*train.parse_args(["--resume", str(tmp_path / "old"), "--add_calibration"]))
    with pytest.raises(train.DataError, match="exclude each other"):
        train.main(*train.parse_args(["--resume", str(tmp_path / "old"), "--add_calibration", "--eval_only"]))
    with pytest.raises(train.DataError, match="--add_calibration needs --resume"):
        train.main(*train.parse_args([*argv, "--add_calibration"]))


def test_add_calibration_refuses_an_unfinished_run(tiny_synthetic, tmp_path):
    argv = ["--file_dir", str(tiny_synthetic), *IL_SMALL, "--out_dir", str(tmp_path), "--epochs", "4",
            "--run_name", "r"]
    train.main(*train.parse_args(argv))
    (tmp_path / "r" / "results.json").unlink()
    with pytest.raises(train.DataError, match="has no results.json; an unfinished run records the calibration"):
        train.main(*train.parse_args(["--resume", str(tmp_path / "r"), "--add_calibration"]))


def test_a_record_with_the_added_calibration_is_the_same_run():
    from data_process.report import same_run

    results = {"last_epoch": {"epoch": 4, "test": {"hits@1": 0.5}}, "best_test_epoch": {"epoch": 2},
               "train_seconds": 9.0}
    added = json.loads(json.dumps(results))
    added["last_epoch"]["calibrated_unlabelled"] = {"factors": {"graph": 2.0}}
    assert same_run({"results": results}, {"results": added})
    fresh = json.loads(json.dumps(added))
    fresh["train_seconds"] = 9.5
    assert not same_run({"results": results}, {"results": fresh})
