"""HUMEA's losses, one function per paper equation (Eq. 8-9, 13-14, 15, 16, 17).

Axis letters: B aligned seed pairs in a batch, C = 2B candidates of one anchor (B of the other
graph, B of its own graph with itself masked out), D embedding size, K experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import GaussianConditional


def pair_cosines(z1: torch.Tensor, z2: torch.Tensor):
    """The three cosine matrices of B seed pairs that Eq. 13 reads: cross z1_i . z2_j, intra-graph
    z1_i . z1_j and z2_i . z2_j, on L2-normalised rows. z1, z2: (B, D). Returns three (B, B).

    They do not depend on the temperature, so one batch computes them once per embedding and reuses
    them for every loss that reads them (``batch_alignment_losses``)."""
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    return z1 @ z2.t(), z1 @ z1.t(), z2 @ z2.t()  # (B, B) each


def log_probs_from_cosines(cosines, tau: float):
    """Eq. 13's log-distributions of both directions from ``pair_cosines`` at temperature tau."""
    cross, intra1, intra2 = cosines
    self_mask = torch.eye(cross.shape[0], dtype=torch.bool, device=cross.device)
    cross = cross / tau  # (B, B): [i, j] = z1_i . z2_j / tau
    intra1 = (intra1 / tau).masked_fill(self_mask, -torch.inf)
    intra2 = (intra2 / tau).masked_fill(self_mask, -torch.inf)
    log_q12 = torch.log_softmax(torch.cat([cross, intra1], dim=1), dim=1)  # (B, 2B)
    log_q21 = torch.log_softmax(torch.cat([cross.t(), intra2], dim=1), dim=1)  # (B, 2B)
    return log_q12, log_q21


def alignment_log_probs(z1: torch.Tensor, z2: torch.Tensor, tau: float):
    """Log of the alignment distributions of Eq. 13, in both directions.

    Row i of the first result is log q(e_i^1 -> .) over the candidates
    [e_1^2 .. e_B^2, e_1^1 .. e_B^1]: cross-graph candidates (the positive e_i^2 at column i)
    then intra-graph negatives, where e_i^1 itself is excluded (probability 0).
    delta(u, v) = exp(u.v / tau) on L2-normalised embeddings. The second result is the same
    with the graphs swapped (anchor e_i^2).

    z1, z2: (B, D) embeddings of the two sides of B seed pairs. Returns two (B, 2B) tensors.
    """
    return log_probs_from_cosines(pair_cosines(z1, z2), tau)


