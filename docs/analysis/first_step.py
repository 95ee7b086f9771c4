"""The first optimiser steps of a new run, part by part: each parameter's gradient norm, and after
AdamW's step how many entries of its second moment are infinite (an entry whose second moment is
inf takes a step of m / inf = 0 from then on: it never moves again). Made to find the official
design's first-step overflow (docs/departures.md, "A first-step overflow").

    python docs/analysis/first_step.py --steps 3 -- --file_dir data/mmkb-datasets/FB15K_DB15K \\
        --rate 0.2 --fusion_weight_dim 512 --preset official --no-curriculum

Everything after ``--`` is train.py's command line. Nothing is written: the run is built in memory
(its folder name only checked against a temporary directory) and trained ``--steps`` epochs of one
optimiser step each; one JSON line per step goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train  # noqa: E402


def first_steps(train_argv: list[str], steps: int) -> list[dict]:
    """Train a new run ``steps`` epochs; per step the gradient norm of every parameter, the number of
    its AdamW second-moment entries that are inf after the step, and the epoch's loss terms."""
    with tempfile.TemporaryDirectory() as nowhere:
        cfg = train.parse_args([*train_argv, "--out_dir", nowhere, "--epochs", str(steps)]).cfg
        s = train.set_up(cfg, None, None)
    named = list(s.model.named_parameters())
    records: list[dict] = []
    step = s.opt.step

    def probed_step():
        grads = {n: float(p.grad.double().norm()) for n, p in named if p.grad is not None}
        step()
        second = {n: s.opt.state[p]["exp_avg_sq"] for n, p in named if "exp_avg_sq" in s.opt.state.get(p, {})}
        infinite = {n: int(torch.isinf(v).sum()) for n, v in second.items()}
        records.append({"grad": grads, "inf_second_moment": {n: c for n, c in infinite.items() if c},
                        "entries": {n: v.numel() for n, v in second.items() if infinite[n]}})

    s.opt.step = probed_step
    for epoch in range(1, steps + 1):
        pairs, shuffle = train.epoch_pairs(s, epoch)
        terms = train.train_epoch(s.model, s.club, s.inputs, pairs, cfg, s.gen, s.opt, s.q_opt, epoch,
                                  shuffle=shuffle)
        records[-1] = {"epoch": epoch, "loss": terms["loss"], "grad_norm": terms["grad_norm"], **records[-1]}
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="optimiser steps (epochs) to train")
    ap.add_argument("train_argv", nargs=argparse.REMAINDER, help="-- then train.py's flags")
    args = ap.parse_args(argv)
    train_argv = args.train_argv[1:] if args.train_argv[:1] == ["--"] else args.train_argv
    for rec in first_steps(train_argv, args.steps):
        top = sorted(rec["grad"].items(), key=lambda kv: -kv[1])[:5]
        print(json.dumps({**{k: rec[k] for k in ("epoch", "loss", "grad_norm")}, "largest_grads": top,
                          "inf_second_moment": rec["inf_second_moment"], "of_entries": rec["entries"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
