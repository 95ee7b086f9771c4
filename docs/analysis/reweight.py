"""What the modality weights cost: a finished run's test Hits@1 / MRR with its own per-entity weights
and with other weightings of the same unimodal embeddings. Made to ask whether the router or the
experts hold FB15K-YAGO15K back (docs/accuracy.md, "FB15K-YAGO15K").

    python docs/analysis/reweight.py runs/t1_yg_20
    python docs/analysis/reweight.py runs/t1_yg_20 --mix graph=0.5,attr_text=0.5 --mix graph=0.4,attr_text=0.6
    python docs/analysis/reweight.py runs/probe/yg20_router_holdout/checkpoint.pt --mix graph=0.5,attr_text=0.5
    python docs/analysis/reweight.py runs/t1_yg_20 --fit 224 --draws 10   # could a validation split fix the weights?
    python docs/analysis/reweight.py runs/t1_yg_20 --fit 224 --draws 10 --search coordinate   # the second version
    python docs/analysis/reweight.py runs/official/t1_yg_20 --mix graph=0.5,attr_text=0.5 --mutual   # + mutual share

The run folder must hold entity_embeddings.npy (the fused h^f = [w_1 u_1; ...; w_M u_M] of every
entity, Eq. 12), modality_weights.npy (w, N x M), predictions.tsv (its left entities and their gold
counterparts are the test pairs) and results.json (the modalities and the evaluation's CSLS setting).
Each u_m is L2-normalised, so u_m = block_m / w_m wherever w_m > 0 (w_m = 0: the entity lacks the
modality). A weighting is then applied to the u_m of every entity, renormalised over the modalities
the entity has, and the test pairs are ranked as train.py ranks them. "learned" rebuilds the run's own
fused embeddings, so its numbers equal the run's last epoch (a check of the reconstruction).

Given a checkpoint file instead (an unfinished run's checkpoint.pt, or a kept copy), the model is
rebuilt from it (its configuration, its data from the configuration's --file_dir: run from the
repository root) and every entity embedded as an evaluation at that epoch would; "learned" then equals
that epoch's evaluation. For a --router_holdout run, two more columns: its held-out seed pairs
ranked among themselves, and among themselves with the test entities as distractors (what the router
was fitted on, against what it is judged on). With --loss_tau T1,T2 also the loss the router is fitted by
on those pairs, L_f^CL of Eq. 13 (one batch of them, evaluation-mode embeddings), at each temperature.

--fit N asks whether a validation split of N links could correct the weights. N test links stand in for
validation links (the model trained on neither): one factor per modality multiplies the learned weights
of every entity, chosen as train.py's --calibrate_weights chooses them, to maximise those links' MRR,
ranked among themselves and a fixed sample of the other test links' entities (train.calibration_distractors;
--no-distractors: among themselves only); the other test links, ranked among themselves, then judge the
factors against the learned weights. It draws --draws such sets (seeded) and prints each draw's factors
and both numbers.

Rows: learned; uniform over the modalities an entity has; each modality alone; the learned weights
with one modality's weight doubled or dropped; each --mix (one global weight per modality named, 0 for
the others). With --mutual, one more column: --calibrate_unlabelled's criterion under each weighting
(the share of mutual CSLS nearest neighbours among the entities in no training pair; the data comes
from the run's checkpoint). It reads the folder and writes nothing.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import utils  # noqa: E402
from utils import DataError, evaluate_alignment  # noqa: E402  (the repository root is on the path only now)


def load_run(run: Path) -> dict:
    """The unimodal embeddings (N, M, D), the learned weights (N, M), the test pairs and the settings."""
    need = ("entity_embeddings.npy", "modality_weights.npy", "predictions.tsv", "results.json")
    missing = [n for n in need if not (run / n).is_file()]
    if missing:
        raise DataError(f"{run}: no {', '.join(missing)}; expected a finished run folder written with the outputs "
                        "(train.py without --no-save_outputs)")
    results = json.loads((run / "results.json").read_text())
    fused, w = np.load(run / "entity_embeddings.npy"), np.load(run / "modality_weights.npy")
    modalities = results["modalities"]
    n, m = w.shape
    if m != len(modalities) or fused.shape[0] != n or fused.shape[1] % m:
        raise DataError(f"{run}: embeddings {fused.shape} and weights {w.shape} do not fit {len(modalities)} "
                        "modalities")
    with open(run / "predictions.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    pairs = np.array([[int(r["left_id"]), int(r["gold_right_id"])] for r in rows], dtype=np.int64)
    unimodal = fused.reshape(n, m, -1) / np.where(w > 0, w, 1.0)[:, :, None]
    cfg = results.get("config", {})
    return {"unimodal": unimodal, "weights": w, "present": w > 0, "pairs": pairs, "modalities": modalities,
            "csls": cfg.get("csls", True), "csls_k": cfg.get("csls_k", 3)}


def load_checkpoint(path: Path) -> dict:
    """What ``load_run`` returns, from a checkpoint: the model at that epoch embeds every entity."""
    import train  # the model and its data; only this path needs them

    s = train.checkpoint_session(path)
    cfg = s.cfg
    emb = s.model.embed(np.arange(s.inputs.num_entities), s.inputs)
    unimodal = torch.stack([emb.unimodal[m] for m in s.model.modalities], dim=1).numpy()  # (N, M, D)
    w = emb.weights.numpy()
    present = np.ones_like(w, dtype=bool) if emb.present is None else emb.present.numpy()
    return {"unimodal": unimodal, "weights": w, "present": present, "pairs": s.split.test,
            "modalities": list(s.model.modalities), "csls": cfg.csls, "csls_k": cfg.csls_k,
            "held_out": s.router_pairs, "unaligned": train.unaligned_entities(s.data, s.train_pairs)}


def unaligned(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The entities of each KG in none of a run folder's training pairs (train.unaligned_entities: those
    --calibrate_unlabelled fits on), from the data of its checkpoint.pt (load_checkpoint has them already)."""
    import train  # the data; only --mutual needs it

    s = train.checkpoint_session(run_dir / "checkpoint.pt")
    return train.unaligned_entities(s.data, s.train_pairs)


