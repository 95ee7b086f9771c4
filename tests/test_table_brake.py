"""--table_brake: when the entity table's gradient norm runs away (risen for 3 epochs in a row, more than
x2 its recent median), the table's learning rate is halved before the loss moves.

The rule is checked on hand-made sequences of gradient norms; in a run, the growth is made by scaling the
gradient norm that train_epoch reports (what the brake reads), from a given epoch on. CPU, one thread,
the tiny synthetic pair, a few seconds each.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_reliability import _args as reliability_args
from test_reliability import _metrics

import train
from train import BRAKE_MAX, TableBrake

GUARD = ["--spike_guard_from", "1", "--spike_guard", "2"]  # watch from epoch 1 (the loss guard as in its tests)
GROWS_FROM = 12  # from this epoch on the reported table gradient grows x1.6 per epoch


def _args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return reliability_args(data, out, name, *GUARD, *extra)


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _session(tiny_synthetic) -> SimpleNamespace:
    """What TableBrake.watch reads and changes: the state, the model's entity table and the optimiser."""
    cfg = train.Config(file_dir=str(tiny_synthetic), hidden_units="16,16,16", n_exp=2, device="cpu")
    data = train.load_dataset(tiny_synthetic, seed=0)
    inputs = train.ModelInputs.from_data(data, torch.device("cpu"), cfg.feature_norm, cfg.missing)
    model, _, opt, _ = train.build_model(cfg, inputs, "cpu")
    state = {"brakes": [], "brake_window": [], "brake_version": 0, "brake_rise": 0.0}
    return SimpleNamespace(model=model, opt=opt, state=state, log=logging.getLogger("test_table_brake"))


def _feed(brake: TableBrake, s, norms, version: int = 0, first_epoch: int = 1) -> list[int]:
    """Feed one norm per epoch; the epochs at which the brake acted."""
    for epoch, grad in enumerate(norms, start=first_epoch):
        brake.watch(s, epoch, grad, version)
    return [b["epoch"] for b in s.state["brakes"]]


def test_a_growing_gradient_brakes_once_it_is_over_twice_the_median(tiny_synthetic):
    """Epochs 1-12 alternate 1.0 / 1.2, epoch 13 falls to 1.0, then 1.5, 1.9, 2.3, 2.5. At 2.3 the
    gradient has risen three times in a row but its median is 1.2 (fifteen norms: seven 1.0, six 1.2,
    1.5, 1.9), so x1.92 is under x2; at 2.5 the median of sixteen is still 1.2, and x2.08 brakes."""
    s = _session(tiny_synthetic)
    brake = TableBrake(ratio=2.0, factor=0.5)
    assert _feed(brake, s, [1.0, 1.2] * 6 + [1.0, 1.5, 1.9, 2.3]) == []
    assert s.state["brake_rise"] == pytest.approx(2.3 / 1.2)
    assert len(s.opt.param_groups) == 1  # nothing changed yet
    assert _feed(brake, s, [2.5], first_epoch=17) == [17]
    event = s.state["brakes"][0]
    assert event["grad_ratio"] == pytest.approx(2.5 / 1.2, abs=1e-4)
    assert event["remedy"] == "entity table's learning rate at 0.00025"
    rest, table = s.opt.param_groups
    assert rest["lr"] == 5e-4 and table["lr"] == 2.5e-4
    assert table["params"] == [train.entity_table(s.model)]
    assert s.state["brake_window"] == []  # it starts again from the braked rate


def test_a_gradient_that_alternates_or_jumps_once_never_brakes(tiny_synthetic):
    """The brake is for growth: a swing of x10 up and down (the decaying alternation that half the rate
    gave in the traces), or one jump that stays, is not a run-away gradient."""
    s = _session(tiny_synthetic)
    brake = TableBrake(ratio=2.0, factor=0.5)
    assert _feed(brake, s, [1.0] * 12 + [10.0, 1.0] * 10 + [10.0] * 20) == []
    assert s.state["brake_rise"] == pytest.approx(10.0)  # recorded all the same


