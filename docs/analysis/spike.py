"""Trace a run epoch by epoch from one of its checkpoints, optionally with other optimiser settings:
each epoch's loss terms, the gradient and the AdamW update of every part of the model, and the test
metrics after it. Made to find what turns a long run's loss up (seed 43, docs/accuracy.md).

    python docs/analysis/spike.py trace CKPT --to 990 --out runs/spike/base.jsonl
    python docs/analysis/spike.py trace CKPT --to 990 --lr 2.5e-4 --out runs/spike/lr_half.jsonl
    python docs/analysis/spike.py trace CKPT --to 990 --grad_clip 40 --out runs/spike/clip40.jsonl
    python docs/analysis/spike.py trace CKPT --to 990 --eps 1e-6 --out runs/spike/eps.jsonl
    python docs/analysis/spike.py table runs/spike/base.jsonl runs/spike/lr_half.jsonl
    python docs/analysis/spike.py trace CKPT --to 990 --term_grads --out runs/spike/terms.jsonl
    python docs/analysis/spike.py terms runs/spike/terms.jsonl

CKPT is a run's checkpoint.pt (or a copy of one: the run overwrites its own every --save_every
epochs). The trace reads the run's configuration from the checkpoint and its data from the
configuration's --file_dir (relative to the repository root: run from there); it writes only
``--out``, one JSON line per epoch. With no change the trace continues the run exactly: the
checkpoint carries every random state and an evaluation draws none, so its losses at the run's
evaluated epochs equal those in the run's metrics.jsonl (tests/test_spike_script.py checks this on the
embedded default). ``--lr``, ``--eps`` and ``--beta2`` change the AdamW parameter groups from the
first traced step on (``--beta2`` keeps the bias-corrected second moments continuous, ``set_beta2``);
``--grad_clip`` rescales the gradient to at most that norm (train.clip_gradient); ``--entity_lr`` gives
the entity table e^g a learning rate of its own; ``--balance_reach router`` lets the router balance term
train the router's own parameters only (train.py --router_balance_reach). The records' ``lr`` is the
first group's.

Per epoch and per part of the model (each parameter of the graph encoder, each modality's experts,
the fusion, the loss weights): the gradient's norm, the update's norm, the largest update of one
parameter (``max_step``; the table gives it in units of the learning rate) and the parameters' norm
after the step; for the entity table also where its gradient is (the rows with the largest ones).
One gradient far above its history moves a parameter by at most about lr (1 - beta1) / sqrt(1 - beta2)
~ 3.2 lr in AdamW (plus the weight decay), so a largest update near 3 lr marks a parameter whose
gradient jumped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (the repository root is on the path only now)
from utils import DataError  # noqa: E402

TERMS = ("loss", "fused_cl", "uni_cl", "distill", "club", "balance", "club_q_nll", "grad_norm", "table_grad_norm")


def part(name: str) -> str:
    """The part of the model a parameter belongs to: each modality's experts together (experts.<modality>),
    the fusion together, and each parameter of the graph encoder on its own (its entity table, and per
    GAT layer the weight and the two attention vectors)."""
    head = name.split(".")
    if head[0] == "experts":
        return ".".join(head[:2])
    return name.removeprefix("graph_encoder.") if head[0] == "graph_encoder" else head[0]


class StepProbe:
    """Wraps an optimiser's step: records, per part, the gradient norm before it and the update after it."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer):
        self.params = [(part(n), p) for n, p in model.named_parameters()]
        self.table = train.entity_table(model)
        self.opt, self.inner = opt, opt.step
        opt.step = self.step
        self.last: dict = {}

    def step(self, *args, **kwargs):
        before = [p.detach().clone() for _, p in self.params]
        grad, upd, big, norm = {}, {}, {}, {}
        for k, p in self.params:
            if p.grad is not None:
                grad[k] = grad.get(k, 0.0) + float(p.grad.double().pow(2).sum())
        rows = self.table_rows()
        out = self.inner(*args, **kwargs)
        for (k, p), b in zip(self.params, before):
            d = (p.detach() - b).double()
            upd[k] = upd.get(k, 0.0) + float(d.pow(2).sum())
            big[k] = max(big.get(k, 0.0), float(d.abs().max()) if d.numel() else 0.0)
            norm[k] = norm.get(k, 0.0) + float(p.detach().double().pow(2).sum())
        self.last = {"lr": self.opt.param_groups[0]["lr"], "grad": {k: v ** 0.5 for k, v in grad.items()},
                     "update": {k: v ** 0.5 for k, v in upd.items()}, "max_step": big,
                     "norm": {k: v ** 0.5 for k, v in norm.items()}, **rows}
        return out

    def table_rows(self, top: int = 5) -> dict:
        """Where the entity table's gradient is: how many rows have one, the share of its squared norm
        in the 100 largest rows, and the ``top`` rows (entity id, gradient norm, row norm)."""
        if self.table is None or self.table.grad is None:
            return {}
        g = self.table.grad.double().norm(dim=1)
        order = g.argsort(descending=True)
        total = float(g.pow(2).sum()) or 1.0
        return {"table_rows_with_grad": int((g > 0).sum()),
                "table_top100_share": float(g[order[:100]].pow(2).sum()) / total,
                "table_top": [[int(i), float(g[i]), float(self.table.detach()[i].norm())] for i in order[:top]]}


