"""Iterative training: the pseudo-label selection (mutual CSLS nearest neighbours) on toys where
the right pairs are known, that it reads no label, and a short --il run end to end."""

from __future__ import annotations

import functools
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_reliability import _metrics, killed_at

import train
from data_process.dataset import load_dataset, read_pair_file, split_links
from utils import mutual_nearest_pairs


def _basis(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    """n orthonormal rows in d dimensions."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q[:n]  # (n, d)


@pytest.mark.parametrize("chunk", [2, 4096])
def test_mutual_nearest_pairs_recovers_the_known_pairs(chunk):
    e = _basis(7)
    perm = [3, 0, 5, 1, 4, 2]  # left i's counterpart is right perm[i]; right 6 has no counterpart
    left = e[:6]
    right = torch.empty(7, 8)
    for i, j in enumerate(perm):
        right[j] = e[i] + 0.05 * e[(i + 1) % 6]
    right[6] = e[6]
    left_ids, right_ids = np.arange(10, 16), np.arange(20, 27)
    pairs = mutual_nearest_pairs(left, right, left_ids, right_ids, csls_k=3, chunk=chunk)
    assert pairs.shape == (6, 2)
    assert {tuple(p) for p in pairs.tolist()} == {(10 + i, 20 + j) for i, j in enumerate(perm)}


def test_only_mutual_neighbours_are_kept():
    e = _basis(3)
    # Both left entities' best match is right 0, whose best match is left 0: (1, 0) is not mutual.
    left = torch.stack([e[0], torch.nn.functional.normalize(0.9 * e[0] + 0.1 * e[1], dim=0)])
    right = torch.stack([e[0], e[2]])
    pairs = mutual_nearest_pairs(left, right, np.array([0, 1]), np.array([2, 3]), csls_k=1, chunk=8)
    assert pairs.tolist() == [[0, 2]]
    empty = mutual_nearest_pairs(left[:0], right, np.array([], dtype=np.int64), np.array([2, 3]))
    assert empty.shape == (0, 2)


class _NoLabels:
    """A dataset whose gold links must not be read by the selection."""

    def __init__(self, kg):
        self.kg = np.asarray(kg)
        self.num_entities = len(kg)

    @property
    def links(self):
        raise AssertionError("pseudo_label_step read the gold links")


class _TableModel:
    """model.embed(ids, inputs).fused = fixed rows; records which entities were embedded."""

    def __init__(self, table: torch.Tensor):
        self.table, self.asked = table, []

    def embed(self, ids, inputs):
        self.asked.append(np.asarray(ids).copy())
        return SimpleNamespace(fused=self.table[torch.as_tensor(ids)])


def test_pseudo_label_step_skips_aligned_entities_and_reads_no_label():
    # KG1 = 0..3, KG2 = 4..8. True pairs: 0-5 (already a training pair), 1-7, 2-4, 3-8; 6 is unmatched.
    e = _basis(6)
    table = torch.zeros(9, 8)
    for l, r, v in [(0, 5, 0), (1, 7, 1), (2, 4, 2), (3, 8, 3)]:
        table[l], table[r] = e[v], e[v] + 0.05 * e[5]
    table[6] = e[4]
    model = _TableModel(table)
    data = _NoLabels([0, 0, 0, 0, 1, 1, 1, 1, 1])
    cfg = SimpleNamespace(csls_k=3, eval_chunk=2, il_margin=0.0)
    pairs = train.pseudo_label_step(model, None, data, np.array([[0, 5]]), cfg)
    assert {tuple(p) for p in pairs.tolist()} == {(1, 7), (2, 4), (3, 8)}
    assert set(np.concatenate(model.asked).tolist()) == {1, 2, 3, 4, 6, 7, 8}  # 0 and 5 are trained on
    # once these are training pairs too, only the unmatched right entity is left: nothing to add
    more = train.pseudo_label_step(model, None, data, np.concatenate([[[0, 5]], pairs]), cfg)
    assert more.shape == (0, 2)


def test_iterative_run_end_to_end(tiny_synthetic, tmp_path):
    argv = ["--file_dir", str(tiny_synthetic), "--rate", "0.3", "--epochs", "3", "--il", "--il_epochs", "4",
            "--il_step", "2", "--check_point", "1", "--hidden_units", "16,16,16", "--heads", "2,2",
            "--n_exp", "2", "--bsize", "16", "--device", "cpu", "--out_dir", str(tmp_path), "--run_name", "il",
            "--il_select", "accumulate", "--il_margin", "0"]  # every step adds, nothing leaves
    res = train.main(*train.parse_args(argv))
    run = tmp_path / "il"

    data = load_dataset(tiny_synthetic, seed=42)
    split = split_links(data.links, 0.3, 42)
    final = read_pair_file(run / "train_ill_final.tsv", data)  # (KG1 id, KG2 id) rows, checked by the reader
    n_train = len(split.train)
    assert np.array_equal(final[:n_train], split.train)  # the seed pairs first, unchanged
    pseudo = final[n_train:]
    assert len(pseudo) == res["pairs"]["pseudo"] > 0
    assert len(np.unique(final.ravel())) == final.size  # every entity in at most one pair
    log = (run / "log.txt").read_text()
    steps = [l for l in log.splitlines() if "pseudo_new=" in l]
    assert [int(l.split("epoch=")[1].split()[0]) for l in steps] == [5, 7]  # il_start 3, every 2 epochs
    assert sum(int(l.split("pseudo_new=")[1].split()[0]) for l in steps) == len(pseudo)
    assert [step["epoch"] for step in res["pseudo_steps"]] == [5, 7]
    assert sum(step["new"] for step in res["pseudo_steps"]) == len(pseudo)
    gold = {(int(a), int(b)) for a, b in data.links}
    assert sum(step["correct"] for step in res["pseudo_steps"]) == sum((int(a), int(b)) in gold for a, b in pseudo)
    history = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(0, 8))


def test_il_margin_keeps_only_pairs_clear_of_their_runner_up():
    """Left 1 and 2 are near-twins, each matched to its own right entity: mutual, but each right entity's
    runner-up (the other twin) is close, so a margin drops both; the clear pair 3-8 stays."""
    e = _basis(6)
    table = torch.zeros(9, 8)
    table[0], table[5] = e[0], e[0]
    table[1], table[7] = e[1] + 0.9 * e[2], e[1] + 0.9 * e[2] + 0.01 * e[5]
    table[2], table[4] = e[1] + 0.95 * e[2], e[1] + 0.95 * e[2] - 0.01 * e[5]
    table[3], table[8] = e[3], e[3] + 0.05 * e[5]
    table[6] = e[4]
    data = _NoLabels([0, 0, 0, 0, 1, 1, 1, 1, 1])
    seeds = np.array([[0, 5]])
    every = train.pseudo_label_step(_TableModel(table), None, data, seeds, SimpleNamespace(csls_k=3, eval_chunk=2,
                                                                                           il_margin=0.0))
    assert {(1, 7), (2, 4), (3, 8)} <= {tuple(p) for p in every.tolist()}
    clear = train.pseudo_label_step(_TableModel(table), None, data, seeds, SimpleNamespace(csls_k=3, eval_chunk=2,
                                                                                           il_margin=0.1))
    assert {tuple(p) for p in clear.tolist()} == {(3, 8)}


IL_SMALL = ["--rate", "0.3", "--hidden_units", "16,16,16", "--heads", "2,2", "--n_exp", "2", "--bsize", "16",
            "--device", "cpu", "--check_point", "2"]


def _run(data, out, name, *extra) -> dict:
    """train.main on the tiny pair with IL_SMALL, into ``out``/``name``; its results."""
    argv = ["--file_dir", str(data), *IL_SMALL, "--out_dir", str(out), "--run_name", name, *extra]
    return train.main(*train.parse_args(argv))


def test_reselect_replaces_the_pseudo_pairs_and_counts_what_came_and_went(tiny_synthetic, tmp_path):
    argv = ["--file_dir", str(tiny_synthetic), *IL_SMALL, "--epochs", "4", "--il", "--il_epochs", "8",
            "--il_step", "2", "--il_select", "reselect", "--out_dir", str(tmp_path), "--run_name", "re"]
    res = train.main(*train.parse_args(argv))
    data = load_dataset(tiny_synthetic, seed=42)
    seeds = split_links(data.links, 0.3, 42).train
    final = read_pair_file(tmp_path / "re" / "train_ill_final.tsv", data)[len(seeds):]
    steps = res["pseudo_steps"]
    assert [s["epoch"] for s in steps] == [6, 8, 10, 12]
    total = 0
    for s in steps:  # each step: the set before, plus what came, less what went
        assert s["total"] == total + s["new"] - s["dropped"]
        total = s["total"]
    assert total == len(final) == res["pairs"]["pseudo"] > 0
    assert not set(final.ravel()) & set(seeds.ravel())  # never a seed entity
    gold = {(int(a), int(b)) for a, b in data.links}
    assert steps[-1]["total_correct"] == sum((int(a), int(b)) in gold for a, b in final)


def test_branch_from_and_il_from_a_finished_run_equal_the_iterative_run_from_scratch(tiny_synthetic, tmp_path):
    """--branch_from the final (epoch-4) checkpoint of a plain run, or --il_from that run, with iterative
    training after it, gives bit for bit the run that had the iterative flags from the start (nothing in
    epochs 1-4 depends on them). --branch_from refuses a model that does not fit; --il_from refuses a run
    with another seed, an unfinished one, or a call without --il, naming why; neither makes a folder then."""
    run = functools.partial(_run, tiny_synthetic, tmp_path)
    il = ["--epochs", "4", "--il", "--il_epochs", "6", "--il_step", "2"]
    plain = str(tmp_path / "plain")
    whole = run("whole", *il)
    run("plain", "--epochs", "4")
    for name, flag in (("branched", "--branch_from"), ("continued", "--il_from")):
        res = run(name, *il, flag, plain)
        assert res["last_epoch"] == whole["last_epoch"] and res["pseudo_steps"] == whole["pseudo_steps"]
        assert _metrics(tmp_path / name) == _metrics(tmp_path / "whole")
        assert res["provenance"]["branched_from"]["checkpoint"] == plain
        assert res["provenance"]["branched_from"]["epoch"] == 4

    run("other_seed", "--epochs", "4", "--seed", "7")
    (tmp_path / "unfinished").mkdir()
    for name, extra, why in (("a", ["--branch_from", plain, "--hidden_units", "8,8,8"], "does not fit the flags"),
                             ("b", ["--il_from", str(tmp_path / "other_seed")], "differs in --seed 42 (that run: 7)"),
                             ("c", ["--il_from", str(tmp_path / "unfinished")], "not a finished run")):
        with pytest.raises(train.DataError, match=re.escape(why)):
            run(name, *il, *extra)
        assert not (tmp_path / name).exists()
    with pytest.raises(train.DataError, match="needs --il"):
        run("d", "--epochs", "4", "--il_from", plain)


def test_the_pseudo_label_script_counts_what_a_step_would_add(tiny_synthetic, tmp_path):
    """docs/analysis/pseudo_labels.py finds, at each margin, the pairs a pseudo-label step with that
    --il_margin would take from the same checkpoint, and counts the gold ones among them."""
    import dataclasses
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "analysis"))
    import pseudo_labels

    argv = ["--file_dir", str(tiny_synthetic), *IL_SMALL, "--out_dir", str(tmp_path), "--run_name", "plain"]
    train.main(*train.parse_args([*argv, "--epochs", "6"]))
    ckpt_path = tmp_path / "plain" / "checkpoint.pt"
    rows = pseudo_labels.margin_table(ckpt_path, [0.0, 0.05, 10.0])
    ckpt = train.read_checkpoint(ckpt_path)
    cfg = train.saved_config(ckpt["config"], "test")
    s = train.set_up(cfg, ckpt_path.parent, ckpt)
    gold = {(int(a), int(b)) for a, b in s.data.links}
    for row in rows:
        step = train.pseudo_label_step(s.model, s.inputs, s.data, s.train_pairs,
                                       dataclasses.replace(cfg, il_margin=row["margin"]))
        assert row["pairs"] == len(step)
        assert row["correct"] == sum((int(a), int(b)) in gold for a, b in step)
    assert rows[0]["pairs"] > 0 and rows[-1]["pairs"] == 0



def test_the_margin_is_chosen_from_held_out_links():
    """train.margin_for_precision (--il_precision; pseudo_labels.py --holdout): the smallest margin at
    which the candidates that contain a held-out entity (left or right) are links at the target rate,
    over at least MARGIN_MIN_PAIRS of them; what it keeps of all candidates; the grid's largest margin
    when no margin reaches the target."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "analysis"))
    import pseudo_labels

    assert train.MARGIN_MIN_PAIRS == 20
    i = np.arange(60)
    pairs = np.stack([i, 1000 + i], axis=1)
    gaps = i / 100  # margins 0.00 ... 0.59
    gold = (i >= 10) & (i < 50)  # 10 wrong below 0.1 and 10 wrong from 0.5 on
    gold[i >= 50] = False
    held = np.stack([i[:40], 1000 + i[:40]], axis=1)  # left entities 0-39 (each pair touched once)
    # Over pairs 0-39: at margin m the touched pairs are ceil(100 m)..39, gold from 10 on: 30 / (40 - 100 m).
    # 0.85 is first reached at 0.05 (30 / 35 = 0.857, 35 pairs).
    got = pseudo_labels.holdout_choice(pairs, gaps, gold, held, target=0.85)
    assert got["margin"] == 0.05 and got["estimate"] == pytest.approx(30 / 35)
    # All 55 candidates from 0.05 are kept, 40 of them gold: the estimate misses the wrong tail at 0.5+.
    assert got["pairs"] == 55 and got["correct"] == 40 and got["precision"] == pytest.approx(40 / 55)
    # Touched from the right side only: the same pairs, the same choice.
    right_only = np.stack([np.full(40, -1), 1000 + i[:40]], axis=1)
    assert pseudo_labels.holdout_choice(pairs, gaps, gold, right_only, target=0.85)["margin"] == 0.05
    # Precision 1.0: first at 0.1 (pairs 10-39, all gold).
    assert pseudo_labels.holdout_choice(pairs, gaps, gold, held, target=1.0)["margin"] == 0.1
    # Ten held-out links touch fewer than MARGIN_MIN_PAIRS candidates at every margin, so none
    # qualifies: the grid's largest, with no estimate.
    few = pseudo_labels.holdout_choice(pairs, gaps, gold, held[:10], target=0.5)
    assert few["margin"] == train.MARGIN_GRID[-1] == 0.3 and np.isnan(few["estimate"])
    # 20 gold pairs sampled on both sides and 20 wrong ones on one side: each wrong pair counts half,
    # so the estimate is 20 / 30, not 20 / 40.
    k = np.arange(20)
    mixed = np.concatenate([np.stack([k, 1000 + k], 1), np.stack([100 + k, 2000 + k], 1)])
    mixed_gold = np.repeat([True, False], 20)
    sampled = np.stack([np.concatenate([k, 100 + k]), np.concatenate([1000 + k, 3000 + k])], 1)
    half = pseudo_labels.holdout_choice(mixed, np.zeros(40), mixed_gold, sampled, target=0.6)
    assert half["margin"] == 0.0 and half["estimate"] == pytest.approx(2 / 3) and half["precision"] == 0.5
    draws = pseudo_labels.holdout_draws(pairs, gaps, gold, held, 40, 3, 0.85)
    assert [d["margin"] for d in draws] == [0.05] * 3  # every draw of all 40 is the same set
    with pytest.raises(pseudo_labels.DataError, match="--holdout 41"):
        pseudo_labels.holdout_draws(pairs, gaps, gold, held, 41, 1, 0.85)


def test_il_precision_chooses_the_margin_on_the_validation_links_at_the_first_step(tiny_synthetic, tmp_path,
                                                                                     monkeypatch):
    """--il_precision: the first pseudo-label step keeps the candidates at the margin that
    margin_for_precision chooses on the validation links from the model at that step (the one the
    step's epoch checkpoints), records it, and every later step reuses it. It needs --il and a
    validation split."""
    monkeypatch.setattr(train, "MARGIN_MIN_PAIRS", 1)  # the tiny pair has a handful of validation links
    run = functools.partial(_run, tiny_synthetic, tmp_path)
    split = ["--val_ratio", "0.5", "--epochs", "6", "--save_every", "2"]
    run("plain", *split)
    chosen = []
    for target in (0.01, 0.5, 1.0):
        name = f"il_{target}"
        res = run(name, *split, "--il", "--il_epochs", "4", "--il_step", "2", "--il_precision", str(target),
                  "--il_from", str(tmp_path / "plain"), "--keep_checkpoints", "8")
        steps = res["pseudo_steps"]
        assert [st["epoch"] for st in steps] == [8, 10]
        ckpt_path = tmp_path / name / "checkpoint_e8.pt"  # written after the step, with the model it used
        ckpt = train.read_checkpoint(ckpt_path)
        cfg = train.saved_config(ckpt["config"], "test")
        s = train.set_up(cfg, ckpt_path.parent, ckpt)
        pairs, margins = train.pseudo_label_candidates(s.model, s.inputs, s.data, s.train_pairs, cfg)
        valid = s.split.valid
        assert len(valid) and len(pairs)
        margin, _ = train.margin_for_precision(pairs, margins, train.rows_in(pairs, valid), valid, target)
        assert [st["margin"] for st in steps] == [margin, margin]
        assert steps[0]["new"] == int((margins >= margin).sum())
        chosen.append(margin)
    assert chosen[0] < chosen[-1]  # a higher target asks for a larger margin on this data
    for bad, why in ((["--il_precision", "0.9"], "needs --il and --val_ratio"),
                     (["--il_precision", "0.9", "--il", "--val_ratio", "0"], "needs --il and --val_ratio"),
                     (["--il_precision", "1.5", "--il", "--val_ratio", "0.5"], "must be in \\[0, 1\\]")):
        with pytest.raises(train.DataError, match=why):
            run("bad", "--epochs", "2", *bad)


def test_a_run_started_with_il_from_and_killed_resumes_to_the_same_metrics(tiny_synthetic, tmp_path):
    """An --il_from run stopped after its epoch-8 checkpoint and resumed with --resume alone (as run_all.sh
    resumes it) ends with the metrics of the uninterrupted one, and its provenance says where it branched
    from and where it was resumed."""
    run = functools.partial(_run, tiny_synthetic, tmp_path)
    il = ["--epochs", "4", "--il", "--il_epochs", "8", "--il_step", "2", "--save_every", "2"]
    run("plain", "--epochs", "4", "--save_every", "2")
    run("whole", *il, "--il_from", str(tmp_path / "plain"))
    with killed_at(9):  # the epoch-8 checkpoint is left
        run("parts", *il, "--il_from", str(tmp_path / "plain"))
    assert train.cli(["--resume", str(tmp_path / "parts")]) == 0
    assert _metrics(tmp_path / "parts") == _metrics(tmp_path / "whole")
    prov = json.loads((tmp_path / "parts" / "results.json").read_text())["provenance"]
    assert prov["branched_from"]["epoch"] == 4 and [r["epoch"] for r in prov["resumed"]] == [8]
