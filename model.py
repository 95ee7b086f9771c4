"""HUMEA: modality encoders, hierarchical mixture of experts and fusion (paper Fig. 2).

Axis letters: N entities, B entities asked for, F input size of a modality, D hidden size,
K experts per modality, M active modalities.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_process.dataset import MMKG, normalise_features
from layers import (
    GlobalModalityWeights,
    GraphStructureEncoder,
    InterModalRouter,
    IntraModalMoE,
    LinearNoisyMoE,
    LinearProjection,
    ModalityWeights,
    PassThrough,
    SparseGraph,
    UniformFusion,
    weighted_concat,
)
from loss import UncertaintyWeights
from utils import AMP_DTYPES, MODALITIES, Config, Switches


@dataclass(frozen=True)
class ModelConfig:
    """What HUMEA is built from, taken once from the run's Config (``from_config``); the model sees
    no run-level setting (folders, resumption, training schedule). Field meanings: utils.Config."""

    hidden: int  # D, the size of every network's output (the last of --hidden_units)
    gat_layers: int  # GAT layers (entries of --heads)
    heads: int  # attention heads per GAT layer (Config.validate: the same in every layer)
    n_exp: int  # K, experts per modality
    fusion_weight_dim: int  # hidden width of the inter-modal router (0 = one linear layer)
    dropout: float  # on the GAT layer inputs
    attn_dropout: float  # on the GAT attention coefficients
    expert_dropout: float  # on the FFN experts' hidden layer
    amp: str  # autocast of the experts and the router: "none" or "bf16"
    expert: str  # "ffn" (Eq. 5) or "linear" (the official code's experts)
    graph_moe: bool
    graph_residual: bool
    moe_input_norm: str  # "layernorm" or "none"
    router: str  # "entity" (Eq. 11), "global" (the official code's) or "modality" (one weight each)
    router_init: str  # "uniform" or "default"
    loss_weighting: str  # "sum" (Eq. 17) or "uncertainty"
    switches: Switches = field(default_factory=Switches)  # --without

    @classmethod
    def from_config(cls, cfg: Config) -> ModelConfig:
        """Every field named like a Config field (or property) is read from it; the GAT's shape from --heads."""
        heads = cfg.heads.split(",")
        shared = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.name not in ("gat_layers", "heads")}
        return cls(gat_layers=len(heads), heads=int(heads[0]), **shared)


@dataclass
class ModelInputs:
    """What the model reads besides its parameters: fixed features and the relation graph."""

    features: dict[str, torch.Tensor]  # modality -> (N, F), on the model's device
    graph: SparseGraph
    num_entities: int
    # modality -> (N,) bool: the entity has this modality (--missing mask); None = every entity has all.
    present: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_data(cls, data: MMKG, device, feature_norm: str = "l2", missing: str = "mask") -> ModelInputs:
        """``feature_norm``: row scaling of the features (data_process.dataset.normalise_features). ``missing``: 'mask'
        keeps the loader's masks of the real inputs; 'fill' treats filled rows as real inputs."""
        graph = SparseGraph.undirected_with_self_loops(
            torch.from_numpy(data.triples[:, 0]), torch.from_numpy(data.triples[:, 2]), data.num_entities)
        feats = {m: torch.from_numpy(v).to(device) for m, v in normalise_features(data.features, feature_norm).items()}
        present = None
        if missing == "mask":
            present = {m: torch.from_numpy(np.asarray(p, dtype=bool)).to(device) for m, p in data.present.items()}
        return cls(feats, graph.to(device), data.num_entities, present)

    def present_rows(self, modalities, ids: torch.Tensor) -> torch.Tensor | None:
        """(B, M) bool: which of ``modalities`` the entities ``ids`` have (the graph always), or None
        when nothing is masked."""
        if self.present is None or not any(m in self.present for m in modalities):
            return None
        ones = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
        return torch.stack([self.present[m][ids] if m in self.present else ones for m in modalities], dim=1)


