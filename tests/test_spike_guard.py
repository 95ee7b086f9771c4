"""--spike_guard: a loss spike is rolled back to the last good state and the run goes on with a lower
rate for the entity table; the spike warning compares the loss per pair, on the same pairs.

The spikes here are made, not waited for: after one epoch every parameter gets large noise, so the
next epoch's loss jumps. CPU, one thread, the tiny synthetic pair, a few seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_reliability import _args as reliability_args
from test_reliability import _metrics, killed_at

import train
from train import SpikeGuard, entity_group_layout, loss_spike_warning

# The loss per pair of the tiny pair's 8 training pairs wobbles by up to x1.25 from epoch to epoch.
GUARD = ["--spike_guard_from", "1", "--spike_guard", "2"]
BROKEN_AFTER = 12  # the epoch after which the parameters are broken: the spike shows at epoch 13


def _args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return reliability_args(data, out, name, *GUARD, *extra)


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.fixture
def break_table_once(monkeypatch):
    """After epoch BROKEN_AFTER (the first time only) every parameter gets large noise (the table alone is
    not enough on this pair: the other modalities carry the loss)."""
    real = train.train_epoch
    fired = []

    def breaking(model, *args, **kwargs):
        terms = real(model, *args, **kwargs)
        if args[-1] == BROKEN_AFTER and not fired:
            fired.append(True)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 3)
        return terms

    monkeypatch.setattr(train, "train_epoch", breaking)
    return fired


def test_a_made_spike_is_rolled_back_and_the_replay_equals_a_run_without_it(tiny_synthetic, tmp_path,
                                                                              break_table_once):
    """With --spike_guard_lr 1 the remedy changes nothing, so after the rollback to epoch 10 the run must
    repeat, bit for bit, a run in which the table was never broken: the rollback restored the
    parameters, both optimisers and every RNG exactly. The rollback is logged and in results.json."""
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "broken", "--epochs", "30", "--spike_guard_lr", "1")) == 0
    assert break_table_once == [True]
    run = out / "broken"
    rollbacks = _results(run)["spike_guard"]["rollbacks"]
    assert len(rollbacks) == 1
    assert rollbacks[0]["epoch"] == BROKEN_AFTER + 1 and rollbacks[0]["rolled_back_to"] == 10
    assert rollbacks[0]["loss_ratio"] > 2
    assert f"WARNING epoch {BROKEN_AFTER + 1}: the training loss per pair rose" in (run / "log.txt").read_text()

    clean = tmp_path / "clean"
    break_table_once.append(True)  # the table breaks only while the list is empty: never in this run
    assert train.cli(_args(tiny_synthetic, clean, "clean", "--epochs", "30")) == 0
    assert [r["epoch"] for r in _metrics(run)] == [0, 5, 10, 15, 20, 25, 30]  # no epoch twice
    assert _metrics(run) == _metrics(clean / "clean")
    # A guard that never fires changes nothing: the same run without it is the same, bit for bit.
    assert train.cli(_args(tiny_synthetic, clean, "unguarded", "--epochs", "30", "--spike_guard", "0")) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "loss_rise_max"} for r in rows]
    assert strip(_metrics(clean / "unguarded")) == strip(_metrics(clean / "clean"))


def test_the_remedy_halves_the_entity_tables_rate_and_a_resumed_run_keeps_it(tiny_synthetic, tmp_path,
                                                                             break_table_once):
    """The default remedy: the table gets a group of its own at half the rate, the rest stays at --lr.
    A run stopped after the rollback and extended to the end equals the uninterrupted one bit for bit,
    so the checkpoint carries the new layout and rates."""
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "whole", "--epochs", "30")) == 0
    whole = out / "whole"
    ckpt = torch.load(whole / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert [g["lr"] for g in ckpt["opt"]["param_groups"]] == [5e-4, 2.5e-4]
    assert len(ckpt["opt"]["param_groups"][1]["params"]) == 1  # the table alone
    assert _results(whole)["spike_guard"]["rollbacks"][0]["remedy"] == "entity table's learning rate at 0.00025"

    break_table_once.clear()  # the same break, in the run that is stopped and extended
    assert train.cli(_args(tiny_synthetic, out, "parts", "--epochs", "20")) == 0
    assert train.cli(["--resume", str(out / "parts"), "--extend_to", "30"]) == 0
    assert _metrics(out / "parts") == _metrics(whole)
    assert _results(out / "parts")["spike_guard"]["rollbacks"] == _results(whole)["spike_guard"]["rollbacks"]


def test_without_the_guard_the_made_spike_stays(tiny_synthetic, tmp_path, break_table_once):
    """--spike_guard 0: no rollback; the loss at the next evaluation is far above the guarded run's."""
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "off", "--epochs", "15", "--spike_guard", "0")) == 0
    assert _results(out / "off")["spike_guard"]["rollbacks"] == []
    break_table_once.clear()
    assert train.cli(_args(tiny_synthetic, out, "on", "--epochs", "15")) == 0
    off, on = _metrics(out / "off")[-1], _metrics(out / "on")[-1]
    assert off["loss"] > 1.2 * on["loss"]
    assert off["test"]["avg"]["mrr"] < on["test"]["avg"]["mrr"]