def test_new_training_pairs_start_a_new_window_and_the_brakes_stop_after_the_last(tiny_synthetic):
    """A pseudo-label step (a new pair version) empties the window: its gradients are of other pairs, and
    fewer than ten norms are never compared. After BRAKE_MAX brakes the rate stays where it is."""
    s = _session(tiny_synthetic)
    brake = TableBrake(ratio=2.0, factor=0.5)
    assert _feed(brake, s, [1.0] * 12) == []
    assert _feed(brake, s, [2.0, 4.0, 8.0, 16.0], version=1, first_epoch=13) == []  # 4 norms in the window
    assert s.state["brake_window"] == [2.0, 4.0, 8.0, 16.0] and s.state["brake_version"] == 1
    growth = [1.0] * 10 + [1.5, 2.0, 2.5, 3.0]
    for _ in range(BRAKE_MAX + 1):
        _feed(brake, s, growth, version=1)
    assert len(s.state["brakes"]) == BRAKE_MAX
    assert s.opt.param_groups[-1]["lr"] == pytest.approx(5e-4 / 2 ** BRAKE_MAX)
    assert s.opt.param_groups[0]["lr"] == 5e-4


@pytest.fixture
def growing_table_gradient(monkeypatch):
    """From epoch GROWS_FROM on, the table gradient norm train_epoch reports is multiplied by 1.6 per epoch
    (the real gradient is untouched: only what the brake reads grows)."""
    real = train.train_epoch

    def growing(*args, **kwargs):
        terms = real(*args, **kwargs)
        epoch = args[-1]
        if epoch >= GROWS_FROM:
            terms["table_grad_norm"] *= 1.6 ** (epoch - GROWS_FROM + 1)
        return terms

    monkeypatch.setattr(train, "train_epoch", growing)


def test_a_run_brakes_on_a_growing_table_gradient_and_a_resumed_run_keeps_the_rate(tiny_synthetic, tmp_path,
                                                                                  growing_table_gradient):
    """The brake acts within a few epochs of the growth's start, halves the table's rate (its own AdamW
    group; the rest stays at --lr), says so in the log and in results.json; the run equals a run without
    the brake up to that epoch and differs after. Stopped after the brake and extended, the run equals the
    uninterrupted one bit for bit: the checkpoint carries the layout, the rates and the brake's window."""
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "whole", "--epochs", "30")) == 0
    whole = out / "whole"
    events = _results(whole)["table_brake"]["events"]
    assert len(events) >= 1
    first = events[0]["epoch"]
    assert GROWS_FROM + 2 <= first <= GROWS_FROM + 5 and events[0]["grad_ratio"] > 2
    warning = f"WARNING epoch {first}: the entity table's gradient norm rose for 3 epochs"
    assert warning in (whole / "log.txt").read_text()
    ckpt = torch.load(whole / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert [g["lr"] for g in ckpt["opt"]["param_groups"]] == [5e-4, 5e-4 * 0.5 ** len(events)]

    assert train.cli(_args(tiny_synthetic, out, "no_brake", "--epochs", "30", "--table_brake", "0")) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "table_grad_rise_max"} for r in rows]  # noqa: E731
    braked, unbraked = strip(_metrics(whole)), strip(_metrics(out / "no_brake"))
    before = [r for r in braked if r["epoch"] < first]
    assert before == unbraked[:len(before)]  # the same run until the brake ...
    assert braked[-1]["test"] != unbraked[-1]["test"]  # ... and another after it
    assert _results(out / "no_brake")["table_brake"]["events"] == []

    assert train.cli(_args(tiny_synthetic, out, "parts", "--epochs", "20")) == 0
    assert train.cli(["--resume", str(out / "parts"), "--extend_to", "30"]) == 0
    assert _metrics(out / "parts") == _metrics(whole)
    assert _results(out / "parts")["table_brake"] == _results(whole)["table_brake"]


def test_a_brake_that_never_acts_changes_nothing(tiny_synthetic, tmp_path):
    """On the tiny pair's own gradients (no growth) the brake never acts: the run is bit for bit the run
    with --table_brake 0, which records no table_grad_rise_max."""
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "on", "--epochs", "40")) == 0
    assert train.cli(_args(tiny_synthetic, out, "off", "--epochs", "40", "--table_brake", "0")) == 0
    assert _results(out / "on")["table_brake"]["events"] == []
    on, off = _metrics(out / "on"), _metrics(out / "off")
    assert all(r["table_grad_rise_max"] < 2 for r in on if r["epoch"] > 10)
    assert [{k: v for k, v in r.items() if k != "table_grad_rise_max"} for r in on] == off