@dataclass
class Embeddings:
    """Everything the losses and the analysis need for a set of entities."""

    unimodal: dict[str, torch.Tensor]  # modality -> (B, D), L2-normalised h'_m (Eq. 6)
    experts: dict[str, torch.Tensor]  # modality -> (B, K, D), raw expert outputs FFN_k(h_m)
    gates: dict[str, torch.Tensor]  # modality -> (B, K), g of Eq. 7
    weights: torch.Tensor  # (B, M) modality weights W of Eq. 11
    fused: torch.Tensor  # (B, M*D) h^f of Eq. 12
    present: torch.Tensor | None = None  # (B, M) bool: the entity has the modality; None = all have all


def active_modalities(switches: Switches, available) -> tuple[str, ...]:
    """Modalities with inputs, minus the ones switched off, in the canonical order."""
    on = set(available) | {"graph"}
    return tuple(m for m in MODALITIES if m in on and m not in switches.modalities_off)


class HUMEA(nn.Module):
    def __init__(self, cfg: ModelConfig, inputs: ModelInputs):
        super().__init__()
        self.modalities = active_modalities(cfg.switches, inputs.features)
        if not self.modalities:
            raise ValueError("every modality is switched off; nothing to align with")
        d = cfg.hidden
        if "graph" in self.modalities:
            self.graph_encoder = GraphStructureEncoder(inputs.num_entities, d, heads=cfg.heads,
                                                       layers=cfg.gat_layers, dropout=cfg.dropout,
                                                       attn_dropout=cfg.attn_dropout)
        in_dims = {m: (d if m == "graph" else inputs.features[m].shape[1]) for m in self.modalities}
        self.experts = nn.ModuleDict({m: _intra_modal(cfg, m, in_dims[m]) for m in self.modalities})
        m = len(self.modalities)
        if not cfg.switches.use_hmoe:
            self.fusion = UniformFusion(m)
        elif cfg.router == "global":
            self.fusion = GlobalModalityWeights(self.modalities, cfg.fusion_weight_dim)
        elif cfg.router == "modality":
            self.fusion = ModalityWeights(m)
        else:
            self.fusion = InterModalRouter(m, d, cfg.fusion_weight_dim, uniform_init=cfg.router_init == "uniform")
        # --loss_weighting uncertainty: learned log-variances of the unimodal CL and AL losses (trained
        # with the model, saved in its checkpoint).
        if cfg.loss_weighting == "uncertainty":
            self.loss_weights = nn.ModuleDict({"cl": UncertaintyWeights(self.modalities),
                                               "al": UncertaintyWeights(self.modalities)})
        # Autocast dtype of the experts and the router (--amp; None = float32 throughout).
        self.amp_dtype: torch.dtype | None = AMP_DTYPES[cfg.amp]

    def graph_embeddings(self, inputs: ModelInputs) -> torch.Tensor | None:
        """Eq. 1 over the whole graph (N, D); the GAT needs every node's neighbours."""
        return self.graph_encoder(inputs.graph) if "graph" in self.modalities else None

    def forward(self, ids: torch.Tensor, inputs: ModelInputs, graph_emb: torch.Tensor | None = None,
                router_only: torch.Tensor | None = None) -> Embeddings:
        """Embeddings of the entities ``ids`` (B,). The per-modality experts run on these rows only:
        every expert, gate and the router act on one entity at a time, so the rows equal those of a
        full (N, .) computation (tests/test_model.py checks it) at a fraction of the cost. Without
        ``graph_emb`` (N, D) the GAT, too, computes only what these rows need.

        ``router_only`` (B,) bool (--router_holdout): the same values, other gradients. A marked row's
        fused embedding reaches only the router (its modality embeddings enter detached); an unmarked
        row's reaches only the modalities (its weights enter detached). The returned weights keep
        their gradient, for the balance term."""
        rows = {}
        if "graph" in self.modalities:
            if graph_emb is None:
                targets, inverse = torch.unique(ids, return_inverse=True)
                rows["graph"] = self.graph_encoder(inputs.graph, targets)[inverse]  # (B, D)
            else:
                rows["graph"] = graph_emb[ids]  # (B, D)
        unimodal, experts, gates = {}, {}, {}
        present = inputs.present_rows(self.modalities, ids)  # (B, M) or None
        with self._autocast(ids.device):
            for m in self.modalities:
                x = rows[m] if m == "graph" else inputs.features[m][ids]  # (B, F)
                mixed, experts[m], gates[m] = self.experts[m](x)  # (B, D), (B, K, D), (B, K)
                unimodal[m] = F.normalize(mixed.float(), dim=-1)
            parts = [unimodal[m] for m in self.modalities]
            if router_only is None:
                fused, weights = self.fusion(parts, present)  # (B, M*D), (B, M)
            else:
                held = router_only[:, None]
                parts = [torch.where(held, p.detach(), p) for p in parts]
                _, weights = self.fusion(parts, present)
                fused = weighted_concat(parts, torch.where(held, weights, weights.detach()))
        if self.amp_dtype is not None:  # the losses and CSLS read float32
            experts = {m: e.float() for m, e in experts.items()}
            gates = {m: g.float() for m, g in gates.items()}
            fused, weights = fused.float(), weights.float()
        return Embeddings(unimodal, experts, gates, weights, fused, present)

    def detached_router_weights(self, out: Embeddings) -> torch.Tensor:
        """The modality weights (B, M) of ``out`` recomputed from its modality embeddings detached: the
        same values (under the same autocast), with a gradient for the fusion's own parameters only
        (--router_balance_reach router)."""
        with self._autocast(out.fused.device):
            _, weights = self.fusion([out.unimodal[m].detach() for m in self.modalities], out.present)
        return weights.float()

    def _autocast(self, device: torch.device):
        """Mixed precision of the expert and router matmuls when ``amp_dtype`` is set (e.g.
        torch.bfloat16 on a GPU); the GAT, the losses and the evaluation stay float32."""
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def embed(self, ids: np.ndarray, inputs: ModelInputs, chunk: int = 8192, keep_experts: bool = False) -> Embeddings:
        """Evaluation-mode embeddings of many entities, in chunks; the GAT runs once. Raw expert
        outputs (B, K, D per modality) are large and kept only when asked for."""
        was_training = self.training
        self.eval()
        graph_emb = self.graph_embeddings(inputs)
        dev = next(self.parameters()).device
        parts = []
        for s in range(0, len(ids), chunk):
            out = self(torch.as_tensor(ids[s:s + chunk], device=dev), inputs, graph_emb)
            if not keep_experts:
                out.experts = {}
            parts.append(out)
        self.train(was_training)
        cat = lambda get: torch.cat([get(p) for p in parts]) if parts else None
        return Embeddings({m: cat(lambda p, m=m: p.unimodal[m]) for m in self.modalities},
                          {m: cat(lambda p, m=m: p.experts[m]) for m in self.modalities} if keep_experts else {},
                          {m: cat(lambda p, m=m: p.gates[m]) for m in self.modalities},
                          cat(lambda p: p.weights), cat(lambda p: p.fused),
                          cat(lambda p: p.present) if parts and parts[0].present is not None else None)


def _intra_modal(cfg: ModelConfig, modality: str, in_dim: int) -> nn.Module:
    """The intra-modal encoder of one modality (Eq. 5-7, or the option that replaces it)."""
    d, norm = cfg.hidden, cfg.moe_input_norm == "layernorm"  # whether each encoder normalises its input
    if not cfg.switches.use_hmoe:
        return LinearProjection(in_dim, d, input_norm=norm)
    if modality == "graph" and (cfg.expert == "linear" or not cfg.graph_moe):
        return PassThrough()
    if cfg.expert == "linear":
        return LinearNoisyMoE(in_dim, d, cfg.n_exp)
    return IntraModalMoE(in_dim, d, d, cfg.n_exp, input_norm=norm,
                         dropout=cfg.expert_dropout, residual=modality == "graph" and cfg.graph_residual)
