"""The official code's departures as options (--router global, --expert linear, --loss_weighting,
--distill_direction, --curriculum, --club random_pair, --preset), missing-modality masking and the
modality-health monitor: each checked against a hand computation or the property it promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_loss import _club, _log_gauss

import train
from layers import MODALITY_COMBINATIONS, GlobalModalityWeights, IntraModalMoE, LinearNoisyMoE, PassThrough
from loss import (
    UncertaintyWeights,
    alignment_log_probs,
    batch_alignment_losses,
    random_expert_pairs,
    total_loss,
)
from model import HUMEA, ModelConfig, ModelInputs
from train import LOSS_SPIKE, curriculum_pairs, health_warnings, loss_spike_warning, modality_health, parse_args
from utils import PRESETS, Config, DataError

D = 8


def _cfg(**kw) -> Config:
    base = dict(hidden_units=f"{D},{D},{D}", heads="2,2", n_exp=3, bsize=16, seed=0, device="cpu")
    cfg = Config(**{**base, **kw})
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# --router global
# ---------------------------------------------------------------------------------------------


def test_global_weights_are_combination_sums_of_the_top5_and_the_same_for_every_entity():
    mods = ("graph", "image", "rel_bow", "rel_text", "attr_bow", "attr_text")
    router = GlobalModalityWeights(mods).double()
    with torch.no_grad():
        router.logits.copy_(torch.tensor([0.5, -1.0, 0.2, 1.5, 0.0, -2.0, 0.7], dtype=torch.float64))
    parts = [torch.randn(4, D, dtype=torch.float64) for _ in mods]
    fused, w = router(parts)
    # By hand: softmax over the 7 combinations, the two smallest (logits -1.0 and -2.0) dropped.
    p = torch.softmax(router.logits.detach(), 0)
    p[[1, 5]] = 0.0
    p = p / p.sum()
    expected = [sum(float(p[c]) for c, combo in enumerate(MODALITY_COMBINATIONS) if m in combo) for m in mods]
    torch.testing.assert_close(w, torch.tensor([expected] * 4, dtype=torch.float64))
    torch.testing.assert_close(fused[:, :D], w[:, :1] * parts[0])
    # A modality an entity lacks gets weight 0 for that entity only.
    present = torch.ones(4, 6, dtype=torch.bool)
    present[2, 1] = False
    _, w2 = router(parts, present)
    assert w2[2, 1] == 0 and torch.equal(w2[0], w[0])


def test_global_weights_drop_combinations_of_absent_modalities_and_accept_a_query():
    mods = ("graph", "rel_bow", "attr_bow")  # no image, no text: 4 combinations remain
    router = GlobalModalityWeights(mods, hidden=6)
    assert router.member.shape == (4, 3) and router.top == 4
    _, w = router([torch.randn(3, D) for _ in mods])
    assert (w[0] == w[1]).all() and (w > 0).all()
    w.sum().backward()
    assert router.query.grad is not None and router.proj.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# --expert linear, --no-graph_moe
# ---------------------------------------------------------------------------------------------


def test_linear_noisy_experts_equal_hand_computation_and_noise_only_in_training():
    torch.manual_seed(3)
    moe = LinearNoisyMoE(5, D, 3).double()
    with torch.no_grad():
        moe.center.normal_()
        moe.gate.weight.normal_()
        moe.noise.weight.normal_()
    x = torch.randn(4, 5, dtype=torch.float64)
    moe.eval()
    mixed, experts, gate = moe(x)
    for k in range(3):
        torch.testing.assert_close(experts[:, k], (x - moe.center[k]) @ moe.weight[k])
    torch.testing.assert_close(gate, torch.softmax(x @ moe.gate.weight.t(), 1))
    torch.testing.assert_close(mixed, torch.einsum("bk,bkd->bd", gate, experts))
    moe.train()
    assert not torch.allclose(moe(x)[2], gate)  # Gaussian noise on the gate logits in training
    fresh = LinearNoisyMoE(5, D, 3).eval()
    torch.testing.assert_close(fresh(x.float())[2], torch.full((4, 3), 1 / 3))  # zero-initialised gate
    assert float(fresh.weight.detach().std()) == pytest.approx(0.02, rel=0.2)


def test_linear_experts_on_an_all_zero_row_freeze_their_centres_at_the_first_step():
    """docs/departures.md, "A first-step overflow": a zero input row (an entity without attributes
    under --missing fill) gives an expert output of exactly zero at the start (c_k = 0, no output
    bias). Normalised twice (the unimodal embedding, then inside the contrastive loss), eps 1e-12
    each, its gradient is scaled by 1e24; AdamW's float32 second moment of the centres overflows to
    inf, and those entries never move again."""
    torch.manual_seed(0)
    moe = LinearNoisyMoE(4, D, 2).eval()
    opt = torch.optim.AdamW(moe.parameters(), lr=5e-4)
    target = torch.randn(2, D)

    def step(x):
        opt.zero_grad()
        mixed = moe(x)[0]
        loss = (F.normalize(F.normalize(mixed, dim=-1), dim=-1) * target).sum()
        loss.backward()
        opt.step()
        return float(moe.center.grad.abs().max())

    zero_row = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 2.0, 1.0]])
    assert step(zero_row) > 1e20  # the exactly-zero output's gradient
    frozen = torch.isinf(opt.state[moe.center]["exp_avg_sq"])
    assert frozen.any()
    before, weights_before = moe.center.detach().clone(), moe.weight.detach().clone()
    for _ in range(3):  # ordinary rows afterwards: ordinary gradients, but the frozen entries stay put
        assert step(torch.randn(2, 4)) < 1e3
    torch.testing.assert_close(moe.center.detach()[frozen], before[frozen], rtol=0, atol=0)
    assert not torch.equal(moe.weight.detach(), weights_before)  # the rest of the expert still learns


def test_expert_options_choose_the_modules(tiny_data):
    inputs = ModelInputs.from_data(tiny_data, "cpu")
    torch.manual_seed(0)
    paper = HUMEA(ModelConfig.from_config(_cfg()), inputs)
    assert all(isinstance(e, IntraModalMoE) for e in paper.experts.values())  # incl. the Graph-MoE
    linear = HUMEA(ModelConfig.from_config(_cfg(expert="linear")), inputs)
    assert isinstance(linear.experts["graph"], PassThrough)
    assert all(isinstance(linear.experts[m], LinearNoisyMoE) for m in linear.modalities if m != "graph")
    no_gmoe = HUMEA(ModelConfig.from_config(_cfg(graph_moe=False)), inputs)
    assert isinstance(no_gmoe.experts["graph"], PassThrough) and isinstance(no_gmoe.experts["image"], IntraModalMoE)
    out = no_gmoe(torch.arange(5), inputs)
    gat = no_gmoe.graph_embeddings(inputs)[:5]
    torch.testing.assert_close(out.unimodal["graph"], F.normalize(gat, dim=-1))  # the GAT output, straight


# ---------------------------------------------------------------------------------------------
# --missing mask
# ---------------------------------------------------------------------------------------------


def test_masked_modality_has_no_part_in_the_fused_embedding(tiny_data):
    inputs = ModelInputs.from_data(tiny_data, "cpu")
    model = HUMEA(ModelConfig.from_config(_cfg()), inputs)
    j = model.modalities.index("image")
    lacking = np.nonzero(~tiny_data.present["image"])[0][:4]
    out = model(torch.as_tensor(lacking), inputs)
    assert (out.weights[:, j] == 0).all() and (out.present[:, j] == 0).all()
    torch.testing.assert_close(out.weights.sum(1), torch.ones(len(lacking)))
    torch.testing.assert_close(out.fused[:, j * D:(j + 1) * D], torch.zeros(len(lacking), D))
    filled = ModelInputs.from_data(tiny_data, "cpu", missing="fill")  # the official random fill
    assert filled.present is None
    assert (model(torch.as_tensor(lacking), filled).weights[:, j] > 0).all()


def test_unimodal_losses_use_only_the_pairs_that_have_the_modality():
    torch.manual_seed(1)
    b = 6
    f1, f2 = torch.randn(b, 3 * D), torch.randn(b, 3 * D)
    u1, u2 = {"img": torch.randn(b, D)}, {"img": torch.randn(b, D)}
    keep = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    _, cl, al = batch_alignment_losses(f1, f2, u1, u2, 0.1, 4.0, present={"img": keep})
    _, cl_ref, al_ref = batch_alignment_losses(f1[keep], f2[keep], {"img": u1["img"][keep]},
                                               {"img": u2["img"][keep]}, 0.1, 4.0)
    torch.testing.assert_close(cl["img"], cl_ref["img"])
    torch.testing.assert_close(al["img"], al_ref["img"])
    one = torch.zeros(b, dtype=torch.bool)
    one[0] = True
    _, cl, al = batch_alignment_losses(f1, f2, u1, u2, 0.1, 4.0, present={"img": one})
    assert cl == {} and al == {}  # one pair has no negatives: the modality adds nothing


# ---------------------------------------------------------------------------------------------
# --distill_direction joint_teacher, --loss_weighting uncertainty, --club random_pair
# ---------------------------------------------------------------------------------------------


def test_joint_teacher_distils_the_detached_fused_distribution_into_the_modality():
    torch.manual_seed(2)
    b = 5
    f1, f2 = torch.randn(b, 2 * D, requires_grad=True), torch.randn(b, 2 * D, requires_grad=True)
    u1, u2 = torch.randn(b, D, requires_grad=True), torch.randn(b, D, requires_grad=True)
    _, _, al = batch_alignment_losses(f1, f2, {"m": u1}, {"m": u2}, 0.1, 4.0, unimodal_cl=False,
                                      joint_teacher=True)
    (t12, t21), (s12, s21) = alignment_log_probs(f1, f2, 4.0), alignment_log_probs(u1, u2, 4.0)

    def kl(p, q):  # rows may hold -inf (self excluded): 0 * log 0 = 0
        return torch.where(p > -torch.inf, p.exp() * (p - q), torch.zeros_like(p)).sum(1)

    ref = (kl(t12, s12) + kl(t21, s21)).mean()
    torch.testing.assert_close(al["m"], ref)
    al["m"].backward()
    assert u1.grad is not None and u1.grad.abs().sum() > 0
    assert f1.grad is None  # the fused teacher is detached


def test_uncertainty_weights_equal_hand_computation():
    w = UncertaintyWeights(("a", "b", "c"))
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.5, -1.0, 2.0]))
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(3.0), "c": 0.0}  # c: no pair had it this epoch
    expected = np.exp(-0.5) * 2 + 0.5 + np.exp(1.0) * 3 - 1.0
    assert float(w(losses).detach()) == pytest.approx(expected)
    total = total_loss(torch.tensor(1.0), losses, torch.tensor(0.0), {}, 0.5, 0.1, 1e-4, combine_cl=w)
    assert float(total.detach()) == pytest.approx(1.0 + 0.5 * expected)


def test_club_random_pair_is_the_bound_of_that_pair_alone():
    club = _club()
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    pairs = random_expert_pairs(["image"], 3, torch.Generator().manual_seed(5))
    a, b = pairs["image"]
    assert a != b
    q = club.q["image"]
    ref = 0.0
    for i in range(4):  # Eq. 9 for the pair (a, b): log Q(h_b^i | h_a^i) - mean_{i' != i} log Q(h_b^i' | h_a^i)
        mu, logvar = q(y[i, a][None])
        pos = _log_gauss(y[i, b], mu[0], logvar[0])
        neg = sum(_log_gauss(y[j, b], mu[0], logvar[0]) for j in range(4) if j != i) / 3
        ref += (pos - neg) / 4
    assert float(club({"image": y}, pairs).detach()) == pytest.approx(ref, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# --curriculum
# ---------------------------------------------------------------------------------------------


class _FixedEmbedder:
    """Stands in for HUMEA in curriculum_pairs: fixed fused embeddings by entity id."""

    def __init__(self, table):
        self.table = table

    def embed(self, ids, inputs):
        class Out:
            fused = self.table[torch.as_tensor(ids)]
        return Out


def test_curriculum_follows_each_pair_by_its_nearest_other_pairs():
    # Left entities 0..4 on a line (1-d embeddings as angles), right entities 10..14.
    angles = torch.tensor([0.0, 0.1, 0.25, 1.2, 1.3])
    table = torch.zeros(20, 2)
    table[:5] = torch.stack([angles.cos(), angles.sin()], 1)
    pairs = np.array([[i, 10 + i] for i in range(5)])
    out = curriculum_pairs(_FixedEmbedder(table), None, pairs, 2, torch.Generator().manual_seed(0))
    groups = out.reshape(5, 3, 2)
    nearest = {0: {1, 2}, 1: {0, 2}, 2: {1, 0}, 3: {4, 2}, 4: {3, 2}}
    assert sorted(groups[:, 0, 0].tolist()) == [0, 1, 2, 3, 4]  # every pair leads one group
    for g in groups:
        assert set(g[1:, 0].tolist()) == nearest[int(g[0, 0])]  # its nearest others, never itself
        assert (g[:, 1] == g[:, 0] + 10).all()  # whole pairs travel together


def test_curriculum_run_rebuilds_the_groups_every_50_epochs(tiny_synthetic, tmp_path, monkeypatch):
    calls = []
    real = train.curriculum_pairs

    def spy(model, inputs, pairs, k, gen, chunk=4096):
        calls.append(k)
        return real(model, inputs, pairs, k, gen, chunk)

    monkeypatch.setattr(train, "curriculum_pairs", spy)
    args = ["--file_dir", str(tiny_synthetic), "--out_dir", str(tmp_path), "--run_name", "cur", "--device", "cpu",
            "--epochs", "120", "--check_point", "60", "--hidden_units", "8,8,8", "--curriculum", "--bsize", "8"]
    assert train.cli(args) == 0
    assert calls == [5, 4, 3]  # epochs 1, 51, 101


# ---------------------------------------------------------------------------------------------
# --preset
# ---------------------------------------------------------------------------------------------


def test_preset_official_sets_every_departure_and_flags_beside_it_win():
    cfg = parse_args(["--preset", "official"]).cfg
    for name, value in PRESETS["official"].items():
        assert getattr(cfg, name) == value, name
    assert cfg.preset == "official"
    cfg = parse_args(["--preset", "official", "--router", "entity", "--no-curriculum"]).cfg
    assert cfg.router == "entity" and not cfg.curriculum and cfg.expert == "linear"
    assert parse_args([]) == (Config(), False, 0, False)  # the paper preset is the defaults
    with pytest.raises(DataError, match="--preset must be one of"):
        Config.from_preset("unknown")
    with pytest.raises(DataError, match="--router must be one of"):
        _cfg(router="per_entity")


def test_official_preset_trains_on_the_tiny_pair(tiny_synthetic, tmp_path):
    args = ["--file_dir", str(tiny_synthetic), "--out_dir", str(tmp_path), "--run_name", "off", "--device", "cpu",
            "--epochs", "20", "--check_point", "10", "--hidden_units", "8,8,8", "--preset", "official",
            "--bsize", "8"]
    res = train.main(*parse_args(args))
    assert res["config"]["preset"] == "official" and res["config"]["expert"] == "linear"
    assert res["last_epoch"]["test"]["avg"]["hits@1"] > 0.1  # chance is 1/32


# ---------------------------------------------------------------------------------------------
# The modality-health monitor
# ---------------------------------------------------------------------------------------------


def test_health_flags_a_collapsed_modality_and_a_negligible_weight():
    class Emb:
        pass

    emb = Emb()
    n = 6
    g = torch.Generator().manual_seed(0)
    emb.unimodal = {"graph": F.normalize(torch.ones(n, 4) + 0.01 * torch.randn(n, 4, generator=g), dim=1),
                    "text": F.normalize(torch.randn(n, 4, generator=g), dim=1)}
    emb.weights = torch.tensor([[0.995, 0.005]] * n)
    emb.fused = torch.zeros(n, 8)
    emb.present = None
    h = modality_health(("graph", "text"), emb, np.arange(n))
    s = emb.unimodal["text"] @ emb.unimodal["text"].t()
    assert h["cosine"]["text"] == pytest.approx(float((s.sum() - s.trace()) / (n * n - n)), abs=1e-4)
    assert h["cosine"]["graph"] > 0.99 and h["weight"] == {"graph": 0.995, "text": 0.005}
    warnings = health_warnings(h)
    assert len(warnings) == 2
    assert "graph has collapsed" in warnings[0] and "text has a negligible weight" in warnings[1]


def test_a_training_loss_that_jumps_between_evaluations_is_flagged_and_a_normal_wobble_is_not():
    """Seed 43's late spike (46.7 at epoch 970, 67.0 at 980) is flagged; the largest rise of the runs
    without one (x1.03), a falling loss, epoch 0 (no loss) and the first evaluation are not."""
    spike = loss_spike_warning({"epoch": 970, "loss": 46.7}, {"epoch": 980, "loss": 67.0})
    assert spike is not None
    assert "from 46.7 at epoch 970 to 67" in spike
    assert "x1.43" in spike
    assert loss_spike_warning({"epoch": 650, "loss": 50.0}, {"epoch": 660, "loss": 50.0 * 1.03}) is None
    assert loss_spike_warning({"epoch": 10, "loss": 150.0}, {"epoch": 20, "loss": 120.0}) is None
    assert loss_spike_warning({"epoch": 0}, {"epoch": 10, "loss": 150.0}) is None
    assert loss_spike_warning(None, {"epoch": 10, "loss": 150.0}) is None
    just_over = loss_spike_warning({"epoch": 10, "loss": 100.0}, {"epoch": 20, "loss": 100.0 * LOSS_SPIKE + 0.01})
    assert just_over is not None


def test_modality_hits_ranks_each_sample_within_itself():
    """A modality that maps both sides of a pair to the same vector scores 1 on every sample; one that
    swaps two of the training pairs' right entities scores 0.5 there and 1 on the test pairs."""
    n = 8
    base = F.normalize(torch.randn(n, 6, generator=torch.Generator().manual_seed(1)), dim=1)
    ids = np.arange(2 * n)
    same = torch.cat([base, base])  # entity i and n + i share a vector
    swapped = same.clone()
    swapped[[n, n + 1]] = swapped[[n + 1, n]]  # training pairs (0, n) and (1, n + 1) point at each other's

    class Model:
        modalities = ("a", "b")

        def embed(self, got, inputs):
            assert np.array_equal(got, ids)  # one embedding pass over every sample's entities
            emb = type("E", (), {})()
            emb.unimodal, emb.fused = {"a": same, "b": swapped}, torch.cat([same, swapped], 1)
            return emb

    samples = {"train": np.stack([np.arange(4), np.arange(4) + n], 1),
               "test": np.stack([np.arange(4, n), np.arange(4, n) + n], 1)}
    cfg = type("C", (), {"csls_k": 3, "csls": False, "eval_chunk": 64})()
    out = train.modality_hits(Model(), None, samples, cfg)
    assert out["test"] == {"a": 1.0, "b": 1.0, "fused": 1.0}
    assert out["train"]["a"] == 1.0 and out["train"]["b"] == 0.5


