"""Neural building blocks of HUMEA.

Two parts: first the sparse-graph machinery the GAT runs on (SparseGraph, its CSR products with a
hand-written backward, edge_softmax), which is no part of the paper; then the paper's modules, one
per equation (search "Eq. 1", "Eq. 5", ...).

Axis letters used in the shape comments:
    N entities (both KGs), E directed edges incl. self loops, H attention heads,
    F input feature size of a modality, D hidden size, K experts per modality,
    M active modalities, B entities in a batch.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================================
# Part 1. Sparse-graph machinery: message passing whose cost grows with E, never with N x N.
# =============================================================================================


class SparseGraph:
    """A directed graph stored twice in CSR form: by target (for aggregation) and by source
    (for the transposed product in the backward pass). Built once; moved with ``.to``.

    Targets and sources may be two node sets (a block of an L-layer computation restricted to
    some rows, see ``receptive_blocks``): ``num_nodes`` targets, ``num_src`` sources, and
    ``dst_in_src`` the source row of each target (None when both sets are all the nodes)."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, num_nodes: int):
        order = torch.argsort(dst * num_nodes + src)  # rows = targets, sorted, then by source
        src, dst = src[order].contiguous(), dst[order].contiguous()  # (E,), (E,)
        # Transposed CSR: rows = sources. ``t_perm`` maps its slots back to edge ids.
        t_perm = torch.argsort(src * num_nodes + dst)
        self._set(src, dst, num_nodes, num_nodes, t_perm, None)

    def _set(self, src, dst, num_nodes: int, num_src: int, t_perm, dst_in_src) -> None:
        self.num_nodes, self.num_src = num_nodes, num_src
        self.src, self.dst = src, dst  # (E,), (E,) sorted by (dst, src)
        self.crow = _crow_indices(dst, num_nodes)
        self.t_perm = t_perm
        self.t_col = dst[t_perm].contiguous()
        self.t_crow = _crow_indices(src[t_perm], num_src)
        self.dst_in_src = dst_in_src
        self._receptive = None  # the last receptive_blocks result and its key (training asks for the same rows)

    @classmethod
    def undirected_with_self_loops(cls, heads, tails, num_nodes: int) -> SparseGraph:
        """Both directions of every (head, tail) pair once, plus one self loop per node."""
        heads = torch.as_tensor(heads, dtype=torch.long)
        tails = torch.as_tensor(tails, dtype=torch.long)
        loops = torch.arange(num_nodes)
        src = torch.cat([heads, tails, loops])
        dst = torch.cat([tails, heads, loops])
        keys = torch.unique(dst * num_nodes + src)  # drops duplicate edges and duplicate loops
        return cls(keys % num_nodes, keys // num_nodes, num_nodes)

    @property
    def num_edges(self) -> int:
        return int(self.src.numel())

    def to(self, device) -> SparseGraph:
        out = object.__new__(SparseGraph)
        out.__dict__ = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()}
        out._receptive = None
        return out

    def spmm(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out[i] = sum over edges e = (j -> i) of weight[e] * x[j]; differentiable in both.
        weight: (E,), x: (num_src, D) -> (num_nodes, D)."""
        return _EdgeSpMM.apply(weight, x, self)

    def receptive_blocks(self, targets: torch.Tensor, layers: int):
        """What ``layers`` rounds of message passing need to compute the rows ``targets`` only.

        Layer l (1..L) computes the rows S_l from the rows S_(l-1), S_L = the sorted distinct
        targets and S_(l-1) = S_l plus every source of an edge into S_l. Returns (S_0, [block_1 ..
        block_L]) where block_l holds exactly the edges into S_l, numbered within S_l and S_(l-1):
        each row's edges, hence its softmax and its sum, are those of the full graph, so the rows
        equal those of the full computation (tests/test_layers.py checks it). In training the
        losses read only the ~2 x 20% training entities: the last layer then touches about a
        fifth of the edges. O(N + E), no sort: the sub-blocks keep the full graph's edge orders.
        The last result is kept: every epoch asks for the same training entities."""
        if self.dst_in_src is not None:
            raise ValueError("receptive_blocks needs the full graph, not one of its blocks")
        n, dev = self.num_nodes, self.src.device
        sets = [torch.unique(targets.to(dev))]  # S_L, sorted
        if self._receptive is not None:
            key, hops, result = self._receptive
            if hops == layers and key.shape == sets[0].shape and torch.equal(key, sets[0]):
                return result
        masks = []
        for _ in range(layers):
            rows = torch.zeros(n, dtype=torch.bool, device=dev)
            rows[sets[-1]] = True
            edges = rows[self.dst]  # (E,) edges into S_l
            rows[self.src[edges]] = True  # S_(l-1) = S_l + its in-neighbours
            masks.append(edges)
            sets.append(torch.nonzero(rows).squeeze(1))
        sets.reverse()  # S_0 .. S_L
        masks.reverse()
        blocks = []
        for layer in range(layers):
            out_rows, in_rows, edges = sets[layer + 1], sets[layer], masks[layer]
            pos_out = torch.full((n,), -1, dtype=torch.long, device=dev)
            pos_out[out_rows] = torch.arange(len(out_rows), device=dev)
            pos_in = torch.full((n,), -1, dtype=torch.long, device=dev)
            pos_in[in_rows] = torch.arange(len(in_rows), device=dev)
            # Renumbering is monotonic, so the kept edges stay sorted by (dst, src) and, taken in
            # the full graph's transposed order, by (src, dst).
            edge_id = torch.cumsum(edges, 0) - 1  # (E,) position of a kept edge among the kept ones
            t_perm = edge_id[self.t_perm[edges[self.t_perm]]]
            block = object.__new__(SparseGraph)
            block._set(pos_in[self.src[edges]], pos_out[self.dst[edges]], len(out_rows), len(in_rows), t_perm,
                       pos_in[out_rows])
            blocks.append(block)
        self._receptive = (sets[-1], layers, (sets[0], blocks))
        return sets[0], blocks


def _crow_indices(sorted_rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    counts = torch.bincount(sorted_rows, minlength=num_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _csr(crow, col, values, shape) -> torch.Tensor:
    # torch warns that CSR support is "beta" on every construction; the ops used here are stable.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


# Column block of the CPU sparse-dense product: the gathered rows x[src] of a block stay in cache.
# The product reads one random row of x per edge; with 300 columns x is ~33 MB on FB15K-DB15K,
# larger than the last-level cache, and the blocked product is ~2x faster there (docs/performance.md).
_CPU_BLOCK_BYTES = 4 * 2**20


def _spmm(crow, col, values, shape, x: torch.Tensor) -> torch.Tensor:
    """CSR (shape) @ x (shape[1], D), in column blocks on the CPU; the same sums either way."""
    a = _csr(crow, col, values, shape)
    width = max(16, _CPU_BLOCK_BYTES // max(1, x.shape[0] * x.element_size()))
    if x.device.type != "cpu" or x.shape[1] <= width:
        return a @ x
    return torch.cat([a @ x[:, s:s + width].contiguous() for s in range(0, x.shape[1], width)], dim=1)


class _EdgeSpMM(torch.autograd.Function):
    """Weighted sparse aggregation with a hand-written backward.

    The official code's sparse attention builds a dense N x N gradient for the edge weights;
    here both gradients are sparse products, so time and memory stay O(E D + N D)."""

    @staticmethod
    def forward(ctx, weight, x, graph: SparseGraph):
        ctx.graph = graph
        ctx.save_for_backward(weight, x)
        return _spmm(graph.crow, graph.src, weight, (graph.num_nodes, graph.num_src), x)  # (N, D)

    @staticmethod
    def backward(ctx, grad_out):
        weight, x = ctx.saved_tensors
        g = ctx.graph
        grad_w = grad_x = None
        grad_out = grad_out.contiguous()
        if ctx.needs_input_grad[1]:
            grad_x = _spmm(g.t_crow, g.t_col, weight[g.t_perm], (g.num_src, g.num_nodes), grad_out)  # (N_src, D)
        if ctx.needs_input_grad[0]:
            # grad_w[e] = <grad_out[dst_e], x[src_e]>: a sampled dense-dense product (SDDMM) on
            # the edge pattern; it never forms the N x N matrix grad_out @ x^T.
            pattern = _csr(g.crow, g.src, torch.zeros_like(weight), (g.num_nodes, g.num_src))
            grad_w = torch.sparse.sampled_addmm(pattern, grad_out, x.t(), beta=0.0).values()
        return grad_w, grad_x, None


def edge_softmax(scores: torch.Tensor, graph: SparseGraph) -> torch.Tensor:
    """Softmax of edge scores over the incoming edges of each target node. scores: (E,)."""
    n = graph.num_nodes
    # The max only stabilises exp(); it cancels in the ratio, so it carries no gradient.
    row_max = torch.full((n,), -torch.inf, dtype=scores.dtype, device=scores.device)
    row_max = row_max.scatter_reduce(0, graph.dst, scores.detach(), reduce="amax")
    ex = torch.exp(scores - row_max[graph.dst])  # (E,)
    denom = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add(0, graph.dst, ex)
    return ex / denom[graph.dst]


# =============================================================================================
# Part 2. The paper's modules.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# Eq. 1: graph structure embedding, a 2-layer GAT with a diagonal weight.
# ---------------------------------------------------------------------------------------------


class DiagonalGraphAttention(nn.Module):
    """One GAT layer whose per-head weight is diagonal (Eq. 1's W_g), heads averaged.

        z_h = x * w_h                                    (elementwise, w_h in R^D)
        a_ij = softmax_j(LeakyReLU(u_h . z_h[i] + v_h . z_h[j]))   over j in N(i)
        out[i] = mean_h sum_j a_ij z_h[j]
    """

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, dim))  # diagonal W_g per head
        self.att_dst = nn.Parameter(torch.empty(heads, dim))
        self.att_src = nn.Parameter(torch.empty(heads, dim))
        bound = 1.0 / math.sqrt(dim)
        nn.init.uniform_(self.att_dst, -bound, bound)
        nn.init.uniform_(self.att_src, -bound, bound)
        self.attn_dropout = attn_dropout

    def forward(self, x: torch.Tensor, graph: SparseGraph) -> torch.Tensor:
        """x: (N_src, D) rows of the graph's sources -> (N, D) rows of its targets."""
        out = 0.0
        for h in range(self.weight.shape[0]):
            z = x * self.weight[h]  # (N_src, D)
            z_dst = z if graph.dst_in_src is None else z[graph.dst_in_src]  # (N, D)
            s_dst, s_src = z_dst @ self.att_dst[h], z @ self.att_src[h]  # (N,), (N_src,)
            score = F.leaky_relu(s_dst[graph.dst] + s_src[graph.src], 0.2)  # (E,)
            alpha = F.dropout(edge_softmax(score, graph), self.attn_dropout, self.training)
            out = out + graph.spmm(alpha, z)  # (N, D)
        return out / self.weight.shape[0]


class GraphStructureEncoder(nn.Module):
    """Eq. 1: h^g = GAT_2(W_g, M_g, e^g) on randomly initialised entity embeddings e^g.

    Dropout (``dropout``) is applied to each layer's input, ELU between layers."""

    def __init__(self, num_entities: int, dim: int, heads: int = 2, layers: int = 2,
                 dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.entity = nn.Embedding(num_entities, dim)  # e^g
        nn.init.normal_(self.entity.weight, std=1.0 / math.sqrt(num_entities))
        self.layers = nn.ModuleList(DiagonalGraphAttention(dim, heads, attn_dropout) for _ in range(layers))
        self.dropout = dropout

    def forward(self, graph: SparseGraph, targets: torch.Tensor | None = None) -> torch.Tensor:
        """All rows (N, D), or with ``targets`` only the rows of the sorted distinct targets
        (T, D), computed on the graph blocks those rows need (SparseGraph.receptive_blocks)."""
        if targets is None:
            x, blocks = self.entity.weight, [graph] * len(self.layers)  # (N, D)
        else:
            nodes, blocks = graph.receptive_blocks(targets, len(self.layers))
            x = self.entity.weight[nodes]  # (N_0, D)
        for i, layer in enumerate(self.layers):
            x = layer(F.dropout(x, self.dropout, self.training), blocks[i])
            if i + 1 < len(self.layers):
                x = F.elu(x)
        return x  # (N, D) or (T, D)


# ---------------------------------------------------------------------------------------------
# Eq. 5-7: intra-modal mixture of experts.
# ---------------------------------------------------------------------------------------------


class IntraModalMoE(nn.Module):
    """K FFN experts and a softmax gate over the entity's input feature of one modality.

        Eq. 5  FFN_k(h) = ReLU(h W1_k + b1_k) W2_k + b2_k
        Eq. 6  h' = sum_k g_k FFN_k(h)
        Eq. 7  g = softmax(h w3 + b3)

    With ``input_norm`` (the default) h is first layer-normalised (no affine parameters). The paper
    leaves the scale of h open, and it decides whether the experts see the entity at all: the GAT
    output has norm ~0.01 and text rows ~7, while torch's initial biases are ~0.03 per unit. On
    small inputs every FFN_k(h) is then nearly its bias path, the same vector for every entity
    (mean pairwise cosine 1.000 for the graph at initialisation on FB15K-DB15K) and learning
    starts ten times slower (docs/accuracy.md). Layer normalisation gives every input unit scale.

    The K first layers are one (F, K*D) matmul, the K second layers one batched matmul.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_experts: int, input_norm: bool = True,
                 dropout: float = 0.0, residual: bool = False):
        super().__init__()
        if residual and in_dim != out_dim:
            raise ValueError(f"a residual MoE needs equal input and output sizes, got {in_dim} and {out_dim}")
        self.num_experts, self.hidden, self.input_norm, self.dropout = num_experts, hidden, input_norm, dropout
        self.residual = residual
        self.first = nn.Linear(in_dim, num_experts * hidden)  # W1, b1 of all experts
        bound = 1.0 / math.sqrt(hidden)
        self.second_w = nn.Parameter(torch.empty(num_experts, hidden, out_dim).uniform_(-bound, bound))
        self.second_b = nn.Parameter(torch.empty(num_experts, out_dim).uniform_(-bound, bound))
        self.gate = nn.Linear(in_dim, num_experts)  # w3, b3

    def forward(self, x: torch.Tensor):
        """x: (B, F) -> (mixture (B, D), expert outputs (B, K, D), gate (B, K))."""
        if self.input_norm:
            x = F.layer_norm(x, x.shape[-1:])
        hid = F.relu(self.first(x)).view(x.shape[0], self.num_experts, self.hidden)  # (B, K, D_hid)
        hid = F.dropout(hid, self.dropout, self.training)
        experts = torch.einsum("bkh,khd->bkd", hid, self.second_w) + self.second_b  # (B, K, D)
        gate = torch.softmax(self.gate(x), dim=-1)  # (B, K)
        mixed = torch.einsum("bk,bkd->bd", gate, experts)
        return (x + mixed if self.residual else mixed), experts, gate


class LinearNoisyMoE(nn.Module):
    """The official code's intra-modal MoE (``--expert linear``), not the paper's Eq. 5-7:

        expert_k(x) = (x - c_k) A_k            A_k ~ N(0, 0.02^2), c_k = 0 at start, no output bias
        g = softmax(x W_g + eps * (softplus(x W_n) + 0.01))   eps ~ N(0, 1) in training only

    W_g and W_n start at zero: the gate starts uniform and its noise at scale 0.01 + log 2."""

    def __init__(self, in_dim: int, out_dim: int, num_experts: int):
        super().__init__()
        self.center = nn.Parameter(torch.zeros(num_experts, in_dim))  # c_k
        self.weight = nn.Parameter(torch.randn(num_experts, in_dim, out_dim) * 0.02)  # A_k
        self.gate = nn.Linear(in_dim, num_experts, bias=False)
        self.noise = nn.Linear(in_dim, num_experts, bias=False)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.noise.weight)

    def forward(self, x: torch.Tensor):
        """x: (B, F) -> (mixture (B, D), expert outputs (B, K, D), gate (B, K))."""
        offset = torch.einsum("kf,kfd->kd", self.center, self.weight)  # (K, D): c_k A_k
        experts = torch.einsum("bf,kfd->bkd", x, self.weight) - offset  # (B, K, D)
        logits = self.gate(x)  # (B, K)
        if self.training:
            logits = logits + torch.randn_like(logits) * (F.softplus(self.noise(x)) + 0.01)
        gate = torch.softmax(logits, dim=-1)
        return torch.einsum("bk,bkd->bd", gate, experts), experts, gate


class PassThrough(nn.Module):
    """No experts (the GAT output without a Graph-MoE, as in the official code): h' = h."""

    def forward(self, x: torch.Tensor):
        return x, x.unsqueeze(1), x.new_ones(x.shape[0], 1)


class LinearProjection(nn.Module):
    """The 'w/o HMoE' ablation's encoder: one linear layer per modality, no experts, no gate.

    With ``input_norm`` the input is layer-normalised first (no affine parameters), as the experts'
    is (IntraModalMoE): without it the GAT output (norm ~0.01) is swamped by the layer's bias, every
    entity's graph embedding starts as the same vector (mean pairwise cosine 1.000 on FB15K-DB15K),
    and the ablation would measure the missing normalisation as well as the missing experts."""

    def __init__(self, in_dim: int, out_dim: int, input_norm: bool = False):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.input_norm = input_norm

    def forward(self, x: torch.Tensor):
        if self.input_norm:
            x = F.layer_norm(x, x.shape[-1:])
        y = self.proj(x)  # (B, D)
        return y, y.unsqueeze(1), torch.ones(x.shape[0], 1, device=x.device, dtype=y.dtype)


# ---------------------------------------------------------------------------------------------
# Eq. 10-12: inter-modal router.
# ---------------------------------------------------------------------------------------------


def weighted_concat(parts: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Eq. 12: h^f = concat_m w_m h'_m. parts: M tensors (B, D); weights (B, M) -> (B, M*D)."""
    return torch.cat([weights[:, i:i + 1] * p for i, p in enumerate(parts)], dim=-1)


def calibrated_weights(weights: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """--calibrate_weights: modality weights (B, M) times one factor per modality (M,), renormalised per
    entity (a modality an entity lacks has weight 0 and keeps it). An entity whose modalities all get
    factor 0 keeps its own weights, so no fused embedding becomes zero."""
    scaled = weights * factors
    total = scaled.sum(-1, keepdim=True)
    return torch.where(total > 0, scaled / torch.where(total > 0, total, 1.0), weights)


def calibrated_fusion(parts: list[torch.Tensor], weights: torch.Tensor, factors) -> torch.Tensor:
    """h^f (Eq. 12) under the calibrated weights: weighted_concat of ``parts`` with calibrated_weights(weights,
    factors); ``factors``: M numbers (an array or a tensor)."""
    return weighted_concat(parts, calibrated_weights(weights, torch.as_tensor(factors, dtype=weights.dtype)))


class InterModalRouter(nn.Module):
    """Per-entity modality weights from the concatenated intra-modal outputs.

        Eq. 10  h_c = concat_m h'_m                                   (B, M*D)
        Eq. 11  W = softmax(g(h_c)),  g = Linear[-ReLU-Linear]         (B, M)
        Eq. 12  h^f = concat_m w_m h'_m                                (B, M*D)

    ``hidden`` is the official ``fusion_weight_dim``: 0 makes g a single linear layer. With
    ``uniform_init`` the last layer starts at zero: every entity starts with weights 1/M, and that
    layer's bias is a global weight vector which the per-entity part refines (docs/accuracy.md).
    ``present`` (B, M) masks the modalities an entity lacks: the softmax runs over the rest."""

    def __init__(self, num_modalities: int, dim: int, hidden: int = 0, uniform_init: bool = True):
        super().__init__()
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(num_modalities * dim, hidden), nn.ReLU(),
                                     nn.Linear(hidden, num_modalities))
        else:
            self.net = nn.Linear(num_modalities * dim, num_modalities)
        if uniform_init:
            last = self.net[-1] if hidden > 0 else self.net
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, parts: list[torch.Tensor], present: torch.Tensor | None = None):
        h_c = torch.cat(parts, dim=-1)  # (B, M*D)
        logits = self.net(h_c)  # (B, M)
        if present is not None:
            logits = logits.masked_fill(~present, -torch.inf)
        weights = torch.softmax(logits, dim=-1)  # (B, M)
        return weighted_concat(parts, weights), weights


# The official code's modality combinations (its global router): each modality's weight is the sum of
# the weights of the combinations that hold it.
MODALITY_COMBINATIONS = (("image",), ("rel_text",), ("attr_text",), ("rel_bow", "attr_bow"),
                         ("graph", "rel_bow"), ("graph", "attr_bow"), ("graph", "rel_bow", "attr_bow"))


class GlobalModalityWeights(nn.Module):
    """The official code's inter-modal weights (``--router global``): one vector for all entities.

        p = softmax(logits) over the modality combinations, the top 5 kept and renormalised
        w_m = sum of p_c over the combinations c that hold m

    Combinations with no active modality (e.g. {image} on data without images) are dropped.
    ``hidden`` (fusion_weight_dim) > 0 computes the logits as Linear(q) of a learned query q of that
    size; 0 learns them directly. ``present`` (B, M) zeroes the weight of a modality an entity lacks."""

    def __init__(self, modalities, hidden: int = 0, top: int = 5):
        super().__init__()
        combos = [c for c in MODALITY_COMBINATIONS if any(m in modalities for m in c)]
        combos += [(m,) for m in modalities if not any(m in c for c in combos)]  # e.g. a new modality
        member = torch.tensor([[float(m in c) for m in modalities] for c in combos])  # (C, M)
        self.register_buffer("member", member)
        self.top = min(top, len(combos))
        if hidden > 0:
            self.query = nn.Parameter(torch.randn(hidden))
            self.proj = nn.Linear(hidden, len(combos))
        else:
            self.logits = nn.Parameter(torch.zeros(len(combos)))

    def combination_weights(self) -> torch.Tensor:
        logits = self.proj(self.query) if hasattr(self, "proj") else self.logits  # (C,)
        p = torch.softmax(logits, dim=0)
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[p.topk(self.top).indices] = True
        p = torch.where(keep, p, torch.zeros_like(p))
        return p / p.sum()

    def forward(self, parts: list[torch.Tensor], present: torch.Tensor | None = None):
        w = self.combination_weights() @ self.member  # (M,)
        weights = w.expand(parts[0].shape[0], -1)  # (B, M)
        if present is not None:
            weights = weights * present
        return weighted_concat(parts, weights), weights


class ModalityWeights(nn.Module):
    """One learned weight per modality, shared by every entity (``--router modality``): the
    per-entity router of Eq. 11 with its input term removed, W = softmax(b), b (M,) starting at zero
    (weights 1/M). It has M parameters, so it cannot fit a few seed pairs by entity: the low-capacity
    router for ``--router_holdout`` (docs/accuracy.md, 'FB15K-YAGO15K'). ``present`` (B, M) masks the
    modalities an entity lacks: the softmax runs over the rest.

    b = ``scale`` * p for the parameter p. AdamW moves a parameter by about its learning rate per step
    whatever the gradient's size, so a bare b would move by at most 5e-4 a step at the paper's rate:
    0.1 in 40 epochs of five steps, too slow to follow the modalities (measured). ``scale`` makes a step
    move b by up to ``scale`` x lr, about as fast as the per-entity router's output moves."""

    def __init__(self, num_modalities: int, scale: float = 20.0):
        super().__init__()
        self.scale = scale
        self.param = nn.Parameter(torch.zeros(num_modalities))

    def logits(self) -> torch.Tensor:
        return self.scale * self.param  # (M,)

    def forward(self, parts: list[torch.Tensor], present: torch.Tensor | None = None):
        logits = self.logits().expand(parts[0].shape[0], -1)  # (B, M)
        if present is not None:
            logits = logits.masked_fill(~present, -torch.inf)
        weights = torch.softmax(logits, dim=-1)  # (B, M)
        return weighted_concat(parts, weights), weights


class UniformFusion(nn.Module):
    """The 'w/o HMoE' ablation's fusion: plain concatenation with equal weights 1/M (1 / the number
    of modalities the entity has, when ``present`` masks some)."""

    def __init__(self, num_modalities: int):
        super().__init__()
        self.num_modalities = num_modalities

    def forward(self, parts: list[torch.Tensor], present: torch.Tensor | None = None):
        weights = parts[0].new_ones((parts[0].shape[0], self.num_modalities))
        if present is not None:
            weights = weights * present
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1.0)
        return weighted_concat(parts, weights), weights


# ---------------------------------------------------------------------------------------------
# Eq. 8-9: variational network q(y | x) of the CLUB bound.
# ---------------------------------------------------------------------------------------------


class GaussianConditional(nn.Module):
    """Q_theta(y | x) = N(y; mu(x), diag(exp(logvar(x)))), as in CLUB (Cheng et al. 2020)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.logvar = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.Tanh())

    def forward(self, x: torch.Tensor):
        return self.mu(x), self.logvar(x)
