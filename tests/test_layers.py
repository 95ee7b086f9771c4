"""layers.py against dense or looped references on tiny float64 inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers import (
    DiagonalGraphAttention,
    GraphStructureEncoder,
    InterModalRouter,
    IntraModalMoE,
    LinearProjection,
    ModalityWeights,
    SparseGraph,
    UniformFusion,
    edge_softmax,
)

# A small graph with a duplicated edge, an edge given in both directions, a self loop in the
# data and an isolated node (5).
HEADS = [0, 0, 1, 2, 3, 4, 2]
TAILS = [1, 1, 0, 3, 3, 0, 4]
N = 6


def _edge_set(g: SparseGraph) -> list[tuple[int, int]]:
    return list(zip(g.src.tolist(), g.dst.tolist()))


def _dense_adjacency(heads, tails, n) -> torch.Tensor:
    """adj[i, j] = True when j is a neighbour of i (either direction) or j == i."""
    adj = torch.eye(n, dtype=torch.bool)
    for h, t in zip(heads, tails):
        adj[h, t] = adj[t, h] = True
    return adj


# ---------------------------------------------------------------------------------------------
# SparseGraph, spmm, edge_softmax.
# ---------------------------------------------------------------------------------------------


def test_undirected_with_self_loops_dedupes_and_symmetrises():
    g = SparseGraph.undirected_with_self_loops(HEADS, TAILS, N)
    edges = _edge_set(g)
    assert len(edges) == len(set(edges)), "duplicate edges"
    expected = {(j, i) for i in range(N) for j in range(N) if _dense_adjacency(HEADS, TAILS, N)[i, j]}
    assert set(edges) == expected
    assert g.num_edges == len(expected)
    for s, d in edges:
        assert (d, s) in edges  # both directions
    loops = [s for s, d in edges if s == d]
    assert sorted(loops) == list(range(N))  # exactly one self loop per node, the isolated one included
    # Sorted by target, as the CSR rows need; crow counts the in-degree of each node.
    assert g.dst.tolist() == sorted(g.dst.tolist())
    assert g.crow.tolist()[-1] == g.num_edges
    indeg = torch.bincount(g.dst, minlength=N)
    assert torch.equal(g.crow[1:] - g.crow[:-1], indeg)


def test_spmm_matches_dense_product_and_transposed_layout():
    g = SparseGraph.undirected_with_self_loops(HEADS, TAILS, N)
    torch.manual_seed(0)
    w = torch.rand(g.num_edges, dtype=torch.float64)
    x = torch.randn(N, 4, dtype=torch.float64)
    dense = torch.zeros(N, N, dtype=torch.float64)
    dense[g.dst, g.src] = w
    torch.testing.assert_close(g.spmm(w, x), dense @ x)
    # The transposed CSR holds the same edges.
    assert torch.equal(g.dst[g.t_perm], g.t_col)
    assert g.src[g.t_perm].tolist() == sorted(g.src.tolist())


def test_spmm_gradcheck():
    g = SparseGraph.undirected_with_self_loops(HEADS, TAILS, N)
    torch.manual_seed(1)
    w = torch.rand(g.num_edges, dtype=torch.float64, requires_grad=True)
    x = torch.randn(N, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, x: g.spmm(w, x), (w, x))
    # And on a directed graph whose transposed layout differs from the forward one.
    d = SparseGraph(torch.tensor([0, 2, 2, 1, 3]), torch.tensor([1, 1, 0, 3, 3]), 4)
    w = torch.rand(d.num_edges, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, x: d.spmm(w, x), (w, x))


def test_edge_softmax_sums_to_one_per_target():
    g = SparseGraph.undirected_with_self_loops(HEADS, TAILS, N)
    torch.manual_seed(2)
    scores = torch.randn(g.num_edges, dtype=torch.float64) * 30  # large: the max-shift must work
    a = edge_softmax(scores, g)
    assert (a > 0).all()
    sums = torch.zeros(N, dtype=torch.float64).index_add(0, g.dst, a)
    torch.testing.assert_close(sums, torch.ones(N, dtype=torch.float64))
    # Equal to a per-node softmax of that node's incoming scores.
    for i in range(N):
        mask = g.dst == i
        torch.testing.assert_close(a[mask], torch.softmax(scores[mask], 0))


# ---------------------------------------------------------------------------------------------
# Eq. 1: sparse GAT == dense reference.
# ---------------------------------------------------------------------------------------------


def _dense_gat_layer(x, layer: DiagonalGraphAttention, adj) -> torch.Tensor:
    """Dense N x N attention, masked softmax over neighbours incl. self, heads averaged."""
    out = 0.0
    heads = layer.weight.shape[0]
    for h in range(heads):
        z = x @ torch.diag(layer.weight[h])  # diagonal W_g
        e = F.leaky_relu((z @ layer.att_dst[h])[:, None] + (z @ layer.att_src[h])[None, :], 0.2)  # (N, N)
        alpha = torch.softmax(e.masked_fill(~adj, float("-inf")), dim=1)
        out = out + alpha @ z
    return out / heads


def _dense_encoder(enc: GraphStructureEncoder, adj) -> torch.Tensor:
    x = enc.entity.weight
    for i, layer in enumerate(enc.layers):
        x = _dense_gat_layer(x, layer, adj)
        if i + 1 < len(enc.layers):
            x = F.elu(x)
    return x


def test_sparse_gat_equals_dense_reference_forward_and_gradients():
    torch.manual_seed(3)
    enc = GraphStructureEncoder(N, 5, heads=2, layers=2).double()
    for layer in enc.layers:  # away from the all-ones init, so that W_g matters
        torch.nn.init.uniform_(layer.weight, 0.5, 1.5)
    with torch.no_grad():
        enc.entity.weight.normal_()
    g = SparseGraph.undirected_with_self_loops(HEADS, TAILS, N)
    adj = _dense_adjacency(HEADS, TAILS, N)
    probe = torch.randn(N, 5, dtype=torch.float64)

    sparse = enc(g)
    (sparse * probe).sum().backward()
    grads_sparse = {k: p.grad.clone() for k, p in enc.named_parameters()}
    enc.zero_grad()
    dense = _dense_encoder(enc, adj)
    (dense * probe).sum().backward()
    grads_dense = {k: p.grad.clone() for k, p in enc.named_parameters()}

    torch.testing.assert_close(sparse, dense)
    assert set(grads_sparse) == {"entity.weight", "layers.0.weight", "layers.0.att_dst", "layers.0.att_src",
                                 "layers.1.weight", "layers.1.att_dst", "layers.1.att_src"}
    for k in grads_sparse:
        torch.testing.assert_close(grads_sparse[k], grads_dense[k], msg=k)
        assert grads_sparse[k].abs().sum() > 0, k


def test_isolated_node_keeps_its_own_projection():
    torch.manual_seed(4)
    layer = DiagonalGraphAttention(3, heads=2).double()
    torch.nn.init.uniform_(layer.weight, 0.5, 1.5)
    x = torch.randn(N, 3, dtype=torch.float64)
    out = layer(x, SparseGraph.undirected_with_self_loops(HEADS, TAILS, N))
    torch.testing.assert_close(out[5], (x[5] * layer.weight).mean(0))  # only its self loop, weight 1


# ---------------------------------------------------------------------------------------------
# Eq. 5-7: intra-modal MoE.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_norm", [True, False])
def test_intra_modal_moe_equals_k_separate_experts(input_norm):
    torch.manual_seed(5)
    f, hid, d, k, b = 4, 3, 2, 3, 5
    moe = IntraModalMoE(f, hid, d, k, input_norm=input_norm).double()
    raw = torch.randn(b, f, dtype=torch.float64) * 0.01 + 0.3
    mixed, experts, gate = moe(raw)
    assert mixed.shape == (b, d) and experts.shape == (b, k, d) and gate.shape == (b, k)
    x = raw
    if input_norm:  # layer normalisation without affine parameters, by hand
        x = (raw - raw.mean(1, keepdim=True)) / torch.sqrt(raw.var(1, unbiased=False, keepdim=True) + 1e-5)
    for i in range(b):
        logits = torch.stack([x[i] @ moe.gate.weight[j] + moe.gate.bias[j] for j in range(k)])  # Eq. 7
        g_ref = torch.exp(logits) / torch.exp(logits).sum()
        torch.testing.assert_close(gate[i], g_ref)
        total = torch.zeros(d, dtype=torch.float64)
        for j in range(k):
            w1 = moe.first.weight[j * hid:(j + 1) * hid].t()  # (F, hid): expert j's W1
            b1 = moe.first.bias[j * hid:(j + 1) * hid]
            ffn = torch.relu(x[i] @ w1 + b1) @ moe.second_w[j] + moe.second_b[j]  # Eq. 5
            torch.testing.assert_close(experts[i, j], ffn)
            total = total + g_ref[j] * ffn  # Eq. 6
        torch.testing.assert_close(mixed[i], total)


def test_expert_dropout_zeroes_hidden_units_in_training_only():
    """Dropout p on the experts' hidden layer: in training each expert output is the second layer
    applied to the hidden units with about a fraction p zeroed and the rest scaled by 1/(1-p); in
    evaluation the module is exactly the one without dropout."""
    torch.manual_seed(8)
    f, hid, d, k, b, p = 6, 400, 3, 2, 4, 0.5
    moe = IntraModalMoE(f, hid, d, k, dropout=p).double()
    plain = IntraModalMoE(f, hid, d, k, dropout=0.0).double()
    plain.load_state_dict(moe.state_dict())
    x = torch.randn(b, f, dtype=torch.float64)
    moe.eval(), plain.eval()
    for got, want in zip(moe(x), plain(x)):
        torch.testing.assert_close(got, want)
    moe.train()
    torch.manual_seed(9)
    _, experts, _ = moe(x)
    torch.manual_seed(9)  # the same mask, rebuilt by hand
    xn = F.layer_norm(x, (f,))
    hidden = torch.relu(moe.first(xn)).view(b, k, hid)
    keep = F.dropout(torch.ones_like(hidden), p, True)  # 0 or 1/(1-p), drawn as the module draws it
    assert 0.4 < (keep == 0).double().mean() < 0.6
    want = torch.einsum("bkh,khd->bkd", hidden * keep, moe.second_w) + moe.second_b
    torch.testing.assert_close(experts, want)


def test_moe_gate_rows_sum_to_one_and_differ_between_entities():
    torch.manual_seed(6)
    moe = IntraModalMoE(6, 4, 4, 4)
    _, experts, gate = moe(torch.randn(8, 6))
    torch.testing.assert_close(gate.sum(1), torch.ones(8))
    assert (gate > 0).all()
    assert (gate[0] - gate[1:]).abs().max(1).values.min() > 1e-4  # entity-specific weights
    assert (experts[:, 0] - experts[:, 1]).abs().max() > 1e-3  # experts are different networks


def test_linear_projection_is_one_expert_with_gate_one():
    torch.manual_seed(7)
    lin = LinearProjection(4, 3)
    x = torch.randn(2, 4)
    y, experts, gate = lin(x)
    torch.testing.assert_close(y, x @ lin.proj.weight.t() + lin.proj.bias)
    assert experts.shape == (2, 1, 3) and torch.equal(gate, torch.ones(2, 1))


def test_linear_projection_normalises_its_input_like_the_experts():
    torch.manual_seed(7)
    lin = LinearProjection(4, 3, input_norm=True)
    x = torch.randn(5, 4)
    y, _, _ = lin(x)
    z = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(y, z @ lin.proj.weight.t() + lin.proj.bias)
    torch.testing.assert_close(lin(10 * x)[0], lin(1000 * x)[0])  # the input's scale is gone


# ---------------------------------------------------------------------------------------------
# Eq. 10-12: inter-modal router.
# ---------------------------------------------------------------------------------------------


def test_inter_modal_router_weights_and_weighted_concat():
    torch.manual_seed(8)
    m, d, b = 3, 4, 5
    parts = [torch.randn(b, d, dtype=torch.float64) for _ in range(m)]
    for hidden in (0, 6):
        router = InterModalRouter(m, d, hidden, uniform_init=False).double()
        fused, w = router(parts)
        assert fused.shape == (b, m * d) and w.shape == (b, m)
        torch.testing.assert_close(w, torch.softmax(router.net(torch.cat(parts, 1)), 1))  # Eq. 10-11
        torch.testing.assert_close(w.sum(1), torch.ones(b, dtype=torch.float64))
        assert (w[0] - w[1:]).abs().max(1).values.min() > 1e-6  # per-entity weights
        ref = torch.cat([w[:, i:i + 1] * parts[i] for i in range(m)], 1)  # Eq. 12
        for i in range(b):
            torch.testing.assert_close(fused[i], torch.cat([w[i, j] * parts[j][i] for j in range(m)]))
        torch.testing.assert_close(fused, ref)


def test_router_uniform_init_starts_at_one_over_m_and_masks_missing_modalities():
    torch.manual_seed(9)
    parts = [torch.randn(4, 3) for _ in range(3)]
    for hidden in (0, 5):
        router = InterModalRouter(3, 3, hidden)  # uniform_init by default
        _, w = router(parts)
        torch.testing.assert_close(w, torch.full((4, 3), 1 / 3))
        with torch.no_grad():  # a trained router: per-entity logits
            (router.net[-1] if hidden else router.net).weight.normal_()
        present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
        fused, w = router(parts, present)
        full = torch.softmax(router.net(torch.cat(parts, 1)), 1)
        ref = torch.where(present, full, torch.zeros_like(full))
        torch.testing.assert_close(w, ref / ref.sum(1, keepdim=True))  # renormalised over what each has
        assert (w[~present] == 0).all()
        torch.testing.assert_close(fused[1, 3:6], torch.zeros(3))  # no part of the missing modality


def test_modality_weights_are_one_softmax_for_every_entity_and_learn_which_modality_aligns():
    torch.manual_seed(10)
    parts = [torch.randn(4, 3) for _ in range(3)]
    router = ModalityWeights(3)
    _, w = router(parts)
    torch.testing.assert_close(w, torch.full((4, 3), 1 / 3))  # starts uniform
    with torch.no_grad():
        router.param.copy_(torch.tensor([0.5, -1.0, 2.0]) / router.scale)
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    fused, w = router(parts, present)
    e = torch.tensor([0.5, -1.0, 2.0]).exp()
    torch.testing.assert_close(w[0], e / e.sum())  # softmax(b), the same for every complete entity
    torch.testing.assert_close(router.logits(), torch.tensor([0.5, -1.0, 2.0]))
    torch.testing.assert_close(w[2], w[0])
    torch.testing.assert_close(w[1], torch.tensor([e[0], 0, e[2]]) / (e[0] + e[2]))  # renormalised
    torch.testing.assert_close(fused[1, 3:6], torch.zeros(3))
    # Two views of 6 entities: modality 0 is the same in both views, modalities 1-2 are noise. An
    # alignment loss on the fused embeddings moves the weight to modality 0.
    a = F.normalize(torch.randn(6, 3), dim=1)
    views = [[a, F.normalize(torch.randn(6, 3), dim=1), F.normalize(torch.randn(6, 3), dim=1)],
             [a, F.normalize(torch.randn(6, 3), dim=1), F.normalize(torch.randn(6, 3), dim=1)]]
    router = ModalityWeights(3)
    opt = torch.optim.SGD(router.parameters(), lr=0.5 / router.scale ** 2)  # SGD on b at rate 0.5
    for _ in range(50):
        f1, _ = router(views[0])
        f2, _ = router(views[1])
        loss = F.cross_entropy(f1 @ f2.T / 0.1, torch.arange(6))
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, w = router(views[0])
    assert w[0, 0] > 0.6 and w[0, 0] > 2 * w[0, 1:].max()
    # AdamW's first step moves each parameter by its rate, so each logit by scale x rate.
    router = ModalityWeights(3)
    opt = torch.optim.AdamW(router.parameters(), lr=1e-3, weight_decay=0.0)
    router(views[0])[0][:, :3].sum().backward()
    opt.step()
    torch.testing.assert_close(router.logits().abs(), torch.full((3,), router.scale * 1e-3))


def test_uniform_fusion_weights_are_one_over_m():
    parts = [torch.randn(3, 2) for _ in range(4)]
    fused, w = UniformFusion(4)(parts)
    torch.testing.assert_close(w, torch.full((3, 4), 0.25))
    torch.testing.assert_close(fused, torch.cat(parts, 1) / 4)
