"""utils.evaluate_alignment and mutual_nearest_pairs against a brute-force numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import directional_ranks, mean_topk_similarity

from utils import evaluate_alignment, mutual_nearest_pairs


def _reference(emb: np.ndarray, pairs: np.ndarray, k: int, csls: bool, extra=((), ())) -> dict:
    """Full similarity matrix, CSLS r terms by sorting, ranks by counting (ties: half); ``extra`` =
    (left ids, right ids) are candidates only."""
    emb = np.asarray(emb, dtype=np.float64)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    left_ids = sorted(set(pairs[:, 0].tolist()) | set(np.asarray(extra[0]).tolist()))
    right_ids = sorted(set(pairs[:, 1].tolist()) | set(np.asarray(extra[1]).tolist()))
    sim = emb[left_ids] @ emb[right_ids].T  # (L, R)
    if csls:
        kk = min(k, len(right_ids))
        r_left = np.array([np.mean(sorted(row, reverse=True)[:kk]) for row in sim])
        kk = min(k, len(left_ids))
        r_right = np.array([np.mean(sorted(col, reverse=True)[:kk]) for col in sim.T])
    else:
        r_left, r_right = np.zeros(len(left_ids)), np.zeros(len(right_ids))
    score = 2 * sim - r_left[:, None] - r_right[None, :]  # (L, R)
    out = {}
    for name, mat, q_ids, c_ids, q_col, c_col in (("l2r", score, left_ids, right_ids, 0, 1),
                                                  ("r2l", score.T, right_ids, left_ids, 1, 0)):
        ranks = []
        for p in pairs:
            row = mat[q_ids.index(p[q_col])]
            gold = row[c_ids.index(p[c_col])]
            higher = sum(1 for s in row if s > gold)
            ties = sum(1 for s in row if s == gold) - 1
            ranks.append(1 + higher + ties / 2)
        r = np.array(ranks, dtype=np.float64)
        out[name] = {"hits@1": np.mean(r <= 1), "hits@5": np.mean(r <= 5), "hits@10": np.mean(r <= 10),
                     "mrr": np.mean(1 / r), "mr": np.mean(r)}
    out["avg"] = {m: (out["l2r"][m] + out["r2l"][m]) / 2 for m in out["l2r"]}
    return out


def _assert_same(got: dict, ref: dict, tol=1e-6):
    for direction in ("l2r", "r2l", "avg"):
        for metric in ("hits@1", "hits@5", "hits@10", "mrr", "mr"):
            assert got[direction][metric] == pytest.approx(ref[direction][metric], abs=tol), (direction, metric)


def _random_case(seed=0, n=40, d=6, n_pairs=15):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    left = rng.choice(n // 2, n_pairs, replace=False)
    right = n // 2 + rng.choice(n // 2, n_pairs, replace=False)
    pairs = np.stack([left, right], 1)
    # Make some pairs similar, so that the metrics are not all near chance.
    emb[right[:8]] = emb[left[:8]] + 0.5 * rng.normal(size=(8, d)).astype(np.float32)
    return emb, pairs


@pytest.mark.parametrize("csls", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_evaluate_alignment_equals_brute_force(csls, seed):
    emb, pairs = _random_case(seed)
    got = evaluate_alignment(torch.from_numpy(emb), pairs, csls_k=3, use_csls=csls)
    ref = _reference(emb, pairs, 3, csls)
    _assert_same(got, ref)
    assert 0 < got["avg"]["hits@1"] < 1  # the case is not degenerate


@pytest.mark.parametrize("csls", [True, False])
def test_extra_candidates_join_the_ranking_but_are_not_queries(csls):
    """Validation pairs ranked among their own entities plus distractors (the test entities under
    --valid_pool heldout): the brute-force ranks over the larger candidate sets, over the same queries;
    an added candidate can only push a gold down when the score is the plain cosine."""
    emb, pairs = _random_case(3, n=60, n_pairs=20)
    queries, distractors = pairs[:8], pairs[8:]
    extra = (distractors[:, 0], distractors[:, 1])
    got = evaluate_alignment(torch.from_numpy(emb), queries, csls_k=3, use_csls=csls, extra_candidates=extra)
    _assert_same(got, _reference(emb, queries, 3, csls, extra))
    alone = evaluate_alignment(torch.from_numpy(emb), queries, csls_k=3, use_csls=csls)
    if not csls:
        assert got["avg"]["mr"] > alone["avg"]["mr"]
        assert got["avg"]["mrr"] <= alone["avg"]["mrr"]
    ids = np.unique(pairs)  # rows of a sub-table, as train.evaluate passes them
    sub = evaluate_alignment(torch.from_numpy(emb[ids]), queries, ids=ids, csls_k=3, use_csls=csls,
                             extra_candidates=extra)
    _assert_same(sub, got)


def test_csls_demotes_a_hub():
    """Left i = e_i; its counterpart is 0.4 e_i + 0.92 e_5; the hub (e_0 + ... + e_4) / sqrt(5)
    has cosine 0.447 with every left entity and wins every cosine top-1. With CSLS (k = 2) the
    hub's large r term demotes it and every counterpart ranks first. Brute force agrees in both modes."""
    eye = np.eye(6)
    left = eye[:5]
    right = 0.4 * eye[:5] + np.sqrt(1 - 0.16) * eye[5]
    hub = eye[:5].sum(0) / np.sqrt(5)
    emb = np.concatenate([left, right, hub[None]]).astype(np.float32)
    pairs = np.array([[i, 5 + i] for i in range(5)] + [[0, 10]])
    cos = evaluate_alignment(torch.from_numpy(emb), pairs, use_csls=False, with_predictions=True)
    csls = evaluate_alignment(torch.from_numpy(emb), pairs, use_csls=True, csls_k=2, with_predictions=True)
    _assert_same(cos, _reference(emb, pairs, 2, False))
    _assert_same(csls, _reference(emb, pairs, 2, True))
    assert list(cos["predictions"]["pred_right"]) == [10] * 6
    assert list(csls["predictions"]["pred_right"]) == [5, 6, 7, 8, 9, 5]
    assert cos["l2r"]["hits@1"] == pytest.approx(1 / 6) and csls["l2r"]["hits@1"] == pytest.approx(5 / 6)


