"""docs/analysis/spike.py: a trace from a checkpoint continues the run exactly, its optimiser changes
take effect, and it refuses to overwrite or to trace backwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_reliability import _args, _metrics

import train
from utils import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "analysis"))
import spike  # noqa: E402


@pytest.fixture(scope="module")
def runs(tiny_synthetic, tmp_path_factory):
    """A 5-epoch run (its final checkpoint is at epoch 5) and the same run to 10 epochs."""
    out = tmp_path_factory.mktemp("spike")
    for name, epochs in (("short", "5"), ("long", "10")):
        assert train.cli(_args(tiny_synthetic, out, name, "--epochs", epochs)) == 0
    return out


def test_a_trace_without_changes_continues_the_run_exactly(runs, tmp_path):
    recs = spike.trace(runs / "short" / "checkpoint.pt", 10, tmp_path / "base.jsonl")
    assert [r["epoch"] for r in recs] == list(range(6, 11))
    assert all("test" in r for r in recs)  # evaluated every epoch, which draws no random number
    long = {m["epoch"]: m for m in _metrics(runs / "long")}
    assert recs[-1]["loss"] == long[10]["loss"]
    assert recs[-1]["grad_norm"] == pytest.approx(long[10]["grad_norm"], abs=1e-6)
    assert recs[-1]["test"]["hits@1"] == long[10]["test"]["avg"]["hits@1"]
    assert recs[-1]["test"]["mrr"] == long[10]["test"]["avg"]["mrr"]
    parts = set(recs[0]["update"])
    assert "entity.weight" in parts  # the graph encoder's parameters one by one
    assert {p for p in parts if p.startswith("experts.")}  # one part per modality's experts
    top = recs[0]["table_top"]
    assert [g for _, g, _ in top] == sorted((g for _, g, _ in top), reverse=True)
    assert 0 < recs[0]["table_top100_share"] <= 1
    head, again = spike.read(tmp_path / "base.jsonl")
    assert head["changes"] == {}
    assert again == json.loads(json.dumps(recs))
    assert "| base | none | 10 |" in spike.table([tmp_path / "base.jsonl"])


def test_the_learning_rate_change_takes_effect_from_the_first_step(runs, tmp_path):
    recs = spike.trace(runs / "short" / "checkpoint.pt", 7, tmp_path / "frozen.jsonl", lr=0.0)
    assert all(r["lr"] == 0.0 for r in recs)
    assert all(v == 0.0 for r in recs for v in r["update"].values())  # lr 0: AdamW moves nothing
    assert all(v == 0.0 for r in recs for v in r["max_step"].values())
    assert any(v > 0.0 for r in recs for v in r["grad"].values())  # while the gradients are there
    head, _ = spike.read(tmp_path / "frozen.jsonl")
    assert head["changes"] == {"lr": 0.0}


@pytest.mark.parametrize("change", [{"grad_clip": 1e-6}, {"eps": 1.0}, {"beta2": 0.5}, {"entity_lr": 0.0}])
def test_each_optimiser_change_changes_the_first_step_but_not_its_gradient(runs, tmp_path, change):
    """The first traced step sees the same gradient (logged before any clip) and, with another clip, epsilon
    or beta2, takes another step: against AdamW's history a clipped gradient is a smaller one, a larger
    epsilon damps every step, a smaller beta2 forgets the history faster."""
    free = spike.trace(runs / "short" / "checkpoint.pt", 6, tmp_path / "free.jsonl")
    changed = spike.trace(runs / "short" / "checkpoint.pt", 6, tmp_path / "changed.jsonl", **change)
    assert changed[0]["grad_norm"] == free[0]["grad_norm"]
    assert changed[0]["update"] != free[0]["update"]
    head, _ = spike.read(tmp_path / "changed.jsonl")
    assert head["changes"] == change


def test_a_table_learning_rate_of_zero_freezes_the_table_only(runs, tmp_path):
    recs = spike.trace(runs / "short" / "checkpoint.pt", 6, tmp_path / "t.jsonl", entity_lr=0.0)
    assert recs[0]["update"]["entity.weight"] == 0.0
    assert recs[0]["grad"]["entity.weight"] > 0.0
    assert recs[0]["update"]["layers.0.weight"] > 0.0


def test_a_beta2_change_keeps_the_bias_corrected_second_moments():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = torch.optim.AdamW([w], lr=1e-3)
    for i in range(40):
        opt.zero_grad()
        (w * torch.tensor([1.0, 0.1, 0.01]) * (1 + i)).sum().backward()
        opt.step()
    before = opt.state[w]["exp_avg_sq"] / (1 - 0.999 ** 40)
    spike.set_beta2(opt, 0.9)
    assert opt.param_groups[0]["betas"] == (0.9, 0.9)
    assert torch.allclose(opt.state[w]["exp_avg_sq"] / (1 - 0.9 ** 40), before, rtol=1e-6, atol=0)


def test_refuses_to_overwrite_or_to_trace_backwards(runs, tmp_path):
    ckpt = runs / "short" / "checkpoint.pt"
    taken = tmp_path / "taken.jsonl"
    taken.write_text("keep me\n")
    with pytest.raises(DataError, match="already exists"):
        spike.trace(ckpt, 10, taken)
    assert taken.read_text() == "keep me\n"
    with pytest.raises(DataError, match="checkpoint is at epoch 5"):
        spike.trace(ckpt, 5, tmp_path / "new.jsonl")
    assert not (tmp_path / "new.jsonl").exists()
    assert spike.main(["trace", str(tmp_path / "missing.pt"), "--to", "9", "--out", str(tmp_path / "x.jsonl")]) == 2


def test_term_gradients_sum_to_the_steps_and_leave_the_trace_unchanged(runs, tmp_path):
    """--term_grads splits the entity table's gradient by loss term: the terms' norms come from gradients
    that add up to the one the step takes (its logged norm), the graph's own terms are there, and the
    trace with it equals the trace without it (the random states are put back)."""
    free = spike.trace(runs / "short" / "checkpoint.pt", 7, tmp_path / "free.jsonl")
    split = spike.trace(runs / "short" / "checkpoint.pt", 7, tmp_path / "split.jsonl", term_grads=True)
    for a, b in zip(free, split):
        assert a["loss"] == b["loss"] and a["test"] == b["test"] and a["grad"] == b["grad"]
        t = b["term_grads"]
        assert t["table_total"] == pytest.approx(b["table_grad_norm"], rel=1e-5)
        assert {"fused_cl", "uni_cl.graph", "distill.graph"} <= set(t["terms"])
        assert all(-1 - 1e-9 <= v["cos"] <= 1 + 1e-9 for v in t["terms"].values())
        # the parts, projected on the total, add up to it: sum_k |g_k| cos_k = |g|
        assert sum(v["norm"] * v["cos"] for v in t["terms"].values()) == pytest.approx(t["table_total"], rel=1e-5)
        assert "uni_cl.rel_bow" not in t["terms"]  # another modality's own loss never reaches the table
    lines = spike.term_table(tmp_path / "split.jsonl").splitlines()
    assert len(lines) == 2 + len(split)
    last = lines[-1].split(" | ")[2:]  # each term's share of the table's gradient at the last epoch
    shares = [float(c.split(" (")[0]) for c in last if c.strip(" |") != "-"]
    assert sum(shares) == pytest.approx(1.0, abs=0.01 * len(shares))  # two-decimal shares add up to 1
    assert shares == sorted(shares, reverse=True)
    with pytest.raises(DataError, match="no epoch has term_grads"):
        spike.term_table(tmp_path / "free.jsonl")


def test_a_router_holdout_run_is_traced_exactly_and_its_router_loss_split_out(tiny_synthetic, tmp_path):
    """Under --router_holdout the trace trains on the run's own router pairs (so it continues the run), and
    --term_grads gives the router's fused loss a term of its own; the terms still add up to the step's."""
    flags = ("--router_holdout", "0.25", "--router_tau", "0.05")
    for name, epochs in (("short", "5"), ("long", "7")):
        assert train.cli(_args(tiny_synthetic, tmp_path, name, "--epochs", epochs, *flags)) == 0
    recs = spike.trace(tmp_path / "short" / "checkpoint.pt", 7, tmp_path / "held.jsonl", term_grads=True)
    long = {m["epoch"]: m for m in _metrics(tmp_path / "long")}
    assert recs[-1]["loss"] == long[7]["loss"]
    assert recs[-1]["test"]["hits@1"] == long[7]["test"]["avg"]["hits@1"]
    t = recs[-1]["term_grads"]
    assert "router_cl" in t["terms"]
    assert sum(v["norm"] * v["cos"] for v in t["terms"].values()) == pytest.approx(t["table_total"], rel=1e-5)
