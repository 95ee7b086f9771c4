"""--router_holdout: a fixed fraction of the seed pairs trains the router alone, and the other pairs train
everything but the router. The forward values do not change; the gradients are split. CPU, one thread,
the tiny synthetic pair, a few seconds each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_reliability import _args

import train


def _model(tiny_synthetic, router="entity"):
    cfg = train.Config(file_dir=str(tiny_synthetic), hidden_units="16,16,16", n_exp=2, device="cpu", router=router)
    data = train.load_dataset(tiny_synthetic, seed=0)
    inputs = train.ModelInputs.from_data(data, torch.device("cpu"), cfg.feature_norm, cfg.missing)
    torch.manual_seed(0)
    model, _, _, _ = train.build_model(cfg, inputs, "cpu")
    # A router that is not at its uniform start (the entity router: every weight depends on the entity).
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.normal_(0, 0.1)
    return model, inputs, torch.arange(data.num_entities)


def _grads(model, loss) -> tuple[float, float]:
    """The gradient norms that ``loss`` gives the router and everything else."""
    model.zero_grad(set_to_none=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    loss.backward(retain_graph=True)
    router = {id(p) for p in model.fusion.parameters()}
    norm = lambda ps: float(sum(p.grad.pow(2).sum() for p in ps)) ** 0.5  # noqa: E731
    return (norm([p for p in model.parameters() if id(p) in router]),
            norm([p for p in model.parameters() if id(p) not in router]))


@pytest.mark.parametrize("router", ["entity", "modality"])
def test_the_held_out_rows_train_only_the_router_and_the_others_everything_else(tiny_synthetic, router):
    model, inputs, ids = _model(tiny_synthetic, router)
    torch.manual_seed(1)  # the same expert dropout in both passes
    plain = model(ids, inputs)
    held = torch.zeros(len(ids), dtype=torch.bool)
    held[::3] = True
    torch.manual_seed(1)
    out = model(ids, inputs, router_only=held)
    assert torch.equal(out.fused, plain.fused) and torch.equal(out.weights, plain.weights)  # the same values

    router, rest = _grads(model, out.fused[held].pow(2).sum())
    assert router > 0 and rest == 0.0  # a held-out row's fused loss reaches the router alone
    router, rest = _grads(model, out.fused[~held].pow(2).sum())
    assert router == 0.0 and rest > 0  # the others' reaches everything but the router
    router, rest = _grads(model, train.router_imbalance(out.weights, out.present))
    assert router > 0  # the balance term still reaches the router on every row
    router, rest = _grads(model, plain.fused.pow(2).sum())
    assert router > 0 and rest > 0  # without it, the fused loss reaches both


def test_a_run_keeps_the_held_out_pairs_from_the_modalities(tiny_synthetic, tmp_path, monkeypatch):
    """The held-out pairs (a quarter of the 8 seed pairs) enter every epoch's fused loss in their own
    batches, never a loss batch of the modalities; results.json counts them; the same seed holds out the
    same pairs; a fraction of 0.5 or more is refused."""
    calls = []
    real = train.alignment_losses

    def recording(model, out, ents, pairs, cfg, gen, shuffle, unimodal=True):
        calls.append((pairs.copy(), unimodal, cfg.tau_cl))
        return real(model, out, ents, pairs, cfg, gen, shuffle, unimodal)

    monkeypatch.setattr(train, "alignment_losses", recording)
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "held", "--epochs", "4", "--router_holdout", "0.25")) == 0
    res = json.loads((out / "held" / "results.json").read_text())
    assert res["pairs"]["train"] == 8 and res["pairs"]["router_holdout"] == 2
    router_pairs = train.router_holdout_pairs(_seed_pairs(tiny_synthetic), train.Config(seed=42, router_holdout=0.25))
    assert len(calls) == 8  # two calls an epoch: the modalities' pairs, then the router's
    for pairs, unimodal, tau in calls:
        assert tau == 0.1  # --tau_cl for both
        if unimodal:
            assert len(pairs) == 6 and not train.rows_in(pairs, router_pairs).any()
        else:
            assert np.array_equal(np.sort(pairs, axis=0), np.sort(router_pairs, axis=0))
    # --router_tau: the router's pairs at their own temperature, the modalities' at --tau_cl.
    calls.clear()
    assert train.cli(_args(tiny_synthetic, out, "tau", "--epochs", "2", "--router_holdout", "0.25",
                           "--router_tau", "0.05")) == 0
    assert [(u, t) for _, u, t in calls] == [(True, 0.1), (False, 0.05)] * 2
    for bad in (["--router_holdout", "0.5"], ["--router_tau", "0.05"],
                ["--router_holdout", "0.25", "--router_tau", "-1"]):
        assert train.cli(_args(tiny_synthetic, out, "refused", *bad)) == 2
        assert not (out / "refused").exists()


def _seed_pairs(tiny_synthetic) -> np.ndarray:
    """The training pairs of the runs above (the split of --rate and --seed that _args gives)."""
    data = train.load_dataset(tiny_synthetic, seed=42)
    return train.split_links(data.links, 0.2, 42, 0.0).train


def test_the_held_out_pairs_are_a_fixed_draw_of_the_seed():
    pairs = np.arange(40).reshape(20, 2)
    a = train.router_holdout_pairs(pairs, train.Config(seed=1, router_holdout=0.1))
    again = train.router_holdout_pairs(pairs, train.Config(seed=1, router_holdout=0.1))
    assert len(a) == 2 and np.array_equal(a, again)
    assert train.router_holdout_pairs(pairs, train.Config(seed=1)).shape == (0, 2)
    with pytest.raises(train.DataError, match="leaves too few"):
        train.router_holdout_pairs(pairs[:3], train.Config(seed=1, router_holdout=0.4))