def test_exact_ties_get_half_credit():
    # One-hot rows: every similarity is exactly 0 or 1 in float32 and in float64.
    eye = np.eye(4, dtype=np.float32)
    # Entities 0, 1 (left); 2, 3, 4 (right). Right 2 and 3 are the same vector as left 0.
    emb = np.stack([eye[0], eye[1], eye[0], eye[0], eye[1]])
    pairs = np.array([[0, 2], [1, 4], [0, 3]])
    got = evaluate_alignment(torch.from_numpy(emb), pairs, use_csls=False)
    # l2r: query 0 sees right 2 and 3 tied at 1, right 4 at 0 -> rank 1.5 for both of its pairs;
    # query 1 sees right 4 alone at 1 -> rank 1. r2l: right 2 and 3 each see left 0 at 1 alone.
    assert got["l2r"]["mr"] == pytest.approx((1.5 + 1 + 1.5) / 3)
    assert got["l2r"]["hits@1"] == pytest.approx(1 / 3)
    assert got["l2r"]["mrr"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert got["r2l"]["mr"] == 1.0 and got["r2l"]["hits@1"] == 1.0
    _assert_same(got, _reference(emb, pairs, 3, False))
    _assert_same(evaluate_alignment(torch.from_numpy(emb), pairs, use_csls=True, csls_k=2),
                 _reference(emb, pairs, 2, True))


def test_directional_ranks_tie_rule():
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    zeros_q, zeros_c = torch.zeros(1), torch.zeros(5)
    # gold among three equal best: 1 + 0 higher + 2 ties / 2 = 2.
    assert directional_ranks(q, c, torch.tensor([1]), zeros_q, zeros_c, chunk=4).tolist() == [2.0]
    # gold at the unique fourth score: 3 higher, no tie.
    assert directional_ranks(q, c, torch.tensor([3]), zeros_q, zeros_c, chunk=4).tolist() == [4.0]


@pytest.mark.parametrize("csls", [True, False])
def test_chunked_equals_unchunked(csls):
    emb, pairs = _random_case(2)
    full = evaluate_alignment(torch.from_numpy(emb), pairs, use_csls=csls, chunk=4096, with_predictions=True)
    small = evaluate_alignment(torch.from_numpy(emb), pairs, use_csls=csls, chunk=3, with_predictions=True)
    _assert_same(small, full, tol=1e-9)
    np.testing.assert_array_equal(small["predictions"]["pred_right"], full["predictions"]["pred_right"])
    np.testing.assert_allclose(small["predictions"]["rank"], full["predictions"]["rank"])


def test_mean_topk_similarity_by_sorting():
    rng = np.random.default_rng(3)
    a = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(7, 3))), dim=1).float()
    b = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(5, 3))), dim=1).float()
    got = mean_topk_similarity(a, b, 2, chunk=3)
    sim = a.double().numpy() @ b.double().numpy().T
    ref = np.sort(sim, axis=1)[:, ::-1][:, :2].mean(1)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    # k larger than the candidate set: the mean over all candidates.
    np.testing.assert_allclose(mean_topk_similarity(a, b, 50, chunk=3).numpy(), sim.mean(1), atol=1e-6)