def set_beta2(opt: torch.optim.Optimizer, beta2: float) -> None:
    """Change AdamW's beta2 without a jump in its bias-corrected second moments. AdamW divides its
    estimate v by 1 - beta2^t; at step t = 550 that is 0.42 for beta2 0.999 and 1.00 for 0.99, so a bare
    change of beta2 would shrink v_hat 2.4 times and enlarge every step 1.5 times at once. v is rescaled
    so that v_hat is the same just after the change."""
    for group in opt.param_groups:
        old = group["betas"][1]
        for p in group["params"]:
            state = opt.state.get(p)
            if state and "exp_avg_sq" in state:
                t = float(state["step"])
                state["exp_avg_sq"].mul_((1 - beta2 ** t) / (1 - old ** t))
        group["betas"] = (group["betas"][0], beta2)


def own_learning_rate(opt: torch.optim.Optimizer, param: torch.nn.Parameter, lr: float) -> None:
    """Give one parameter its own parameter group (same settings, its own learning rate); its AdamW
    state, keyed by the parameter, stays as it is."""
    group = next(g for g in opt.param_groups if any(p is param for p in g["params"]))
    group["params"] = [p for p in group["params"] if p is not param]
    opt.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": [param], "lr": lr})


def term_gradients(s: train.Session, pairs: np.ndarray, shuffle: bool) -> dict:
    """Which loss term the entity table's gradient comes from: the epoch's forward pass
    (:func:`train.epoch_forward`) done once more, and the table's gradient of each term of Eq. 17 as
    weighted in the total (the fused L_f^CL, each modality's lambda_1 L_m^CL and lambda_2 L_m^AL,
    w_mi L_CLUB), of the router balance term and, under --router_holdout, of the router's own fused loss
    ("router_cl"), each on its own. The terms' gradients sum to the step's. The random states are put
    back afterwards, so the step that follows is the one the trace takes without this.

    Per term: the norm of its table gradient, its cosine with the sum of them all, and its norm on the
    row with the largest total gradient."""
    cfg, model, table = s.cfg, s.model, train.entity_table(s.model)
    if table is None:
        raise DataError("--term_grads: a run without the graph modality has no entity table")
    if cfg.loss_weighting != "sum":
        raise DataError("--term_grads: only for runs with --loss_weighting sum (learned weights mix the terms)")
    cpu, gen = torch.get_rng_state(), s.gen.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    f = train.epoch_forward(model, s.club, s.inputs, pairs, cfg, s.gen, shuffle, s.router_pairs)
    terms = {"fused_cl": f.fused_cl, **{f"uni_cl.{m}": cfg.cl_loss * v for m, v in f.uni_cl.items()},
             **{f"distill.{m}": train.distill_weight(cfg) * v for m, v in f.distill.items()},
             "club": cfg.mi_loss * f.club_term}
    if f.router_cl is not None:
        terms["router_cl"] = f.router_cl
    if cfg.router_balance > 0:
        terms["balance"] = cfg.router_balance * train.router_imbalance(f.out.weights, f.out.present)
    grads = {}
    for name, term in terms.items():
        if isinstance(term, torch.Tensor) and term.requires_grad:
            g = torch.autograd.grad(term, table, retain_graph=True, allow_unused=True)[0]
            if g is not None:
                grads[name] = g.double()
    torch.set_rng_state(cpu)
    s.gen.set_state(gen)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    total = sum(grads.values())
    row = int(total.norm(dim=1).argmax())
    norm = float(total.norm()) or 1.0
    return {"table_total": float(total.norm()), "table_top_row": row,
            "terms": {k: {"norm": float(g.norm()), "cos": float((g * total).sum()) / (float(g.norm()) * norm or 1.0),
                          "top_row": float(g[row].norm())} for k, g in grads.items()}}