def test_the_guard_watches_the_loss_per_pair_on_the_same_pairs():
    guard = SpikeGuard(threshold=1.2, lr_factor=0.5)
    guard.kept = {"epoch": 0}
    assert guard.spike(100.0, 10, version=0) is None  # the first epoch sets the reference
    assert guard.spike(90.0, 10, version=0) is None  # the reference is the lowest: 9 per pair
    assert guard.spike(9 * 1.2 * 10, 10, version=0) is None  # x1.2 exactly is not over the threshold
    assert guard.spike(300.0, 30, version=1) is None  # new pairs: a new reference, 10 per pair
    assert guard.spike(10 * 1.25 * 30, 30, version=1) == pytest.approx(1.25)
    assert guard.rise == pytest.approx(1.25)
    empty = SpikeGuard(threshold=1.2, lr_factor=0.5)  # nothing kept yet: nothing to roll back to
    empty.spike(1.0, 1, 0)
    assert empty.spike(5.0, 1, 0) is None


def test_the_spike_warning_compares_per_pair_and_only_on_the_same_pairs():
    """Iterative training's first step more than tripled the summed loss; that is no spike."""
    before = {"epoch": 110, "loss": 100.0, "train_pairs": 2569, "pair_version": 0}
    more_pairs = {"epoch": 120, "loss": 360.0, "train_pairs": 8813, "pair_version": 1}
    assert loss_spike_warning(before, more_pairs) is None
    same_sum_more_pairs = {**more_pairs, "pair_version": 0}  # per pair it fell
    assert loss_spike_warning(before, same_sum_more_pairs) is None
    spiked = {"epoch": 120, "loss": 140.0, "train_pairs": 2569, "pair_version": 0}
    warning = loss_spike_warning(before, spiked)
    assert warning is not None and "x1.40 per training pair" in warning


def test_splitting_the_entity_table_into_its_own_group_changes_no_step(tiny_synthetic):
    """Two AdamW steps with the table in its own group equal two steps with one group, bit for bit, and
    the layout can go back and forth without touching any AdamW state."""
    cfg = train.Config(file_dir=str(tiny_synthetic), hidden_units="16,16,16", n_exp=2, device="cpu")
    data = train.load_dataset(tiny_synthetic, seed=0)
    inputs = train.ModelInputs.from_data(data, torch.device("cpu"), cfg.feature_norm, cfg.missing)
    ents = torch.arange(data.num_entities)
    results = []
    for split in (False, True):
        torch.manual_seed(0)
        model, _, opt, _ = train.build_model(cfg, inputs, "cpu")
        entity_group_layout(opt, model, split=split)
        assert len(opt.param_groups) == (2 if split else 1)
        for _ in range(2):
            opt.zero_grad()
            model(ents, inputs).fused.pow(2).sum().backward()
            opt.step()
        entity_group_layout(opt, model, split=not split)
        results.append([p.detach().clone() for p in model.parameters()])
        assert len(opt.state) == len(list(model.parameters()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_run_resumed_between_two_evaluations_records_what_the_whole_run_records(tiny_synthetic, tmp_path):
    """Stopped after the epoch-22 checkpoint (evaluations every 5 epochs, checkpoints every 2) and
    resumed: the largest gradient norm and loss rise since the epoch-20 evaluation, and the guard's
    reference, travel in the checkpoint, so every record equals the uninterrupted run's."""
    out = tmp_path / "runs"
    args = ("--epochs", "30", "--save_every", "2", "--il", "--il_start", "10", "--il_epochs", "0")
    assert train.cli(_args(tiny_synthetic, out, "whole", *args)) == 0
    with killed_at(23):
        train.cli(_args(tiny_synthetic, out, "parts", *args))
    assert torch.load(out / "parts" / "checkpoint.pt", weights_only=False)["epoch"] == 22
    assert train.cli(["--resume", str(out / "parts")]) == 0
    assert _metrics(out / "parts") == _metrics(out / "whole")
