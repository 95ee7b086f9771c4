"""loss.py against hand computations with explicit loops on tiny float64 inputs."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from loss import (
    CLUBDisentanglement,
    alignment_log_probs,
    contrastive_alignment_loss,
    total_loss,
    unimodal_distillation_loss,
)

TAU = 0.5


def _delta(u, v, tau):
    """delta(u, v) = exp(u.v / tau) on L2-normalised vectors (the loss normalises its inputs)."""
    return math.exp(float(F.normalize(u, dim=0) @ F.normalize(v, dim=0)) / tau)


def _q_row(anchor_side, other_side, i, tau):
    """Eq. 13's alignment distribution of anchor anchor_side[i] over its candidates, as a list:
    [cross-graph other_side[j] for all j] + [intra-graph anchor_side[j] for j != i]."""
    b = len(anchor_side)
    cand = [other_side[j] for j in range(b)] + [anchor_side[j] for j in range(b) if j != i]
    num = [_delta(anchor_side[i], c, tau) for c in cand]
    z = sum(num)
    return [v / z for v in num]


def _hand_contrastive(z1, z2, tau):
    b = len(z1)
    total = 0.0
    for i in range(b):
        pos = _delta(z1[i], z2[i], tau)
        intra = sum(_delta(z1[i], z1[j], tau) for j in range(b) if j != i)
        cross = sum(_delta(z1[i], z2[j], tau) for j in range(b) if j != i)
        q12 = pos / (pos + intra + cross)  # Eq. 13
        pos_b = _delta(z2[i], z1[i], tau)
        intra_b = sum(_delta(z2[i], z2[j], tau) for j in range(b) if j != i)
        cross_b = sum(_delta(z2[i], z1[j], tau) for j in range(b) if j != i)
        q21 = pos_b / (pos_b + intra_b + cross_b)
        total += -math.log(0.5 * (q12 + q21))  # Eq. 14
    return total / b


def _example(seed=0, b=3, d=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Eq. 13-14.
# ---------------------------------------------------------------------------------------------


def test_contrastive_loss_equals_hand_computation_3x3():
    z1, z2 = _example(0)
    got = contrastive_alignment_loss(z1, z2, TAU)
    assert abs(float(got.detach()) - _hand_contrastive(z1, z2, TAU)) < 1e-10
    # Same with another temperature, and with non-unit inputs (delta uses the cosine).
    assert abs(float(contrastive_alignment_loss(3 * z1, z2, 0.1)) - _hand_contrastive(z1, z2, 0.1)) < 1e-10


def test_alignment_log_probs_rows_and_self_exclusion():
    z1, z2 = _example(1)
    log_q12, log_q21 = alignment_log_probs(z1, z2, TAU)
    assert log_q12.shape == (3, 6)
    for i in range(3):
        ref12 = _q_row(z1, z2, i, TAU)
        ref21 = _q_row(z2, z1, i, TAU)
        p12, p21 = log_q12[i].exp(), log_q21[i].exp()
        assert p12[3 + i] == 0 and p21[3 + i] == 0  # the anchor itself is no candidate
        keep = [j for j in range(6) if j != 3 + i]
        torch.testing.assert_close(p12[keep], torch.tensor(ref12, dtype=torch.float64))
        torch.testing.assert_close(p21[keep], torch.tensor(ref21, dtype=torch.float64))


def test_contrastive_loss_is_symmetric_in_the_two_graphs():
    z1, z2 = _example(2, b=4, d=5)
    torch.testing.assert_close(contrastive_alignment_loss(z1, z2, TAU), contrastive_alignment_loss(z2, z1, TAU))


def test_few_adamw_steps_raise_seed_pair_similarity():
    torch.manual_seed(0)
    z1 = torch.nn.Parameter(torch.randn(8, 6))
    z2 = torch.nn.Parameter(torch.randn(8, 6))
    opt = torch.optim.AdamW([z1, z2], lr=0.05)

    def pos_sim():
        return float(F.cosine_similarity(z1, z2, dim=1).mean().detach())

    before_sim, before_loss = pos_sim(), float(contrastive_alignment_loss(z1, z2, 0.1).detach())
    for _ in range(20):
        opt.zero_grad()
        contrastive_alignment_loss(z1, z2, 0.1).backward()
        opt.step()
    assert pos_sim() > before_sim + 0.3
    assert float(contrastive_alignment_loss(z1, z2, 0.1).detach()) < before_loss


# ---------------------------------------------------------------------------------------------
# Eq. 16.
# ---------------------------------------------------------------------------------------------


def _hand_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_distillation_equals_hand_kl_both_directions_teacher_without_gradient():
    z1m, z2m = _example(3)
    z1f, z2f = _example(4, d=6)
    z1m.requires_grad_(True)
    z2m.requires_grad_(True)
    z1f.requires_grad_(True)
    z2f.requires_grad_(True)
    tau = 4.0
    got = unimodal_distillation_loss(z1m, z2m, z1f, z2f, tau)
    ref = 0.0
    for i in range(3):
        ref += _hand_kl(_q_row(z1m.detach(), z2m.detach(), i, tau), _q_row(z1f.detach(), z2f.detach(), i, tau))
        ref += _hand_kl(_q_row(z2m.detach(), z1m.detach(), i, tau), _q_row(z2f.detach(), z1f.detach(), i, tau))
    ref /= 3
    assert abs(float(got.detach()) - ref) < 1e-10
    assert float(got.detach()) > 0
    got.backward()
    assert z1m.grad is None and z2m.grad is None  # the unimodal teacher gets no gradient
    assert z1f.grad is not None and z1f.grad.abs().sum() > 0
    assert z2f.grad is not None and z2f.grad.abs().sum() > 0


def test_distillation_is_zero_when_student_equals_teacher():
    z1, z2 = _example(5)
    assert abs(float(unimodal_distillation_loss(z1, z2, z1, z2, 4.0))) < 1e-12


# ---------------------------------------------------------------------------------------------
# Eq. 8-9: CLUB.
# ---------------------------------------------------------------------------------------------


def _log_gauss(y, mu, logvar):
    """Full Gaussian log-likelihood log N(y; mu, diag(exp(logvar)))."""
    d = y.numel()
    y, mu, logvar = y.detach(), mu.detach(), logvar.detach()
    return float(-0.5 * (((y - mu) ** 2) / logvar.exp()).sum() - 0.5 * logvar.sum() - 0.5 * d * math.log(2 * math.pi))


def _brute_bound(q, y):
    """Eq. 9 with expectations: 1/K^2 sum_{a != b} mean_i [log Q(h_b^i|h_a^i) - mean_{i' != i} log Q(h_b^i'|h_a^i)]."""
    b, k, _ = y.shape
    total = 0.0
    for a in range(k):
        for bb in range(k):
            if a == bb:
                continue
            acc = 0.0
            for i in range(b):
                mu, logvar = q(y[i, a][None])
                mu, logvar = mu[0], logvar[0]
                pos = _log_gauss(y[i, bb], mu, logvar)
                neg = sum(_log_gauss(y[j, bb], mu, logvar) for j in range(b) if j != i) / (b - 1)
                acc += pos - neg
            total += acc / b
    return total / k**2


def _brute_nll(q, y):
    b, k, _ = y.shape
    vals = []
    for i in range(b):
        for a in range(k):
            mu, logvar = q(y[i, a][None])
            for bb in range(k):
                if a != bb:
                    vals.append(-_log_gauss(y[i, bb], mu[0], logvar[0]))
    return sum(vals) / len(vals)


def _club(mods=("image", "graph"), d=3, seed=0):
    torch.manual_seed(seed)
    club = CLUBDisentanglement(mods, d, 5).double()
    for p in club.parameters():  # larger weights: logvar away from 0, mu away from a constant
        torch.nn.init.normal_(p, std=0.8)
    return club


def test_club_bound_equals_brute_force_eq9():
    club = _club()
    g = torch.Generator().manual_seed(1)
    experts = {"image": torch.randn(4, 3, 3, generator=g, dtype=torch.float64),
               "graph": torch.randn(5, 2, 3, generator=g, dtype=torch.float64)}
    got = club(experts)
    ref = _brute_bound(club.q["image"], experts["image"]) + _brute_bound(club.q["graph"], experts["graph"])
    assert abs(float(got.detach()) - ref) < 1e-9
    # Modalities without a Q, one expert or one entity add nothing.
    extra = {**experts, "attr_bow": torch.randn(4, 3, 3, dtype=torch.float64)}
    assert abs(float(club(extra).detach()) - ref) < 1e-9
    assert float(club({"image": experts["image"][:, :1]}).detach()) == 0.0
    assert float(club({"image": experts["image"][:1]}).detach()) == 0.0


def test_club_bound_gradient_reaches_experts_only_through_the_bound():
    """As train_epoch uses CLUB: Q_m frozen while the model minimises the bound, then fitted on
    detached outputs. The experts' gradient is the gradient of Eq. 9 itself (central differences of
    the brute-force bound), the bound gives Q_m no gradient, and fitting Q_m gives the experts none."""
    club = _club()
    g = torch.Generator().manual_seed(4)
    y = torch.randn(4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    club.requires_grad_(False)
    club({"image": y}).backward()
    assert all(p.grad is None for p in club.parameters())
    eps, numeric = 1e-6, torch.zeros_like(y)
    for idx in np.ndindex(*y.shape):
        step = torch.zeros_like(y)
        step[idx] = eps
        numeric[idx] = (_brute_bound(club.q["image"], (y + step).detach())
                        - _brute_bound(club.q["image"], (y - step).detach())) / (2 * eps)
    assert numeric.abs().sum() > 0 and torch.allclose(y.grad, numeric, atol=1e-6)
    club.requires_grad_(True)
    y.grad = None
    club.q_fit_loss({"image": y}).backward()
    assert y.grad is None and all(p.grad is not None for p in club.q["image"].parameters())


def test_q_fit_loss_equals_brute_force_nll():
    club = _club()
    g = torch.Generator().manual_seed(2)
    experts = {"image": torch.randn(4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True),
               "graph": torch.randn(5, 2, 3, generator=g, dtype=torch.float64)}
    got = club.q_fit_loss(experts)
    ref = _brute_nll(club.q["image"], experts["image"].detach()) + _brute_nll(club.q["graph"], experts["graph"])
    # q_fit_loss drops the constant D/2 log(2 pi) of each modality's Gaussian NLL.
    assert abs(float(got.detach()) + 2 * 0.5 * 3 * math.log(2 * math.pi) - ref) < 1e-9
    got.backward()
    assert experts["image"].grad is None  # fitting Q does not move the experts
    assert all(p.grad is not None for p in club.q["image"].parameters())


def test_club_bound_is_larger_on_correlated_than_on_independent_experts():
    """A property of the estimator: after fitting Q, dependent expert outputs give a large bound,
    independent ones a bound near zero. The bound is evaluated on fresh samples of the same
    distributions (on the fitting batch an over-fitted Q inflates it a little)."""
    g = torch.Generator().manual_seed(3)
    d = 4

    def draw(b):
        x = torch.randn(b, d, generator=g)
        return {"correlated": torch.stack([x, x + 0.1 * torch.randn(b, d, generator=g)], 1),  # (B, 2, D)
                "independent": torch.stack([x, torch.randn(b, d, generator=g)], 1)}

    fit, fresh = draw(128), draw(512)
    bounds = {}
    for name in ("correlated", "independent"):
        torch.manual_seed(0)
        club = CLUBDisentanglement(["image"], d, 16)
        opt = torch.optim.Adam(club.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            club.q_fit_loss({"image": fit[name]}).backward()
            opt.step()
        with torch.no_grad():
            bounds[name] = float(club({"image": fresh[name]}))
    assert bounds["correlated"] > 3.0
    assert abs(bounds["independent"]) < 0.3
    assert bounds["correlated"] > bounds["independent"] + 3.0


# ---------------------------------------------------------------------------------------------
# Eq. 17.
# ---------------------------------------------------------------------------------------------


def test_total_loss_combines_as_eq17():
    f = torch.tensor(1.5)
    uni = {"graph": torch.tensor(0.5), "image": torch.tensor(0.25)}
    club = torch.tensor(8.0)
    al = {"graph": torch.tensor(2.0), "image": torch.tensor(4.0)}
    got = total_loss(f, uni, club, al, cl_weight=0.3, al_weight=0.1, mi_weight=1e-2)
    assert abs(float(got.detach()) - (1.5 + 0.3 * 0.75 + 1e-2 * 8.0 + 0.1 * 6.0)) < 1e-6
    # Switched-off components: empty dicts add nothing.
    assert abs(float(total_loss(f, {}, club, {}, 0.3, 0.1, 1e-2)) - (1.5 + 0.08)) < 1e-6
