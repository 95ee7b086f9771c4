"""Does --calibrate_weights' search find the best factors? At a checkpoint of a --val_ratio run: the validation
objective of every factor vector of the grid (train.CALIBRATION_GRID per modality, all zeros excepted), the
factors each search chooses, and the test pairs ranked under each. Made when the second version's search
(coordinate ascent, kept here as ``coordinate_ascent``) stopped in local optima on FB15K-YAGO15K
(docs/accuracy.md, "Calibrating the weights on validation links").

    python docs/analysis/calibration_search.py runs/ckpt/yg_cal_e500.pt
    python docs/analysis/calibration_search.py runs/t1_yg_20_val_cal/checkpoint.pt --factors 1/1/1/0/2

The validation objective is the one a run fits (train.factor_objective: the validation links ranked among
themselves and train.calibration_distractors' sample of test entities). The grid has 5^M - 1 vectors (3,124
for five modalities: about 80 s on this CPU); vectors that are multiples of each other score the same. It
reads the checkpoint and writes nothing.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train  # noqa: E402  (the repository root is on the path only now)
from layers import calibrated_fusion  # noqa: E402
from utils import DataError  # noqa: E402


def coordinate_ascent(score, num_modalities: int, sweeps: int = 2) -> tuple[np.ndarray, float]:
    """The second version's search: from all ones, modality by modality, any grid value that raises the score
    is kept at once; at most ``sweeps`` passes."""
    factors = np.ones(num_modalities)
    best = score(factors)
    for _ in range(sweeps):
        before = best
        for i in range(num_modalities):
            for value in train.CALIBRATION_GRID:
                trial = factors.copy()
                trial[i] = value
                if value != factors[i] and trial.any() and (got := score(trial)) > best:
                    best, factors = got, trial
        if best == before:
            break
    return factors, best


def counted(score):
    """``score`` that counts its calls in ``.calls``."""
    def wrapped(factors):
        wrapped.calls += 1
        return score(factors)
    wrapped.calls = 0
    return wrapped


def load(path: Path) -> dict:
    """The checkpoint's model embeds its validation and test entities, as calibrated_evaluation does."""
    s = train.checkpoint_session(path)
    cfg, valid, test = s.cfg, s.split.valid, s.split.test
    if not len(valid):
        raise DataError(f"{path}: the run has no validation links (it was trained without --val_ratio)")
    ids = np.unique(np.concatenate([valid, test]))
    emb = s.model.embed(ids, s.inputs)
    unimodal = [emb.unimodal[m] for m in s.model.modalities]
    objective = train.factor_objective(unimodal, emb.weights, valid, cfg, ids=ids,
                                       extra=train.calibration_distractors(test, cfg.seed))
    return {"epoch": s.start, "cfg": cfg, "ids": ids, "test": test, "unimodal": unimodal,
            "weights": emb.weights, "modalities": list(s.model.modalities), "objective": objective}


def test_metrics(run: dict, factors: np.ndarray) -> dict:
    fused = calibrated_fusion(run["unimodal"], run["weights"], factors)
    return train.alignment_metrics(fused, run["test"], run["cfg"], ids=run["ids"])["avg"]


def parse_factors(text: str, m: int) -> np.ndarray:
    try:
        factors = np.array([float(v) for v in text.split("/")])
    except ValueError:
        raise DataError(f"--factors {text}: expected {m} numbers separated by '/'") from None
    if len(factors) != m or not factors.any() or (factors < 0).any():
        raise DataError(f"--factors {text}: expected {m} non-negative numbers separated by '/', not all 0")
    return factors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a --val_ratio run's checkpoint.pt, or a copy of one")
    p.add_argument("--factors", action="append", default=[], help="more factor vectors to rank, e.g. 1/1/1/0/2")
    p.add_argument("--top", type=int, default=5, help="how many of the grid's best vectors to list")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        run = load(args.checkpoint)
        extra = [parse_factors(f, len(run["modalities"])) for f in args.factors]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    objective, m = run["objective"], len(run["modalities"])
    grid = [np.array(f) for f in itertools.product(train.CALIBRATION_GRID, repeat=m) if any(f)]
    values = np.array([objective(f) for f in grid])
    order, seen = [], set()
    for i in np.argsort(-values, kind="stable"):  # one vector of each direction: multiples score the same
        if (key := tuple(grid[i] / grid[i].max())) not in seen:
            seen.add(key)
            order.append(i)
    coordinate, steepest = counted(objective), counted(objective)
    chosen = [("coordinate ascent (second version)", *coordinate_ascent(coordinate, m), coordinate),
              ("steepest ascent (train.fit_factors)", *train.fit_factors(steepest, m)[:2], steepest)]
    print(f"{args.checkpoint}: epoch {run['epoch']}; factors in the order {' / '.join(run['modalities'])}; "
          f"validation MRR of the learned weights (all ones) {objective(np.ones(m)):.4f}")
    print("| factors | validation MRR | scorings | test Hits@1 | test MRR |\n|---|---|---|---|---|")
    rows = [(name, f, v, str(fn.calls)) for name, f, v, fn in chosen]
    rows += [(f"grid, best {r + 1}", grid[i], values[i], f"{len(grid)}") for r, i in enumerate(order[:args.top])]
    rows += [("given", f, objective(f), "1") for f in extra]
    for name, f, v, calls in rows:
        t = test_metrics(run, f)
        print(f"| {name}: {'/'.join(f'{x:g}' for x in f)} | {v:.4f} | {calls} | {t['hits@1']:.4f} | "
              f"{t['mrr']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