def contrastive_alignment_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 13-14: L^CL = -E_i log[ (q(e_i^1, e_i^2) + q(e_i^2, e_i^1)) / 2 ].

    The two directions are averaged inside the log, as Eq. 14 writes it (MCLEA-style code
    averages the two log-probabilities instead). Used for the fused embedding (L_f^CL) and,
    per modality, for Eq. 15 (L_m^CL)."""
    return _contrastive_from_log_probs(*alignment_log_probs(z1, z2, tau))


def _contrastive_from_log_probs(log_q12: torch.Tensor, log_q21: torch.Tensor) -> torch.Tensor:
    pos12, pos21 = log_q12.diagonal(), log_q21.diagonal()  # (B,), (B,)
    return -(torch.logaddexp(pos12, pos21) - math.log(2.0)).mean()


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, for rows that may hold zero-probability (-inf) candidates."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def unimodal_distillation_loss(z1_m, z2_m, z1_f, z2_f, tau: float) -> torch.Tensor:
    """Eq. 16: E_i [ KL(Q_m(e_i^1, .) || Q_f(e_i^1, .)) + KL(Q_m(e_i^2, .) || Q_f(e_i^2, .)) ].

    Q_m and Q_f are the alignment distributions of Eq. 13 at temperature tau (tau_al) built
    from the unimodal and the fused embeddings. The distillation is unidirectional, from the
    modality (teacher, no gradient) to the fused representation (student). Eq. 16 as printed
    has a leading minus sign, which would maximise the divergence; we minimise it. In the
    official code the teacher is the detached *fused* distribution instead (opposite direction).
    """
    with torch.no_grad():
        teacher = alignment_log_probs(z1_m, z2_m, tau)
    return _distillation_from_log_probs(teacher, alignment_log_probs(z1_f, z2_f, tau))


def _distillation_from_log_probs(teacher, student) -> torch.Tensor:
    (t12, t21), (s12, s21) = teacher, student
    return (_kl_rows(t12, s12) + _kl_rows(t21, s21)).mean()


def batch_alignment_losses(z1_f: torch.Tensor, z2_f: torch.Tensor, unimodal1: dict, unimodal2: dict,
                           tau_cl: float, tau_al: float, unimodal_cl: bool = True, distill: bool = True,
                           present: dict | None = None, joint_teacher: bool = False):
    """Eq. 13-16 on one batch of B seed pairs: L_f^CL, and per modality L_m^CL and L_m^AL.

    Each term equals its per-equation function (contrastive_alignment_loss,
    unimodal_distillation_loss; tests/test_fast_paths.py checks it), but every cosine matrix is
    computed once: the fused (B, M*D) cosines serve L_f^CL at tau_cl and the student Q_f of every
    modality's Eq. 16 at tau_al (the same Q_f for all M modalities); a modality's cosines serve its
    L_m^CL and, detached, its teacher Q_m. Calling the functions one by one computes the fused
    cosines 1 + M times per batch, which on FB15K-DB15K cost as much as all the experts together.

    z1_f, z2_f: (B, M*D) fused rows of the two sides; unimodal1/2: modality -> (B, D).
    ``present``: modality -> (B,) bool, the pairs whose two entities both have the modality; a
    modality's L_m^CL and L_m^AL are then computed on those pairs only (the others neither anchor nor
    serve as negatives), and a modality held by fewer than two pairs adds nothing.
    ``joint_teacher`` (the official code's direction): the detached fused distribution teaches the
    unimodal one, KL(Q_f || Q_m), and the gradient reaches the modality instead of the fused embedding.
    Returns (L_f^CL, {m: L_m^CL} or {}, {m: L_m^AL} or {})."""
    fused = pair_cosines(z1_f, z2_f)
    fused_cl = _contrastive_from_log_probs(*log_probs_from_cosines(fused, tau_cl))
    cl, al = {}, {}
    for m in unimodal1 if unimodal_cl or distill else ():
        keep = None if present is None or m not in present else present[m]
        if keep is not None and bool(keep.all()):
            keep = None
        if keep is not None and int(keep.sum()) < 2:
            continue
        u1, u2 = (unimodal1[m], unimodal2[m]) if keep is None else (unimodal1[m][keep], unimodal2[m][keep])
        with torch.set_grad_enabled((unimodal_cl or joint_teacher) and torch.is_grad_enabled()):
            cos_m = pair_cosines(u1, u2)
        if unimodal_cl:
            cl[m] = _contrastive_from_log_probs(*log_probs_from_cosines(cos_m, tau_cl))
        if distill:
            fused_m = fused if keep is None else [c[keep][:, keep] for c in fused]
            if joint_teacher:
                with torch.no_grad():
                    teacher = log_probs_from_cosines([c.detach() for c in fused_m], tau_al)
                al[m] = _distillation_from_log_probs(teacher, log_probs_from_cosines(cos_m, tau_al))
            else:
                with torch.no_grad():  # the unimodal teacher gets no gradient
                    teacher = log_probs_from_cosines([c.detach() for c in cos_m], tau_al)
                al[m] = _distillation_from_log_probs(teacher, log_probs_from_cosines(fused_m, tau_al))
    return fused_cl, cl, al


class CLUBDisentanglement(nn.Module):
    """Eq. 8-9: CLUB upper bound on the mutual information between the experts of a modality.

        I_CLUB(x; y) = E_p(x,y)[log Q(y|x)] - E_p(x) E_p(y)[log Q(y|x)]            (Eq. 8)
        L_CLUB = 1/K^2 sum_m sum_{a != b} E_i [ log Q_m(h_b^i | h_a^i)
                                  - E_{i' != i} log Q_m(h_b^{i'} | h_a^i) ]        (Eq. 9)

    Eq. 9 sums over the batch where Eq. 8 takes expectations; we use the expectations (a batch
    mean over i and over i' != i), which keeps the weight ``mi_loss`` independent of the
    batch size. One Gaussian variational network Q_m per modality, shared by its expert pairs.
    Its parameters are fitted by their own optimiser on ``q_fit_loss`` (maximum likelihood on
    detached expert outputs); ``forward`` is the bound the model minimises.
    """

    def __init__(self, modalities, dim: int, hidden: int):
        super().__init__()
        self.q = nn.ModuleDict({m: GaussianConditional(dim, hidden) for m in modalities})

    def forward(self, experts: dict[str, torch.Tensor], pairs: dict | None = None) -> torch.Tensor:
        """experts: modality -> (B, K, D) expert outputs. Returns the summed bound (scalar).
        ``pairs`` (the official code's variant, ``--club random_pair``): modality -> one ordered
        expert pair (a, b); the bound of that pair alone replaces the mean over all pairs."""
        total = 0.0
        for m, y in experts.items():
            if m not in self.q or y.shape[1] < 2 or y.shape[0] < 2:
                continue
            total = total + self._bound(self.q[m], y, None if pairs is None else pairs[m])
        return torch.as_tensor(total)

    def q_fit_loss(self, experts: dict[str, torch.Tensor], pairs: dict | None = None) -> torch.Tensor:
        """Negative log-likelihood of Q_m(h_b | h_a) over expert pairs a != b (or the one pair of
        ``pairs[m]``), for fitting Q."""
        total = 0.0
        for m, y in experts.items():
            if m not in self.q or y.shape[1] < 2:
                continue
            y = y.detach()
            mu, logvar = self.q[m](y)  # (B, K, D) each, conditioned on expert a
            sq = _scaled_sq_dist(y, mu, torch.exp(-logvar))  # (B, K_a, K_b)
            loglik = -0.5 * (sq + logvar.sum(-1)[:, :, None])
            total = total - loglik[:, _pair_mask(y, None if pairs is None else pairs[m])].mean()
        return torch.as_tensor(total)

    @staticmethod
    def _bound(q: GaussianConditional, y: torch.Tensor, pair=None) -> torch.Tensor:
        b, k, _ = y.shape
        mu, logvar = q(y)  # (B, K, D): mean and log-variance of Q(. | h_a^i)
        inv_var = torch.exp(-logvar)
        # Positive term: log Q(h_b^i | h_a^i) = -sq/2 up to constants that cancel in the difference.
        sq_pos = _scaled_sq_dist(y, mu, inv_var)  # (B, K_a, K_b)
        # Negative term over i' != i in closed form: sum_i' (y_i' - mu)^2 / var =
        # (S2 - 2 mu S1 + B mu^2) / var, minus the i' = i term; O(B K^2 D) time, O(B K^2) memory.
        s1, s2 = y.sum(0), (y**2).sum(0)  # (K_b, D)
        sq_all = (torch.einsum("iad,bd->iab", inv_var, s2) - 2 * torch.einsum("iad,bd->iab", mu * inv_var, s1)
                  + b * (mu**2 * inv_var).sum(-1)[:, :, None])  # (B, K_a, K_b)
        sq_others = (sq_all - sq_pos) / (b - 1)
        per_pair = (-0.5 * sq_pos + 0.5 * sq_others).mean(0)  # (K_a, K_b)
        if pair is not None:
            return per_pair[pair[0], pair[1]]
        return per_pair[_off_diagonal(y)].sum() / k**2


def random_expert_pairs(modalities, k: int, gen: torch.Generator) -> dict:
    """One random ordered pair (a, b), a != b, of the K experts per modality (``--club random_pair``)."""
    out = {}
    for m in modalities:
        a, b = torch.randperm(k, generator=gen)[:2].tolist()
        out[m] = (a, b)
    return out


def _off_diagonal(y: torch.Tensor) -> torch.Tensor:
    k = y.shape[1]
    return ~torch.eye(k, dtype=torch.bool, device=y.device)


def _pair_mask(y: torch.Tensor, pair) -> torch.Tensor:
    if pair is None:
        return _off_diagonal(y)
    mask = torch.zeros(y.shape[1], y.shape[1], dtype=torch.bool, device=y.device)
    mask[pair[0], pair[1]] = True
    return mask


def _scaled_sq_dist(y: torch.Tensor, mu: torch.Tensor, inv_var: torch.Tensor) -> torch.Tensor:
    """sq[i, a, b] = sum_d (y[i, b, d] - mu[i, a, d])^2 * inv_var[i, a, d], without the (B, K, K, D)
    tensor: expanded into three batched matmuls. y, mu, inv_var: (B, K, D)."""
    return (torch.einsum("iad,ibd->iab", inv_var, y**2) - 2 * torch.einsum("iad,ibd->iab", mu * inv_var, y)
            + (mu**2 * inv_var).sum(-1)[:, :, None])


class UncertaintyWeights(nn.Module):
    """The official code's combination of several losses (``--loss_weighting uncertainty``, after
    Kendall et al. 2018): sum_i exp(-s_i) L_i + s_i with a learned log-variance s_i per loss, s = 0
    at the start (a plain sum)."""

    def __init__(self, names):
        super().__init__()
        self.names = tuple(names)
        self.log_var = nn.Parameter(torch.zeros(len(self.names)))

    def forward(self, losses: dict) -> torch.Tensor:
        total = 0.0
        for i, name in enumerate(self.names):
            if torch.is_tensor(losses.get(name)):  # a modality no pair of the epoch had adds nothing
                total = total + torch.exp(-self.log_var[i]) * losses[name] + self.log_var[i]
        return torch.as_tensor(total)


def total_loss(fused_cl, unimodal_cl: dict, club, distill: dict, cl_weight: float, al_weight: float,
               mi_weight: float, combine_cl=None, combine_al=None) -> torch.Tensor:
    """Eq. 17: L = L_f^CL + lambda_1 sum_m L_m^CL + w_mi L_CLUB + lambda_2 sum_m L_m^AL.

    The paper writes L_CLUB with weight 1; the official code (and our default) weights it by
    ``mi_loss`` = 1e-4. ``combine_cl`` / ``combine_al`` replace the two sums over the modalities
    (e.g. ``UncertaintyWeights``)."""
    loss = fused_cl + mi_weight * club
    if unimodal_cl:
        loss = loss + cl_weight * (combine_cl or _plain_sum)(unimodal_cl)
    if distill:
        loss = loss + al_weight * (combine_al or _plain_sum)(distill)
    return loss


def _plain_sum(losses: dict):
    return sum(losses.values())
