"""One-direction reference implementations of the evaluation rules, for the tests only:
utils.evaluate_alignment computes both directions from one shared cosine matrix, and the tests
check it against these plain per-direction loops."""

from __future__ import annotations

import torch


def _row_blocks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield slice(s, min(s + chunk, n))


@torch.no_grad()
def mean_topk_similarity(queries: torch.Tensor, candidates: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """r(q) = mean of the k largest cosine similarities of q to the candidates (CSLS's r term).
    A one-direction reference; evaluate_alignment gets both directions' r terms from one matrix."""
    k = min(k, candidates.shape[0])
    out = torch.empty(queries.shape[0], device=queries.device)
    for b in _row_blocks(queries.shape[0], chunk):
        out[b] = (queries[b] @ candidates.t()).topk(k, dim=1).values.mean(1)
    return out


@torch.no_grad()
def directional_ranks(queries, candidates, gold, r_q, r_c, chunk: int, return_top1: bool = False):
    """Rank of gold[i] among all candidates for query i.

    score(q, c) = 2 cos(q, c) - r_q - r_c (CSLS; pass zeros for plain cosine).
    Ties: rank = 1 + #(candidates scoring strictly higher) + #(other candidates scoring
    exactly the same) / 2, the expected rank under random tie breaking.
    queries: (Q, D) normalised, candidates: (C, D) normalised, gold: (Q,) candidate index.
    A one-direction reference of the rule; evaluate_alignment applies it to one shared matrix.
    """
    ranks = torch.empty(queries.shape[0], dtype=torch.float64, device=queries.device)
    top1 = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    top1_score = torch.empty(queries.shape[0], device=queries.device)
    for b in _row_blocks(queries.shape[0], chunk):
        scores = 2 * (queries[b] @ candidates.t()) - r_q[b, None] - r_c[None, :]  # (q, C)
        gold_score = scores.gather(1, gold[b, None])  # (q, 1)
        higher = (scores > gold_score).sum(1)
        ties = (scores == gold_score).sum(1) - 1
        ranks[b] = 1 + higher.double() + 0.5 * ties.double()
        if return_top1:
            top1_score[b], top1[b] = scores.max(1)
    return (ranks, top1, top1_score) if return_top1 else ranks
