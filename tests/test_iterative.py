"""Iterative training: the pseudo-label selection (mutual CSLS nearest neighbours) on toys where
the right pairs are known, that it reads no label, and a short --il run end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
from data_process.dataset import read_pair_file, split_links
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
    cfg = SimpleNamespace(csls_k=3, eval_chunk=2)
    pairs = train.pseudo_label_step(model, None, data, np.array([[0, 5]]), cfg)
    assert {tuple(p) for p in pairs.tolist()} == {(1, 7), (2, 4), (3, 8)}
    assert set(np.concatenate(model.asked).tolist()) == {1, 2, 3, 4, 6, 7, 8}  # 0 and 5 are trained on
    # once these are training pairs too, only the unmatched right entity is left: nothing to add
    more = train.pseudo_label_step(model, None, data, np.concatenate([[[0, 5]], pairs]), cfg)
    assert more.shape == (0, 2)


def test_iterative_run_end_to_end(tiny_synthetic, tmp_path):
    argv = ["--file_dir", str(tiny_synthetic), "--rate", "0.3", "--epochs", "3", "--il", "--il_epochs", "4",
            "--il_step", "2", "--check_point", "1", "--hidden_units", "16,16,16", "--heads", "2,2",
            "--n_exp", "2", "--bsize", "16", "--device", "cpu", "--out_dir", str(tmp_path), "--run_name", "il"]
    res = train.main(*train.parse_args(argv))
    run = tmp_path / "il"
    from data_process.dataset import load_dataset

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