def load(ckpt_path: Path) -> dict:
    if not ckpt_path.is_file():
        raise DataError(f"{ckpt_path}: no such checkpoint file (a run's checkpoint.pt, or a copy of one)")
    return train.read_checkpoint(ckpt_path)


def trace(ckpt_path: Path, to: int, out: Path, lr: float | None = None, eps: float | None = None,
          beta2: float | None = None, grad_clip: float | None = None, entity_lr: float | None = None,
          eval_every: int = 1, term_grads: bool = False, balance_reach: str | None = None) -> list[dict]:
    """Train from the checkpoint's epoch to ``to``, one JSON line per epoch into ``out``."""
    if out.exists():
        raise DataError(f"{out} already exists; give another --out (nothing was changed)")
    ckpt = load(ckpt_path)
    cfg = train.saved_config(ckpt["config"], str(ckpt_path))
    if cfg.il:
        raise DataError(f"{ckpt_path}: an iterative-training run; the trace does not add pseudo-labels")
    if to <= ckpt["epoch"]:
        raise DataError(f"--to {to}: the checkpoint is at epoch {ckpt['epoch']}; give a later epoch")
    if grad_clip is not None:
        cfg = dataclasses.replace(cfg, grad_clip=grad_clip)
    if balance_reach is not None:
        cfg = dataclasses.replace(cfg, router_balance_reach=balance_reach)
    s = train.set_up(cfg, ckpt_path.parent, ckpt)
    for group in s.opt.param_groups:
        group.update({k: v for k, v in (("lr", lr), ("eps", eps)) if v is not None})
    if beta2 is not None:
        set_beta2(s.opt, beta2)
    if entity_lr is not None:
        table = train.entity_table(s.model)
        if table is None:
            raise DataError(f"--entity_lr: {ckpt_path} is a run without the graph modality, so without an entity table")
        own_learning_rate(s.opt, table, entity_lr)
    probe = StepProbe(s.model, s.opt)
    sample = train.health_sample(s.split.test, cfg.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    changes = {"lr": lr, "eps": eps, "beta2": beta2, "grad_clip": grad_clip, "entity_lr": entity_lr,
               "balance_reach": balance_reach}
    records = []
    with open(out, "x") as f:
        f.write(json.dumps({"checkpoint": str(ckpt_path), "from_epoch": s.start,
                            "changes": {k: v for k, v in changes.items() if v is not None}}) + "\n")
        for epoch in range(s.start + 1, to + 1):
            pairs, shuffle = train.epoch_pairs(s, epoch)
            by_term = term_gradients(s, pairs, shuffle) if term_grads else None
            terms = train.train_epoch(s.model, s.club, s.inputs, pairs, cfg, s.gen, s.opt, s.q_opt, epoch,
                                      shuffle=shuffle, router_pairs=s.router_pairs)
            rec = {"epoch": epoch, **{k: round(terms[k], 6) for k in TERMS if k in terms}, **probe.last,
                   **({"term_grads": by_term} if by_term else {})}
            if (epoch - s.start) % eval_every == 0 or epoch == to:
                res, health = train.evaluate(s.model, s.inputs, s.split.test, cfg, health_ids=sample)
                rec["test"] = {k: res["avg"][k] for k in ("hits@1", "mrr")}
                rec["weight"] = health["weight"]
            records.append(rec)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(f"epoch {epoch} loss {rec['loss']:.4f} grad {rec['grad_norm']:.2f}"
                  + (f" test_hits1 {rec['test']['hits@1']:.4f}" if "test" in rec else ""), flush=True)
    return records


def read(path: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines[0], lines[1:]


def table(paths: list[Path]) -> str:
    """Per trace: loss, gradient norm and test Hits@1 per epoch, and the part with the largest update."""
    rows = ["| trace | changes | epoch | loss | grad norm | test H@1 | largest step (part, x lr) |",
            "|---|---|---|---|---|---|---|"]
    for path in paths:
        head, recs = read(path)
        changes = ", ".join(f"{k} {v}" for k, v in head["changes"].items()) or "none"
        for r in recs:
            k = max(r["max_step"], key=r["max_step"].get)
            h1 = f"{r['test']['hits@1']:.4f}" if "test" in r else ""
            step = f"{r['max_step'][k] / r['lr']:.2f}" if r["lr"] else "0"
            rows.append(f"| {path.stem} | {changes} | {r['epoch']} | {r['loss']:.3f} | {r['grad_norm']:.2f} | {h1} "
                        f"| {k} {step} |")
    return "\n".join(rows)


def term_table(path: Path) -> str:
    """Per epoch of a --term_grads trace: the entity table's gradient norm, then each loss term's share of
    it (its norm times its cosine with the total, as a fraction of the total: the shares add up to 1) and
    its own norm, terms in the order of their share at the last epoch."""
    _, recs = read(path)
    recs = [r for r in recs if "term_grads" in r]
    if not recs:
        raise DataError(f"{path}: no epoch has term_grads (trace with --term_grads)")
    last = recs[-1]["term_grads"]["terms"]
    names = sorted(last, key=lambda k: -last[k]["norm"] * last[k]["cos"])
    rows = ["| epoch | table grad | " + " | ".join(f"{n}: share (norm)" for n in names) + " |",
            "|---|---|" + "---|" * len(names)]
    for r in recs:
        t = r["term_grads"]
        total = t["table_total"] or 1.0
        cells = []
        for n in names:
            v = t["terms"].get(n)
            cells.append(f"{v['norm'] * v['cos'] / total:.2f} ({v['norm']:.3g})" if v else "-")
        rows.append(f"| {r['epoch']} | {t['table_total']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trace", help="train on from a checkpoint, one JSON line per epoch")
    t.add_argument("checkpoint", type=Path)
    t.add_argument("--to", type=int, required=True, help="the last epoch to train")
    t.add_argument("--out", type=Path, required=True, help="the JSON-lines file to write (must not exist)")
    t.add_argument("--lr", type=float, help="AdamW learning rate from the first traced step on")
    t.add_argument("--eps", type=float, help="AdamW epsilon from the first traced step on")
    t.add_argument("--beta2", type=float, help="AdamW beta2 (the decay of the second-moment estimate)")
    t.add_argument("--grad_clip", type=float, help="rescale each gradient to at most this norm")
    t.add_argument("--entity_lr", type=float, help="a learning rate of its own for the entity table (e^g); 0 freezes "
                                                   "it, as --lr 0 freezes everything (train.py's --entity_lr 0 "
                                                   "means --lr instead)")
    t.add_argument("--balance_reach", choices=("all", "router"), help="what the router balance term trains from "
                                                                      "the first traced step on (train.py "
                                                                      "--router_balance_reach)")
    t.add_argument("--eval_every", type=int, default=1, help="evaluate on the test pairs every N epochs")
    t.add_argument("--term_grads", action="store_true", help="also record, per epoch, the entity table's gradient "
                                                             "of each loss term on its own (one more forward pass "
                                                             "and a backward pass per term: several times slower)")
    b = sub.add_parser("table", help="a markdown table of traces")
    b.add_argument("traces", type=Path, nargs="+")
    g = sub.add_parser("terms", help="a markdown table of a --term_grads trace: each loss term's share of the "
                                     "entity table's gradient, per epoch")
    g.add_argument("trace", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "trace":
            trace(args.checkpoint, args.to, args.out, args.lr, args.eps, args.beta2, args.grad_clip, args.entity_lr,
                  args.eval_every, args.term_grads, args.balance_reach)
        elif args.cmd == "terms":
            print(term_table(args.trace))
        else:
            print(table(args.traces))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
