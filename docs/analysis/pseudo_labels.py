"""How good would iterative training's pseudo pairs be, from one checkpoint: the mutual CSLS nearest
neighbours among the entities outside the seed pairs, their count and precision (the gold links are
known for the test entities), and how both change with the CSLS margin over the runner-up
(train.py --il_margin). Made to choose the pseudo-label scheme (docs/accuracy.md, "Iterative training").

    python docs/analysis/pseudo_labels.py CKPT                       # margins 0, 0.02, 0.05, 0.1, 0.2
    python docs/analysis/pseudo_labels.py CKPT --margins 0 0.05 0.1
    python docs/analysis/pseudo_labels.py CKPT --holdout 224 --target 0.85   # could a validation split pick it?

CKPT is a run's checkpoint.pt (or a copy of one); the run's configuration and data folder come from
it (run from the repository root). It writes nothing.

--holdout N asks whether a validation split of N links could choose the margin for a dataset. It
draws N of the test links (--draws times, seeded), which the model has not trained on, exactly like
validation links; estimates the precision at each margin of a fine grid from the candidate pairs
that contain one of their entities (half a count per sampled side: train.margin_for_precision,
the rule of --il_precision); takes the smallest margin whose estimate reaches --target; and reports,
per draw, that margin with the count and true precision of all the candidates it keeps. The
estimate sees linked entities only, so a dataset with many unlinked entities reads optimistic.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train  # noqa: E402  (the repository root is on the path only now)
from utils import DataError  # noqa: E402


def candidates(ckpt_path: Path):
    """A checkpoint's pseudo-label candidates (train.pseudo_label_candidates): the pairs (P, 2), their CSLS
    margins (P,), whether each is a gold link (P,), and the run's test links (T, 2)."""
    if not ckpt_path.is_file():
        raise DataError(f"{ckpt_path}: no such checkpoint file (a run's checkpoint.pt, or a copy of one)")
    ckpt = train.read_checkpoint(ckpt_path)
    cfg = train.saved_config(ckpt["config"], str(ckpt_path))
    s = train.set_up(cfg, ckpt_path.parent, ckpt)
    pairs, gaps = train.pseudo_label_candidates(s.model, s.inputs, s.data, s.train_pairs, cfg)
    return pairs, gaps, train.rows_in(pairs, s.data.links), s.split.test


def margin_rows(gaps: np.ndarray, gold: np.ndarray, margins) -> list[dict]:
    """One row per margin: the candidates kept, how many are gold links, the precision."""
    rows = []
    for m in margins:
        keep = gaps >= m
        rows.append({"margin": float(m), "pairs": int(keep.sum()), "correct": int(gold[keep].sum()),
                     "precision": float(gold[keep].mean()) if keep.any() else float("nan")})
    return rows


def margin_table(ckpt_path: Path, margins: list[float]) -> list[dict]:
    """``margin_rows`` of a checkpoint's candidates."""
    _, gaps, gold, _ = candidates(ckpt_path)
    return margin_rows(gaps, gold, margins)


def holdout_choice(pairs: np.ndarray, gaps: np.ndarray, gold: np.ndarray, sample: np.ndarray, target: float) -> dict:
    """The margin the held-out links ``sample`` (S, 2) would choose (train.margin_for_precision, the rule of
    --il_precision), its estimate, and what it keeps of all candidates."""
    margin, estimate = train.margin_for_precision(pairs, gaps, gold, sample, target)
    return {**margin_rows(gaps, gold, [margin])[0], "estimate": estimate}


def holdout_draws(pairs, gaps, gold, links: np.ndarray, n: int, draws: int, target: float, seed: int = 0):
    """``holdout_choice`` for ``draws`` random sets of ``n`` rows of ``links`` (seeded)."""
    if not 0 < n <= len(links):
        raise DataError(f"--holdout {n}: must be between 1 and the {len(links)} test links")
    rng = np.random.default_rng(seed)
    return [holdout_choice(pairs, gaps, gold, links[rng.choice(len(links), n, replace=False)], target)
            for _ in range(draws)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2],
                    help="CSLS margins over the runner-up to tabulate")
    ap.add_argument("--holdout", type=int, default=0,
                    help="also choose the margin from this many held-out links (a stand-in validation split)")
    ap.add_argument("--target", type=float, default=0.85, help="the precision --holdout asks of the margin")
    ap.add_argument("--draws", type=int, default=20, help="how many random held-out sets --holdout draws")
    args = ap.parse_args(argv)
    try:
        pairs, gaps, gold, links = candidates(args.checkpoint)
        rows = margin_rows(gaps, gold, args.margins)
        chosen = holdout_draws(pairs, gaps, gold, links, args.holdout, args.draws, args.target) if args.holdout else []
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| margin | pairs | correct | precision |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['margin']:g} | {r['pairs']:,} | {r['correct']:,} | {r['precision']:.3f} |")
    if chosen:
        print(f"\n{args.draws} held-out sets of {args.holdout} test links, target precision {args.target:g}:")
        print("| draw | margin chosen | its estimate | pairs kept | true precision |\n|---|---|---|---|---|")
        for i, c in enumerate(chosen):
            print(f"| {i} | {c['margin']:g} | {c['estimate']:.3f} | {c['pairs']:,} | {c['precision']:.3f} |")
        m = np.array([c["margin"] for c in chosen])
        p = np.array([c["precision"] for c in chosen])
        print(f"margin: median {np.median(m):g}, {m.min():g}-{m.max():g}; true precision: median "
              f"{np.median(p):.3f}, {p.min():.3f}-{p.max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