def test_health_is_recorded_from_epoch_0(tiny_synthetic, tmp_path):
    args = ["--file_dir", str(tiny_synthetic), "--out_dir", str(tmp_path), "--run_name", "h", "--device", "cpu",
            "--epochs", "10", "--check_point", "10", "--hidden_units", "8,8,8"]
    train.main(*parse_args(args))
    import json

    rows = [json.loads(line) for line in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 10]
    for r in rows:
        assert set(r["health"]["cosine"]) == set(r["health"]["weight"]) and len(r["health"]["cosine"]) == 6
        assert all(-1 <= c <= 1 for c in r["health"]["cosine"].values())
        hits = r["health"]["hits1"]
        assert set(hits) == {"test", "train"} and set(hits["test"]) == set(r["health"]["cosine"]) | {"fused"}
        assert all(0 <= v <= 1 for split in hits.values() for v in split.values())
    log = (tmp_path / "h" / "log.txt").read_text()
    assert "health graph:cos=" in log and "training pairs graph=" in log


# ---------------------------------------------------------------------------------------------
# The paper preset's own choices: router balance, Graph-MoE residual
# ---------------------------------------------------------------------------------------------


def test_router_imbalance_is_the_mean_kl_to_uniform_over_the_present_modalities():
    w = torch.tensor([[0.5, 0.25, 0.25], [0.6, 0.4, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    present = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    kl = [0.5 * np.log(0.5 * 3) + 2 * 0.25 * np.log(0.25 * 3), 0.6 * np.log(0.6 * 2) + 0.4 * np.log(0.4 * 2), 0.0]
    assert float(train.router_imbalance(w, present)) == pytest.approx(np.mean(kl), abs=1e-6)
    assert float(train.router_imbalance(w[[0, 2]], None)) == pytest.approx(np.mean([kl[0], 0.0]), abs=1e-6)


def test_router_balance_pulls_a_collapsed_router_back_towards_uniform(tiny_data):
    inputs = ModelInputs.from_data(tiny_data, "cpu")
    torch.manual_seed(0)
    model = HUMEA(ModelConfig.from_config(_cfg()), inputs)
    with torch.no_grad():
        model.fusion.net.bias.copy_(torch.tensor([4.0, 0, 0, 0, 0, 0]))  # collapsed onto the graph
    out = model(torch.arange(20), inputs)
    before = float(train.router_imbalance(out.weights, out.present).detach())
    opt = torch.optim.SGD(model.fusion.parameters(), lr=0.5)
    for _ in range(20):
        out = model(torch.arange(20), inputs)
        loss = train.router_imbalance(out.weights, out.present)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.2 * before


def test_graph_residual_adds_the_normalised_input_to_the_mixture():
    torch.manual_seed(4)
    moe = IntraModalMoE(D, D, D, 3, residual=True).double()
    x = torch.randn(5, D, dtype=torch.float64) * 0.01
    mixed, experts, gate = moe(x)
    torch.testing.assert_close(mixed, F.layer_norm(x, (D,)) + torch.einsum("bk,bkd->bd", gate, experts))
    with pytest.raises(ValueError, match="equal input and output sizes"):
        IntraModalMoE(D + 1, D, D, 3, residual=True)


def test_a_balance_term_that_reaches_the_router_only_leaves_every_other_gradient_at_zero(tiny_data):
    """--router_balance_reach router: the same balance value and the same router gradient, but nothing for
    the experts or the entity table (with all, the default, the term reaches them through the router's input)."""
    inputs = ModelInputs.from_data(tiny_data, "cpu")
    grads = {}
    for reach in ("all", "router"):
        cfg = _cfg(router_balance_reach=reach)
        torch.manual_seed(0)
        model = HUMEA(ModelConfig.from_config(cfg), inputs)
        with torch.no_grad():
            for p in model.fusion.parameters():  # a router that is not uniform, so the term has a gradient
                p.copy_(torch.randn_like(p) * 0.5)
        out = model(torch.arange(30), inputs)
        value = train.balance_term(model, out, cfg)
        value.backward()
        grads[reach] = (float(value.detach()), {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                                                for n, p in model.named_parameters()})
    (v_all, g_all), (v_router, g_router) = grads["all"], grads["router"]
    assert v_router == v_all > 0
    router_names = [n for n in g_all if n.startswith("fusion.")]
    assert router_names
    for n in router_names:
        torch.testing.assert_close(g_router[n], g_all[n])
    others = [n for n in g_all if not n.startswith("fusion.")]
    assert sum(float(g_all[n].norm()) for n in others) > 0  # the default reaches the experts and the table
    assert all(float(g_router[n].norm()) == 0 for n in others)
    table = [n for n in others if g_all[n].shape[0] == tiny_data.num_entities]
    assert table and float(g_all[table[0]].norm()) > 0
