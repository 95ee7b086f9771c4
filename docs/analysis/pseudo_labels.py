"""How good would iterative training's pseudo pairs be, from one checkpoint: the mutual CSLS nearest
neighbours among the entities outside the seed pairs, their count and precision (the gold links are
known for the test entities), and how both change with the CSLS margin over the runner-up
(train.py --il_margin). Made to choose the pseudo-label scheme (docs/accuracy.md, "Iterative training").

    python docs/analysis/pseudo_labels.py CKPT                       # margins 0, 0.02, 0.05, 0.1, 0.2
    python docs/analysis/pseudo_labels.py CKPT --margins 0 0.05 0.1

CKPT is a run's checkpoint.pt (or a copy of one); the run's configuration and data folder come from
it (run from the repository root). It writes nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train  # noqa: E402  (the repository root is on the path only now)
from utils import DataError  # noqa: E402


def margin_table(ckpt_path: Path, margins: list[float]) -> list[dict]:
    """One row per margin: the mutual pairs kept, how many are gold links, the precision."""
    if not ckpt_path.is_file():
        raise DataError(f"{ckpt_path}: no such checkpoint file (a run's checkpoint.pt, or a copy of one)")
    ckpt = train.read_checkpoint(ckpt_path)
    cfg = train.saved_config(ckpt["config"], str(ckpt_path))
    s = train.set_up(cfg, ckpt_path.parent, ckpt)
    pairs, gaps = train.pseudo_label_candidates(s.model, s.inputs, s.data, s.train_pairs, cfg)
    gold = train.rows_in(pairs, s.data.links)
    rows = []
    for m in margins:
        keep = gaps >= m
        rows.append({"margin": m, "pairs": int(keep.sum()), "correct": int(gold[keep].sum()),
                     "precision": float(gold[keep].mean()) if keep.any() else float("nan")})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2],
                    help="CSLS margins over the runner-up to tabulate")
    args = ap.parse_args(argv)
    try:
        rows = margin_table(args.checkpoint, args.margins)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| margin | pairs | correct | precision |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['margin']:g} | {r['pairs']:,} | {r['correct']:,} | {r['precision']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