@pytest.mark.parametrize("csls", [True, False])
def test_ids_argument_equals_full_matrix(csls):
    emb, pairs = _random_case(4)
    full = evaluate_alignment(torch.from_numpy(emb), pairs, use_csls=csls)
    ids = np.unique(pairs)
    rows = evaluate_alignment(torch.from_numpy(emb[ids]), pairs, ids=ids, use_csls=csls)
    _assert_same(rows, full, tol=1e-9)
    # A superset of ids (extra rows that are no candidates) changes nothing.
    more = np.unique(np.concatenate([ids, [0, 1, 2, 39]]))
    _assert_same(evaluate_alignment(torch.from_numpy(emb[more]), pairs, ids=more, use_csls=csls), full, tol=1e-9)


def test_predictions_name_the_top1_candidate():
    emb, pairs = _random_case(6)
    res = evaluate_alignment(torch.from_numpy(emb), pairs, use_csls=False, with_predictions=True)
    p = res["predictions"]
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    right = np.unique(pairs[:, 1])
    for left, pred in zip(p["left"], p["pred_right"]):
        assert pred == right[np.argmax(e[right] @ e[left])]
    np.testing.assert_array_equal(p["rank"] == 1, p["pred_right"] == p["gold_right"])


def test_mutual_nearest_pairs_on_a_known_toy():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(5, 8)).astype(np.float32)
    perm = np.array([3, 0, 4, 1, 2])
    left_emb = base  # left entity l = 10 + i has vector base[i]
    right_emb = base[perm] + 0.01 * rng.normal(size=(5, 8)).astype(np.float32)  # right 20 + j ~ base[perm[j]]
    # A sixth right entity between two left ones: nobody's mutual best.
    right_emb = np.concatenate([right_emb, ((base[0] + base[1]) / 2)[None] * 0.2]).astype(np.float32)
    left_ids, right_ids = np.arange(10, 15), np.arange(20, 26)
    got = mutual_nearest_pairs(torch.from_numpy(left_emb), torch.from_numpy(right_emb), left_ids, right_ids,
                               csls_k=2, chunk=2)
    expected = {(10 + perm[j], 20 + j) for j in range(5)}
    assert {tuple(map(int, r)) for r in got} == expected
    assert got.shape == (5, 2)
    empty = mutual_nearest_pairs(torch.from_numpy(left_emb), torch.zeros(0, 8), left_ids, np.zeros(0, np.int64))
    assert empty.shape == (0, 2)


def test_mutual_nearest_pairs_drops_one_sided_matches():
    # Left 0 and left 1 both prefer right 0; right 0 prefers left 0; right 1 is far from both.
    left = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]])
    right = torch.tensor([[1.0, 0.01, 0.0], [0.0, 0.0, 1.0]])
    got = mutual_nearest_pairs(left, right, np.array([0, 1]), np.array([2, 3]), csls_k=1)
    pairs = {tuple(map(int, r)) for r in got}
    assert (0, 2) in pairs and (1, 2) not in pairs