def mutual_share(run: dict, weights: np.ndarray, left: np.ndarray, right: np.ndarray) -> float:
    """--calibrate_unlabelled's criterion under ``weights``: the share of mutual CSLS nearest neighbours
    between the ``left`` and ``right`` entities (train.unlabelled_calibration; no link is read)."""
    fused = fused_rows(run, weights, np.concatenate([left, right]))
    return utils.mutual_share(fused[:len(left)], fused[len(left):], left, right, run["csls_k"])


def renormalised(run: dict, weights: np.ndarray) -> np.ndarray:
    """``weights`` (N, M) or (M,) as (N, M), zero where an entity lacks the modality and summing to 1 per entity."""
    w = np.broadcast_to(weights, run["weights"].shape) * run["present"]
    total = w.sum(1, keepdims=True)
    return np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0)


def fused_rows(run: dict, weights: np.ndarray, ids: np.ndarray) -> torch.Tensor:
    """The fused embeddings h^f (Eq. 12) of the entities ``ids`` (in that order) under ``weights`` (N, M) or (M,),
    renormalised over each entity's modalities."""
    w = renormalised(run, weights)[ids]
    return torch.as_tensor((run["unimodal"][ids] * w[:, :, None]).reshape(len(ids), -1), dtype=torch.float32)


