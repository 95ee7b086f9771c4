"""HUMEA on a tiny synthetic KG pair: row independence, ablation switches, a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_process.dataset import split_links
from layers import InterModalRouter, IntraModalMoE, LinearProjection, UniformFusion
from loss import CLUBDisentanglement, contrastive_alignment_loss, total_loss, unimodal_distillation_loss
from model import HUMEA, ModelConfig, ModelInputs
from train import clip_gradient, loss_batches, parameter_groups, train_epoch
from utils import MODALITIES, Config, DataError, evaluate_alignment

D = 16


def _cfg(**kw) -> Config:
    # No expert dropout: these tests compare computations row by row and step by step, which random
    # dropout masks would make differ (tests/test_layers.py checks the dropout itself).
    base = dict(hidden_units=f"{D},{D},{D}", heads="2,2", n_exp=3, bsize=64, lr=5e-3, seed=0, device="cpu",
                expert_dropout=0.0)
    cfg = Config(**{**base, **kw})
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def inputs(tiny_data) -> ModelInputs:
    return ModelInputs.from_data(tiny_data, "cpu")


def _model(cfg, inputs) -> HUMEA:
    torch.manual_seed(cfg.seed)
    return HUMEA(ModelConfig.from_config(cfg), inputs)


def test_all_six_modalities_in_canonical_order(inputs):
    model = _model(_cfg(), inputs)
    assert model.modalities == MODALITIES
    assert tuple(model.experts.keys()) == MODALITIES
    assert all(isinstance(e, IntraModalMoE) for e in model.experts.values())
    assert isinstance(model.fusion, InterModalRouter)


@pytest.mark.parametrize("training", [True, False])
def test_subset_rows_equal_rows_of_the_full_computation(inputs, training):
    """Experts, gates and the router act on one entity at a time: computing them only for the
    training entities (as train_epoch does) gives the same rows as the full (N, .) computation."""
    model = _model(_cfg(), inputs)
    model.train(training)
    n = inputs.num_entities
    full = model(torch.arange(n), inputs)
    ids = torch.tensor([7, 0, 93, 41, 41, n - 1])
    sub = model(ids, inputs)
    for m in model.modalities:
        torch.testing.assert_close(sub.unimodal[m], full.unimodal[m][ids])
        torch.testing.assert_close(sub.experts[m], full.experts[m][ids])
        torch.testing.assert_close(sub.gates[m], full.gates[m][ids])
        torch.testing.assert_close(sub.unimodal[m].norm(dim=1), torch.ones(len(ids)))
    torch.testing.assert_close(sub.weights, full.weights[ids])
    torch.testing.assert_close(sub.fused, full.fused[ids])
    assert sub.fused.shape == (len(ids), len(model.modalities) * D)
    torch.testing.assert_close(sub.weights.sum(1), torch.ones(len(ids)))
    # And model.embed (evaluation mode, in chunks) gives the evaluation-mode rows.
    model.eval()
    ref = model(torch.arange(n), inputs)
    model.train(training)
    emb = model.embed(np.arange(n), inputs, chunk=7)
    torch.testing.assert_close(emb.fused, ref.fused)
    assert model.training == training  # embed restores the mode


def test_without_modalities_removes_their_branches(inputs):
    model = _model(_cfg(without="image,rel_text"), inputs)
    kept = ("graph", "rel_bow", "attr_bow", "attr_text")
    assert model.modalities == kept
    assert tuple(model.experts.keys()) == kept
    out = model(torch.arange(5), inputs)
    assert set(out.unimodal) == set(kept) and out.weights.shape == (5, 4) and out.fused.shape == (5, 4 * D)
    assert not any(name.startswith(("experts.image", "experts.rel_text")) for name, _ in model.named_parameters())
    # Aliases work too, and switching the graph off drops the GAT.
    no_graph = _model(_cfg(without="g,v"), inputs)
    assert "graph" not in no_graph.modalities and "image" not in no_graph.modalities
    assert not hasattr(no_graph, "graph_encoder")
    assert no_graph.graph_embeddings(inputs) is None
    with pytest.raises(ValueError, match="every modality is switched off"):
        _model(_cfg(without=",".join(MODALITIES)), inputs)


def test_without_hmoe_uses_linear_layers_and_uniform_fusion(inputs):
    model = _model(_cfg(without="hmoe"), inputs)
    assert model.modalities == MODALITIES
    assert all(isinstance(e, LinearProjection) for e in model.experts.values())
    assert isinstance(model.fusion, UniformFusion)
    out = model(torch.arange(9), inputs)
    m = len(MODALITIES)
    torch.testing.assert_close(out.weights, torch.full((9, m), 1.0 / m))
    torch.testing.assert_close(out.fused, torch.cat([out.unimodal[k] for k in MODALITIES], 1) / m)
    assert all(e.shape == (9, 1, D) for e in out.experts.values())
    # The linear layers read the input as the experts would: layer-normalised under the paper preset,
    # raw under --moe_input_norm none (the official preset's).
    assert all(e.input_norm for e in model.experts.values())
    raw = _model(_cfg(without="hmoe", moe_input_norm="none"), inputs)
    assert not any(e.input_norm for e in raw.experts.values())


def _pair_similarity(model, inputs, pairs) -> tuple[float, float]:
    """Mean cosine of the fused embeddings of the seed pairs, and that minus the mean cosine of
    the non-matching (left, right) combinations of the same entities."""
    ids = np.unique(pairs)
    emb = F.normalize(model.embed(ids, inputs).fused, dim=1)
    row = {e: i for i, e in enumerate(ids.tolist())}
    sim = emb[[row[e] for e in pairs[:, 0]]] @ emb[[row[e] for e in pairs[:, 1]]].t()  # (P, P)
    p = len(pairs)
    pos = float(sim.diagonal().mean())
    neg = float((sim.sum() - sim.diagonal().sum()) / (p * p - p))
    return pos, pos - neg


def test_train_epoch_lowers_loss_and_raises_seed_pair_similarity(tiny_data, inputs):
    """30 epochs of train_epoch (all losses, CLUB on). The synthetic features share a common
    offset, so every fused cosine starts near 0.9: the property that must grow is the seed pairs'
    similarity relative to the non-matching pairs, and with it their Hits@1."""
    cfg = _cfg(bsize=16)  # 20 training pairs -> two batches per epoch
    torch.manual_seed(0)
    model = HUMEA(ModelConfig.from_config(cfg), inputs)
    club = CLUBDisentanglement(model.modalities, D, D)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    q_opt = torch.optim.AdamW(club.parameters(), lr=cfg.q_lr)
    gen = torch.Generator().manual_seed(0)
    train = split_links(tiny_data.links, 0.5, seed=0).train
    assert len(train) == 20

    def hits1():
        ids = np.unique(train)
        return evaluate_alignment(model.embed(ids, inputs).fused, train, ids=ids)["avg"]["hits@1"]

    pos_before, gap_before = _pair_similarity(model, inputs, train)
    hits_before = hits1()
    losses = []
    for epoch in range(30):
        terms = train_epoch(model, club, inputs, train, cfg, gen, opt, q_opt, epoch)
        losses.append(terms["loss"])
    assert set(terms) >= {"loss", "fused_cl", "uni_cl", "distill", "club", "club_q_nll"}
    assert all(np.isfinite(v) for v in terms.values())
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    pos_after, gap_after = _pair_similarity(model, inputs, train)
    assert gap_after > gap_before + 0.4, (gap_before, gap_after)
    assert pos_after > 0.8  # the seed pairs stay close while the rest is pushed apart
    assert hits1() > hits_before + 0.3
    assert all(p.requires_grad for p in club.parameters())  # train_epoch hands Q back trainable


class _RecordingOptimiser:
    """Stands in for the optimiser: keeps the gradients of one step and changes nothing."""

    def __init__(self, model):
        self.named = list(model.named_parameters())

    def zero_grad(self, set_to_none=True):
        for _, p in self.named:
            p.grad = None

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.named if p.grad is not None}


@pytest.mark.parametrize("without", ["", "cl", "al"])
def test_train_epoch_equals_the_per_batch_per_equation_loop(tiny_data, inputs, without):
    """train_epoch's fast path (experts on the training entities only, one gather of all batch
    rows, shared cosine matrices per batch) gives the same loss terms and the same gradient for
    every parameter as the plain loop: all N entities forward, then Eq. 13-16 batch by batch."""
    cfg = _cfg(bsize=8, without=without)  # 20 training pairs -> batches of 8, 8 and 4
    model = _model(cfg, inputs)
    train = split_links(tiny_data.links, 0.5, seed=0).train
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    rec = _RecordingOptimiser(model)
    terms = train_epoch(model, None, inputs, train, cfg, gen, rec, None, 1)

    gen.set_state(state)
    out = model(torch.arange(inputs.num_entities), inputs)
    fused_cl, uni_cl, distill = 0.0, {}, {}
    masked = 0
    for batch in loss_batches(train, cfg.bsize, gen):
        r1, r2 = torch.as_tensor(batch[:, 0]), torch.as_tensor(batch[:, 1])
        z1, z2 = out.fused[r1], out.fused[r2]
        fused_cl = fused_cl + contrastive_alignment_loss(z1, z2, cfg.tau_cl)
        for j, m in enumerate(model.modalities):
            keep = out.present[r1, j] & out.present[r2, j]  # --missing mask: pairs that both have m
            masked += int((~keep).sum())
            u1, u2, f1, f2 = out.unimodal[m][r1][keep], out.unimodal[m][r2][keep], z1[keep], z2[keep]
            if cfg.switches.use_cl:
                uni_cl[m] = uni_cl.get(m, 0.0) + contrastive_alignment_loss(u1, u2, cfg.tau_cl)
            if cfg.switches.use_al:
                distill[m] = distill.get(m, 0.0) + unimodal_distillation_loss(u1, u2, f1, f2, cfg.tau_al)
    assert masked > 0  # the tiny pair lacks some images: the masked path is exercised
    total = total_loss(fused_cl, uni_cl, torch.zeros(()), distill, cfg.cl_loss, cfg.al_loss, cfg.mi_loss)
    model.zero_grad(set_to_none=True)
    total.backward()
    fused_cl, total = fused_cl.detach(), total.detach()
    uni_cl = {m: v.detach() for m, v in uni_cl.items()}
    distill = {m: v.detach() for m, v in distill.items()}

    assert terms["fused_cl"] == pytest.approx(float(fused_cl), rel=1e-5)
    assert terms["uni_cl"] == pytest.approx(float(sum(uni_cl.values(), 0.0)), rel=1e-5, abs=1e-7)
    assert terms["distill"] == pytest.approx(float(sum(distill.values(), 0.0)), rel=1e-5, abs=1e-7)
    assert terms["loss"] == pytest.approx(float(total), rel=1e-5)
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(rec.grads) == set(ref) and len(ref) > 10
    for name, grad in ref.items():
        torch.testing.assert_close(rec.grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_epoch_logs_the_gradient_norm_and_grad_clip_caps_it(tiny_data, inputs):
    """grad_norm is the global L2 norm of the gradient the loss gives; without --grad_clip the step
    gets that gradient unchanged, with --grad_clip c it gets the same direction rescaled to norm c."""
    train = split_links(tiny_data.links, 0.5, seed=0).train
    steps = {}
    for clip in (0.0, 0.5):
        cfg = _cfg(bsize=8, grad_clip=clip)
        model = _model(cfg, inputs)
        rec = _RecordingOptimiser(model)
        terms = train_epoch(model, None, inputs, train, cfg, torch.Generator().manual_seed(3), rec, None, 1)
        flat = torch.cat([g.flatten() for _, g in sorted(rec.grads.items())])
        steps[clip] = terms["grad_norm"], flat
    norm, unclipped = steps[0.0]
    assert norm == pytest.approx(float(unclipped.norm()), rel=1e-5)
    assert norm > 1.0  # so that a clip at 0.5 changes something
    same_norm, clipped = steps[0.5]
    assert same_norm == pytest.approx(norm, rel=1e-5)  # logged before clipping
    assert float(clipped.norm()) == pytest.approx(0.5, rel=1e-4)
    torch.testing.assert_close(clipped, unclipped * (0.5 / norm), rtol=1e-4, atol=1e-7)


def test_entity_lr_gives_the_entity_table_alone_its_own_rate(tiny_data, inputs):
    """--entity_lr puts e^g in an AdamW group of its own: with a rate of 1e-12 one step leaves it (all
    but) where it was while every other parameter moves as at --lr; 0 keeps the single group."""
    pairs = split_links(tiny_data.links, 0.5, seed=0).train
    moved = {}
    for entity_lr in (0.0, 1e-12):
        cfg = _cfg(bsize=8, entity_lr=entity_lr)
        model = _model(cfg, inputs)
        groups = parameter_groups(model, cfg)
        assert len(groups) == (1 if entity_lr == 0 else 2)
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_epoch(model, None, inputs, pairs, cfg, torch.Generator().manual_seed(3), opt, None, 1)
        moved[entity_lr] = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    table = "graph_encoder.entity.weight"
    assert moved[0.0][table] > 1e-4
    assert moved[1e-12][table] < 1e-10
    for name, step in moved[0.0].items():
        if name != table:
            assert moved[1e-12][name] == pytest.approx(step, rel=1e-5, abs=1e-9), name


def test_entity_lr_needs_the_graph(tiny_data, inputs):
    cfg = _cfg(entity_lr=1e-4, without="graph")
    with pytest.raises(DataError, match="--entity_lr"):
        parameter_groups(_model(cfg, inputs), cfg)
    with pytest.raises(DataError, match="--entity_lr must be >= 0"):
        _cfg(entity_lr=-1.0)


def test_gradient_norm_does_not_overflow_and_never_touches_an_unclipped_gradient():
    """Under --preset official the first step's gradient reaches ~4e23 (linear experts' centres of
    entities without attributes; test_options.py has the mechanism): its float32 norm would overflow
    to inf, and an inf norm once turned the gradient into NaN. The norm is summed in float64, and
    without --grad_clip nothing changes."""
    layer = torch.nn.Linear(2, 1, bias=False)
    layer.weight.grad = torch.tensor([[3e30, 4e30]])
    assert clip_gradient(layer, 0.0) == pytest.approx(5e30, rel=1e-6)
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[3e30, 4e30]]), rtol=0, atol=0)
    assert clip_gradient(layer, 1.0) == pytest.approx(5e30, rel=1e-6)
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[0.6, 0.8]]))
