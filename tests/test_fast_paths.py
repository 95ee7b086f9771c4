"""The speed-ups of issue 4 compute exactly what the straightforward code computes.

Each fast path is checked against the plain per-equation or full-graph computation on tiny
inputs: shared cosine matrices in the losses, the GAT restricted to the rows the losses read,
the column-blocked sparse product, the one-matrix evaluation (kept or recomputed) and the
optional bf16 autocast of the experts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import directional_ranks, mean_topk_similarity

import layers
import utils
from layers import GraphStructureEncoder, SparseGraph
from loss import batch_alignment_losses, contrastive_alignment_loss, unimodal_distillation_loss
from model import HUMEA, ModelConfig, ModelInputs
from utils import Config, evaluate_alignment, mutual_nearest_pairs

# ---------------------------------------------------------------------------------------------
# Eq. 13-16: one batch with shared cosine matrices == the per-equation functions.
# ---------------------------------------------------------------------------------------------


def _batch(seed=0, b=6, d=4, mods=("graph", "image", "rel_bow")):
    g = torch.Generator().manual_seed(seed)
    uni1 = {m: torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True) for m in mods}
    uni2 = {m: torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True) for m in mods}
    z1 = torch.cat([uni1[m] for m in mods], 1) * 0.7  # fused rows that depend on the unimodal ones
    z2 = torch.cat([uni2[m] for m in mods], 1) + 0.1
    return uni1, uni2, z1, z2


def _grads(total, tensors):
    return torch.autograd.grad(total, tensors, retain_graph=True, allow_unused=True)


@pytest.mark.parametrize("cl,al", [(True, True), (True, False), (False, True), (False, False)])
def test_batch_alignment_losses_equal_the_per_equation_functions(cl, al):
    uni1, uni2, z1, z2 = _batch()
    f_cl, m_cl, m_al = batch_alignment_losses(z1, z2, uni1, uni2, 0.1, 4.0, unimodal_cl=cl, distill=al)
    ref_f = contrastive_alignment_loss(z1, z2, 0.1)
    ref_cl = {m: contrastive_alignment_loss(uni1[m], uni2[m], 0.1) for m in uni1} if cl else {}
    ref_al = {m: unimodal_distillation_loss(uni1[m], uni2[m], z1, z2, 4.0) for m in uni1} if al else {}
    assert set(m_cl) == set(ref_cl) and set(m_al) == set(ref_al)
    torch.testing.assert_close(f_cl, ref_f, rtol=0, atol=1e-12)
    for m in ref_cl:
        torch.testing.assert_close(m_cl[m], ref_cl[m], rtol=0, atol=1e-12)
    for m in ref_al:
        torch.testing.assert_close(m_al[m], ref_al[m], rtol=0, atol=1e-12)
    # Same gradients for every input, through the shared matrices (the teacher gets none).
    leaves = [*uni1.values(), *uni2.values()]
    total = f_cl + sum(m_cl.values(), 0.0) + 0.1 * sum(m_al.values(), 0.0)
    ref_total = ref_f + sum(ref_cl.values(), 0.0) + 0.1 * sum(ref_al.values(), 0.0)
    for got, ref in zip(_grads(total, leaves), _grads(ref_total, leaves)):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Eq. 1 on the receptive field of some rows == the full-graph rows.
# ---------------------------------------------------------------------------------------------


def _random_graph(n=40, triples=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = torch.randint(0, n - 3, (triples,), generator=g)  # the last three nodes stay isolated
    tails = torch.randint(0, n - 3, (triples,), generator=g)
    return SparseGraph.undirected_with_self_loops(heads, tails, n)


@pytest.mark.parametrize("layers_", [1, 2, 3])
def test_gat_on_receptive_blocks_equals_full_rows_and_gradients(layers_):
    graph = _random_graph()
    torch.manual_seed(0)
    enc = GraphStructureEncoder(graph.num_nodes, 6, heads=2, layers=layers_).double()
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.5)
    targets = torch.tensor([5, 0, 39, 17, 5, 22])  # duplicates, an isolated node (39)
    uniq = torch.unique(targets)
    full = enc(graph)
    ref_grads = _grads(full[uniq].pow(2).sum(), list(enc.parameters()))
    part = enc(graph, targets)
    assert part.shape == (len(uniq), 6)
    torch.testing.assert_close(part, full[uniq], rtol=0, atol=1e-12)
    for got, ref in zip(_grads(part.pow(2).sum(), list(enc.parameters())), ref_grads):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_receptive_blocks_hold_exactly_the_edges_into_each_row_set():
    graph = _random_graph(seed=1)
    targets = torch.tensor([3, 8, 8, 30])
    nodes, blocks = graph.receptive_blocks(targets, 2)
    assert blocks[-1].num_nodes == 3  # the distinct targets
    out_rows = torch.unique(targets)
    for block in reversed(blocks):
        in_rows = nodes if block is blocks[0] else None
        into = torch.isin(graph.dst, out_rows)
        assert block.num_edges == int(into.sum())
        # The same edges, renumbered; the sources of a block are the targets of the previous one.
        sources = torch.unique(torch.cat([graph.src[into], out_rows]))
        got = {(int(sources[s]), int(out_rows[d])) for s, d in zip(block.src, block.dst)}
        assert got == set(zip(graph.src[into].tolist(), graph.dst[into].tolist()))
        assert torch.equal(sources[block.dst_in_src], out_rows)
        if in_rows is not None:
            assert torch.equal(in_rows, sources)
        out_rows = sources
    # The last result is kept for the same rows (any order, duplicates) and rebuilt for others.
    assert graph.receptive_blocks(torch.tensor([30, 8, 3]), 2)[1] is blocks
    assert graph.receptive_blocks(torch.tensor([3, 8]), 2)[1][-1].num_nodes == 2
    assert graph.receptive_blocks(torch.tensor([3, 8]), 1)[1][-1].num_nodes == 2
    # A directed graph without self loops: the targets are added to the sources they need.
    d = SparseGraph(torch.tensor([0, 2, 2, 1]), torch.tensor([1, 1, 0, 3]), 4)
    nodes, (block,) = d.receptive_blocks(torch.tensor([1, 3]), 1)
    assert nodes.tolist() == [0, 1, 2, 3] and block.num_nodes == 2
    with pytest.raises(ValueError, match="full graph"):
        block.receptive_blocks(torch.tensor([0]), 1)


def test_column_blocked_spmm_equals_one_product(monkeypatch):
    graph = _random_graph(seed=2)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(graph.num_edges, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(graph.num_nodes, 50, dtype=torch.float64, generator=g, requires_grad=True)
    ref = graph.spmm(w, x)
    ref_grads = _grads(ref.pow(2).sum(), [w, x])
    monkeypatch.setattr(layers, "_CPU_BLOCK_BYTES", 1)  # 16-column blocks: 4 blocks of 50 columns
    got = graph.spmm(w, x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    for a, b in zip(_grads(got.pow(2).sum(), [w, x]), ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Evaluation: one kept matrix == recomputed blocks == the per-direction reference functions.
# ---------------------------------------------------------------------------------------------


def _case(seed, n=60, d=5, n_pairs=25):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    left = rng.choice(n // 2, n_pairs, replace=False)
    right = n // 2 + rng.choice(n // 2, n_pairs, replace=False)
    pairs = np.stack([left, right], 1)
    pairs = np.concatenate([pairs, [[left[0], right[1]], [left[2], right[3]]]])  # two gold counterparts
    emb[right[:10]] = emb[left[:10]] + 0.4 * rng.normal(size=(10, d)).astype(np.float32)
    emb[right[11]] = emb[right[12]]  # an exact tie between two candidates
    return torch.from_numpy(emb), pairs


def _per_direction(emb, pairs, k, csls):
    """The four-matmul computation: r terms and ranks of each direction on their own."""
    e = torch.nn.functional.normalize(emb, dim=-1)
    lid, lpos = np.unique(pairs[:, 0], return_inverse=True)
    rid, rpos = np.unique(pairs[:, 1], return_inverse=True)
    left, right = e[lid], e[rid]
    lp, rp = torch.as_tensor(lpos), torch.as_tensor(rpos)
    r_l = mean_topk_similarity(left, right, k, 7) if csls else torch.zeros(len(lid))
    r_r = mean_topk_similarity(right, left, k, 7) if csls else torch.zeros(len(rid))
    l2r = directional_ranks(left[lp], right, rp, r_l[lp], r_r, 7)
    r2l = directional_ranks(right[rp], left, lp, r_r[rp], r_l, 7)
    return utils.rank_metrics(l2r), utils.rank_metrics(r2l)


@pytest.mark.parametrize("csls", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_matrix_evaluation_kept_or_recomputed(monkeypatch, csls, seed):
    emb, pairs = _case(seed)
    kept = evaluate_alignment(emb, pairs, csls_k=3, use_csls=csls, chunk=7, with_predictions=True)
    monkeypatch.setattr(utils, "SIMILARITY_KEEP_ENTRIES", 0)
    again = evaluate_alignment(emb, pairs, csls_k=3, use_csls=csls, chunk=7, with_predictions=True)
    for d in ("l2r", "r2l", "avg"):
        assert kept[d] == again[d]
    for key in ("pred_right", "rank"):
        np.testing.assert_array_equal(kept["predictions"][key], again["predictions"][key])
    ref_l2r, ref_r2l = _per_direction(emb, pairs, 3, csls)
    for metric in ref_l2r:
        assert kept["l2r"][metric] == pytest.approx(ref_l2r[metric], abs=1e-9)
        assert kept["r2l"][metric] == pytest.approx(ref_r2l[metric], abs=1e-9)


def test_one_matrix_slices_smaller_than_a_block(monkeypatch):
    emb, pairs = _case(2)
    ref = evaluate_alignment(emb, pairs, chunk=4096)
    monkeypatch.setattr(utils, "_SLICE_ROWS", 4)  # several slices per block, blocks not multiples of it
    assert evaluate_alignment(emb, pairs, chunk=10) == ref


def test_mutual_nearest_pairs_equals_four_matmul_reference(monkeypatch):
    rng = np.random.default_rng(5)
    left = torch.from_numpy(rng.normal(size=(23, 4)).astype(np.float32))
    right = torch.cat([left[:15] + 0.3 * torch.from_numpy(rng.normal(size=(15, 4)).astype(np.float32)),
                       torch.from_numpy(rng.normal(size=(6, 4)).astype(np.float32))])
    lid, rid = np.arange(23), np.arange(100, 121)
    ln, rn = torch.nn.functional.normalize(left, dim=-1), torch.nn.functional.normalize(right, dim=-1)
    r_l, r_r = mean_topk_similarity(ln, rn, 3, 5), mean_topk_similarity(rn, ln, 3, 5)
    best_r = (2 * ln @ rn.t() - r_l[:, None] - r_r[None]).argmax(1)
    best_l = (2 * rn @ ln.t() - r_r[:, None] - r_l[None]).argmax(1)
    mutual = best_l[best_r] == torch.arange(23)
    ref = {(int(lid[i]), int(rid[best_r[i]])) for i in torch.nonzero(mutual).flatten()}
    got = mutual_nearest_pairs(left, right, lid, rid, csls_k=3, chunk=5)
    assert {tuple(map(int, r)) for r in got} == ref and len(ref) >= 5
    monkeypatch.setattr(utils, "SIMILARITY_KEEP_ENTRIES", 0)
    assert {tuple(map(int, r)) for r in mutual_nearest_pairs(left, right, lid, rid, 3, 5)} == ref


# ---------------------------------------------------------------------------------------------
# Optional bf16 autocast of the experts and the router.
# ---------------------------------------------------------------------------------------------


def test_bf16_autocast_gives_float32_outputs_close_to_float32(tiny_data):
    inputs = ModelInputs.from_data(tiny_data, "cpu")
    cfg = Config(hidden_units="16,16,16", n_exp=3, device="cpu")
    torch.manual_seed(0)
    model = HUMEA(ModelConfig.from_config(cfg), inputs)
    ids = torch.arange(20)
    ref = model(ids, inputs)
    torch.manual_seed(0)
    model = HUMEA(ModelConfig.from_config(Config(hidden_units="16,16,16", n_exp=3, device="cpu", amp="bf16")),
                  inputs)  # --amp bf16
    assert model.amp_dtype == torch.bfloat16
    got = model(ids, inputs)
    for m in model.modalities:
        assert got.unimodal[m].dtype == torch.float32 and got.experts[m].dtype == torch.float32
        torch.testing.assert_close(got.unimodal[m], ref.unimodal[m], rtol=0, atol=0.05)
    assert got.fused.dtype == torch.float32 and got.weights.dtype == torch.float32
    torch.testing.assert_close(got.weights, ref.weights, rtol=0, atol=0.02)
    got.fused.sum().backward()  # gradients flow through the autocast region
    assert model.experts["image"].first.weight.grad is not None


def test_amp_must_be_a_known_dtype():
    with pytest.raises(utils.DataError, match="--amp must be one of none, bf16, got 'fp16'"):
        Config(amp="fp16", device="cpu").validate()