def score(run: dict, weights: np.ndarray, pairs: np.ndarray | None = None, distractors: bool = False,
          extra: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Test metrics (the mean of both directions) of the fused embeddings under ``weights`` (N, M) or (M,),
    renormalised over each entity's modalities; of ``pairs`` instead of the test pairs if given, with the
    test entities as extra candidates if ``distractors``, or the (left, right) entities ``extra``."""
    pairs = run["pairs"] if pairs is None else pairs
    if extra is None and distractors:
        extra = (run["pairs"][:, 0], run["pairs"][:, 1])
    ids = np.unique(pairs if extra is None else np.concatenate([pairs.ravel(), *extra]))
    return evaluate_alignment(fused_rows(run, weights, ids), pairs, ids=ids, csls_k=run["csls_k"], use_csls=run["csls"],
                              extra_candidates=extra)["avg"]


def held_out_loss(run: dict, weights: np.ndarray, tau: float) -> float:
    """L_f^CL of the held-out pairs, in one batch, of the fused embeddings under ``weights`` at ``tau``."""
    from loss import batch_alignment_losses

    held = run["held_out"]
    sides = fused_rows(run, weights, held.T.ravel()).split(len(held))  # the left entities, then the right
    return float(batch_alignment_losses(*sides, {}, {}, tau, 1.0, unimodal_cl=False, distill=False)[0])


def fit_factors(run: dict, held: np.ndarray, extra: tuple[np.ndarray, np.ndarray] | None,
                search: str = "steepest") -> np.ndarray:
    """One factor per modality on the learned weights, maximising the MRR of the ``held`` pairs ranked among
    themselves and the (left, right) entities ``extra`` if given: train.fit_factors on train.factor_objective,
    the search of --calibrate_weights (``search="coordinate"``: the second version's coordinate ascent)."""
    import train

    unimodal = [torch.as_tensor(run["unimodal"][:, j]) for j in range(len(run["modalities"]))]
    cfg = argparse.Namespace(csls=run["csls"], csls_k=run["csls_k"])
    objective = train.factor_objective(unimodal, torch.as_tensor(run["weights"]), held, cfg, extra=extra)
    if search == "coordinate":
        from calibration_search import coordinate_ascent

        return coordinate_ascent(objective, len(run["modalities"]))[0]
    return train.fit_factors(objective, len(run["modalities"]))[0]


def fit_draws(run: dict, n: int, draws: int, distractors: bool = True, seed: int = 0,
              search: str = "steepest") -> list[dict]:
    """``fit_factors`` on ``draws`` random sets of ``n`` test links (seeded), each judged on the other links.
    With ``distractors`` the fit's candidates are those of --calibrate_weights: the held links' entities and a
    fixed sample of the other links' (train.calibration_distractors); without, the held links' alone."""
    import train

    links = run["pairs"]
    if not 0 < n < len(links):
        raise DataError(f"--fit {n}: must be between 1 and the {len(links) - 1} test links less one")
    rng = np.random.default_rng(seed)
    out = []
    for draw in range(draws):
        mask = np.zeros(len(links), dtype=bool)
        mask[rng.choice(len(links), n, replace=False)] = True
        held, rest = links[mask], links[~mask]
        factors = fit_factors(run, held, train.calibration_distractors(rest, draw) if distractors else None, search)
        out.append({"factors": factors, "learned": score(run, run["weights"], rest),
                    "fitted": score(run, run["weights"] * factors, rest)})
    return out


def parse_mix(text: str, modalities: list[str]) -> np.ndarray:
    weights = np.zeros(len(modalities))
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in modalities:
            raise DataError(f"--mix {text}: '{name}' is not one of the run's modalities ({', '.join(modalities)})")
        try:
            weights[modalities.index(name)] = float(value)
        except ValueError:
            raise DataError(f"--mix {text}: '{value}' is not a number (expected modality=weight)") from None
    return weights


def weightings(run: dict, mixes: list[str]) -> list[tuple[str, np.ndarray]]:
    learned, mods = run["weights"], run["modalities"]
    rows = [("learned (the run's own)", learned), ("uniform", np.ones(len(mods)))]
    for i, mod in enumerate(mods):
        rows.append((f"{mod} alone", np.eye(len(mods))[i]))
    for i, mod in enumerate(mods):
        for factor, what in ((2.0, "doubled"), (0.0, "dropped")):
            changed = learned.copy()
            changed[:, i] *= factor
            rows.append((f"learned, {mod} {what}", changed))
    rows += [(f"mix {text}", parse_mix(text, mods)) for text in mixes]
    return rows


def print_fits(run: dict, n: int, draws: int, distractors: bool = True, search: str = "steepest") -> int:
    try:
        fits = fit_draws(run, n, draws, distractors, search=search)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"| draw | factors ({' / '.join(run['modalities'])}) | other {len(run['pairs']) - n} links: learned "
          "H@1 / MRR | fitted H@1 / MRR |\n|---|---|---|---|")
    for i, f in enumerate(fits):
        a, b = f["learned"], f["fitted"]
        print(f"| {i} | {' / '.join(f'{x:g}' for x in f['factors'])} | {a['hits@1']:.4f} / {a['mrr']:.4f} | "
              f"{b['hits@1']:.4f} / {b['mrr']:.4f} |", flush=True)
    gain = np.array([f["fitted"]["hits@1"] - f["learned"]["hits@1"] for f in fits])
    print(f"fitted minus learned, Hits@1: mean {gain.mean():+.4f}, min {gain.min():+.4f}, max {gain.max():+.4f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished run folder, or a checkpoint file (.pt)")
    p.add_argument("--mix", action="append", default=[], help="global weights, e.g. graph=0.5,attr_text=0.5")
    p.add_argument("--fit", type=int, default=0, help="N: fit one factor per modality on N test links standing in "
                                                     "for a validation split, judged on the others")
    p.add_argument("--draws", type=int, default=10, help="how many random sets of N links --fit draws")
    p.add_argument("--no-distractors", dest="distractors", action="store_false",
                   help="--fit ranks its N links among themselves only (the first rule of --calibrate_weights)")
    p.add_argument("--search", choices=("steepest", "coordinate"), default="steepest",
                   help="--fit's search: train.fit_factors (steepest ascent), or the second version's coordinate "
                        "ascent (docs/analysis/calibration_search.py)")
    p.add_argument("--mutual", action="store_true",
                   help="one more column: --calibrate_unlabelled's criterion, the share of mutual nearest neighbours "
                        "among the entities in no training pair (reads the run's checkpoint for the data)")
    p.add_argument("--loss_tau", default="", help="temperatures, e.g. 0.1,0.05: a --router_holdout checkpoint's "
                                                  "held-out pairs' fused loss at each")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        run = load_checkpoint(args.run) if args.run.suffix == ".pt" else load_run(args.run)
        rows = weightings(run, args.mix)
        sides = (run.get("unaligned") or unaligned(args.run)) if args.mutual else None
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mean = np.round(run["weights"][np.unique(run["pairs"])].mean(0), 3)
    print(f"{args.run}: {len(run['pairs'])} test pairs; mean learned weight on the test entities: "
          + ", ".join(f"{m} {w}" for m, w in zip(run["modalities"], mean)))
    if args.fit:
        return print_fits(run, args.fit, args.draws, args.distractors, args.search)
    held = run.get("held_out")
    try:
        taus = [float(t) for t in args.loss_tau.split(",") if t]
    except ValueError:
        print(f"error: --loss_tau {args.loss_tau}: expected temperatures separated by commas", file=sys.stderr)
        return 2
    if taus and (held is None or not len(held)):
        print(f"error: --loss_tau: {args.run} has no held-out pairs (a --router_holdout run's checkpoint has)",
              file=sys.stderr)
        return 2
    header, rule = "| weighting | test Hits@1 | MRR |", "|---|---|---|"
    if held is not None and len(held):
        header += (f" {len(held)} held-out pairs among themselves, Hits@1 | the same with the test entities as "
                   "distractors |" + "".join(f" their L_f^CL at tau {t} |" for t in taus))
        rule += "---|---|" + "---|" * len(taus)
    if sides:
        header, rule = header + " mutual share |", rule + "---|"
    print(header + "\n" + rule)
    for name, weights in rows:
        r = score(run, weights)
        line = f"| {name} | {r['hits@1']:.4f} | {r['mrr']:.4f} |"
        if held is not None and len(held):
            alone, among = score(run, weights, held), score(run, weights, held, distractors=True)
            line += f" {alone['hits@1']:.4f} | {among['hits@1']:.4f} |"
            line += "".join(f" {held_out_loss(run, weights, t):.3f} |" for t in taus)
        if sides:
            line += f" {mutual_share(run, weights, *sides):.4f} |"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
