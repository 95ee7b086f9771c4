"""Train and evaluate HUMEA.

    python train.py                                   # the embedded synthetic default
    python train.py --file_dir data/mmkb-datasets/FB15K_DB15K --rate 0.2 --fusion_weight_dim 512

``main`` runs three phases: set up (or resume) the run, the epoch loop (train; every --check_point
epochs evaluate, every --il_step epochs of iterative training add pseudo-labels, every --save_every
epochs checkpoint), and finish (outputs and the summary). Every run writes a folder under --out_dir:
config.json, log.txt, metrics.jsonl (one line per evaluation), checkpoint.pt (resumable,
reloadable), entity_embeddings.npy, modality_weights.npy, expert_gates.npz, predictions.tsv (test
entities, with names; these four not with --no-save_outputs) and, last, results.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.metadata
import json
import logging
import logging.handlers
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from data_process.dataset import MMKG, Split, load_dataset, read_pair_file, split_links, write_pair_file
from data_process.safe_load import ForbiddenGlobal, load_torch
from layers import PassThrough, calibrated_fusion, calibrated_weights
from loss import CLUBDisentanglement, batch_alignment_losses, random_expert_pairs, total_loss
from model import HUMEA, ModelConfig, ModelInputs
from utils import (
    PRESETS,
    Config,
    DataError,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    candidate_ids,
    evaluate_alignment,
    get_logger,
    kv,
    mutual_nearest_pairs,
    mutual_share,
    release_free_heap,
    set_seed,
    similarity_metrics,
)

# ---------------------------------------------------------------------------------------------
# Flags: built from the Config dataclass, so names, defaults and help live in one place.
# ---------------------------------------------------------------------------------------------


class Invocation(NamedTuple):
    """What the command line asks for: the run's Config and how to use it. ``eval_only``, ``extend_to``
    and ``add_calibration`` are actions on a resumed run, not part of its configuration: never saved as
    such."""

    cfg: Config
    eval_only: bool = False
    extend_to: int = 0
    add_calibration: bool = False


def parse_args(argv=None) -> Invocation:
    """Flags over the defaults of the chosen --preset (utils.PRESETS): a flag given beside it wins."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="paper", choices=tuple(PRESETS))
    known, _ = first.parse_known_args(argv)
    defaults = Config.from_preset(known.preset).to_dict()
    p = argparse.ArgumentParser(description="Train HUMEA (multi-modal entity alignment).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if meta.get("boolean"):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=defaults[f.name],
                           help=meta["help"])
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=defaults[f.name], help=meta["help"],
                           choices=meta.get("choices"))
    p.add_argument("--eval_only", action="store_true",
                   help="with --resume: load the run's checkpoint, evaluate on its test pairs and print the metrics")
    p.add_argument("--extend_to", type=int, default=0, metavar="EPOCHS",
                   help="with --resume: continue the run to EPOCHS epochs in all (more than it has trained), also "
                        "a finished one, whose results.json and outputs move to <run>/epoch<E>/ first")
    p.add_argument("--add_calibration", action="store_true",
                   help="with --resume of a run that finished before --calibrate_unlabelled existed: fit it at "
                        "the final checkpoint and add it to results.json's last epoch (nothing else changes)")
    args = vars(p.parse_args(argv))
    eval_only, extend_to, add = args.pop("eval_only"), args.pop("extend_to"), args.pop("add_calibration")
    return Invocation(Config(**args), eval_only, extend_to, add)


# ---------------------------------------------------------------------------------------------
# The run folder: its name, its log, its checkpoint, resumption and the final outputs.
# ---------------------------------------------------------------------------------------------

# The files of a run folder written by utils.atomic_write (through a temporary ".<name>.XXXX" file):
# those kept up to date while it trains, and those a finished run writes at its end (which
# --extend_to moves aside before training on).
RUNNING_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt")
FINAL_FILES = ("results.json", "entity_embeddings.npy", "modality_weights.npy", "expert_gates.npz",
               "predictions.tsv", "train_ill_final.tsv")
OUTPUT_FILES = RUNNING_FILES + FINAL_FILES


def dataset_dir(cfg: Config) -> Path:
    if cfg.file_dir:
        return Path(cfg.file_dir)
    from data_process.synthetic import default_dataset

    return default_dataset()


def run_folder(cfg: Config, data_root: Path) -> Path:
    off = cfg.switches.off
    name = cfg.run_name or f"{data_root.name}_r{cfg.rate}_s{cfg.seed}" + (
        f"_wo-{'-'.join(off)}" if off else "") + ("_il" if cfg.il else "")
    return Path(cfg.out_dir) / name


def refuse_existing_run(run: Path) -> None:
    """A new run never writes into the folder of an earlier one that got as far as a checkpoint."""
    if (run / "results.json").exists() or (run / "checkpoint.pt").exists():
        raise DataError(f"{run} already holds a run; use --resume {run} to continue it, or --run_name / "
                        "--out_dir for a new one (nothing was overwritten)")


def open_run_log(run: Path, early: logging.handlers.BufferingHandler) -> logging.Logger:
    """Attach the run folder's log.txt (appended to on resume) and write into it the lines logged
    before the folder existed: the folder is created only once the inputs are known to be good."""
    records = list(early.buffer)
    log = get_logger(run / "log.txt")
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            for record in records:
                handler.handle(record)
    return log


def remove_partial_writes(run: Path) -> None:
    """Temporary files of atomic writes cut short by a kill; no reader ever relies on them."""
    for name in OUTPUT_FILES:
        for tmp in run.glob(f".{name}.*"):
            tmp.unlink(missing_ok=True)


def snapshot(model, club, opt, q_opt, gen, epoch, state) -> dict:
    """Everything a resumed run needs to continue exactly: ``epoch`` = epochs done so far."""
    return {"model": model.state_dict(), "club": club.state_dict() if club else None,
            "opt": opt.state_dict(), "q_opt": q_opt.state_dict() if q_opt else None,
            "epoch": epoch, "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(), "python_rng": random.getstate(), **state}


def restore(ckpt: dict, model, club, opt, q_opt, gen) -> None:
    """Load a snapshot's states; the RNGs last, so that nothing drawn while building the model leaks in.
    States that do not fit the model (a damaged or foreign checkpoint) are a DataError."""
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        if club is not None:
            club.load_state_dict(ckpt["club"])
            q_opt.load_state_dict(ckpt["q_opt"])
        gen.set_state(ckpt["gen"])
        torch.set_rng_state(ckpt["torch_rng"])
        np.random.set_state(ckpt["numpy_rng"])
        random.setstate(ckpt["python_rng"])
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise DataError(f"the checkpoint's states do not fit the model its configuration builds "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); expected a checkpoint written "
                        "by train.py") from None


def load_checkpoint(run: Path) -> dict:
    path = run / "checkpoint.pt"
    if not path.is_file():
        raise DataError(f"--resume {run}: no checkpoint.pt in that folder (a run killed before its first "
                        "checkpoint has nothing to resume: start it again without --resume)")
    return read_checkpoint(path)


# What snapshot() writes: key -> (types, what it is). read_checkpoint refuses a file without them
# (damaged, or not train.py's) before anything is restored; None is allowed for the optional ones.
CHECKPOINT_FIELDS = {
    "model": (dict, "the model's state dict"), "opt": (dict, "the optimiser's state dict"),
    "epoch": (int, "the number of epochs done"), "gen": (torch.Tensor, "the training generator's state"),
    "torch_rng": (torch.Tensor, "torch's RNG state"), "numpy_rng": (tuple, "numpy's RNG state"),
    "python_rng": (tuple, "Python's RNG state"), "history": (list, "the evaluations so far"),
    "pseudo_pairs": (np.ndarray, "the pseudo pairs"), "config": (dict, "the run's configuration"),
    "seconds": ((int, float), "the training seconds so far"),
}
OPTIONAL_CHECKPOINT_FIELDS = {
    "club": (dict, "CLUB's state dict"), "q_opt": (dict, "CLUB's optimiser state"),
    "curriculum": (np.ndarray, "the curriculum's pairs"), "best_model": (dict, "the best-validation weights"),
    "stopped": (int, "the early-stop epoch"), "provenance": (dict, "the provenance"),
    "pseudo_steps": (list, "the pseudo-label steps"), "pair_version": (int, "which training pairs the loss is over"),
    "guard": (list, "the spike guard's rollbacks"), "guard_reference": (list, "the spike guard's reference loss"),
    "peak_grad": ((int, float), "the largest gradient norm since the last evaluation"),
    "brakes": (list, "the table brake's events"), "brake_window": (list, "the table brake's recent gradients"),
    "brake_version": (int, "which training pairs the brake's gradients are of"),
    "brake_rise": ((int, float), "the table brake's largest ratio since the last evaluation"),
}


def check_checkpoint(ckpt, path: Path) -> None:
    """The shape of a checkpoint of snapshot(), or a DataError naming the key and what was expected."""
    if not isinstance(ckpt, dict):
        raise DataError(f"{path}: expected a checkpoint of train.py (a dict of states), got {type(ckpt).__name__}")
    for key, (types, what) in {**CHECKPOINT_FIELDS, **OPTIONAL_CHECKPOINT_FIELDS}.items():
        value = ckpt.get(key)
        if value is None and key in OPTIONAL_CHECKPOINT_FIELDS:
            continue
        if key not in ckpt:
            raise DataError(f"{path}: key '{key}' ({what}) is missing; expected a checkpoint written by train.py")
        if not isinstance(value, types) or isinstance(value, bool):
            raise DataError(f"{path}: key '{key}' ({what}) is a {type(value).__name__}; expected a checkpoint "
                            "written by train.py")
    bad = next((k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise DataError(f"{path}: key 'model' entry {bad!r:.80} is not a tensor; expected the model's state dict")
    pairs = ckpt["pseudo_pairs"]
    if ckpt["epoch"] < 0 or pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
        raise DataError(f"{path}: epoch {ckpt['epoch']} or pseudo pairs of shape {pairs.shape} ({pairs.dtype}); "
                        "expected epochs >= 0 and (P, 2) integer pairs")


def read_checkpoint(path: Path) -> dict:
    """A checkpoint, read by torch's weights_only loader: tensors, Python builtins, plain numeric numpy
    arrays (data_process.safe_load.load_torch); a file naming anything else is refused unread."""
    try:
        ckpt = load_torch(path)
    except ForbiddenGlobal as e:
        raise DataError(f"{path}: refused: the checkpoint would call {e.global_name}, which a checkpoint of "
                        "train.py does not hold; nothing in it was run (docs/reliability.md, 'Untrusted "
                        "inputs')") from None
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is a bad input here
        raise DataError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    check_checkpoint(ckpt, path)
    return ckpt


def saved_config(saved: dict, source: str) -> Config:
    """The Config a checkpoint was made with; ``source`` names the checkpoint in the error."""
    try:
        return Config(**{k: v for k, v in saved.items() if k != "provenance"})
    except TypeError as e:
        raise DataError(f"{source}: the checkpoint's configuration does not match this version "
                        f"of train.py ({e})") from None


# Flags that may differ between a run and its resumption: where it runs, how it is resumed, and
# what is written at its end (nothing that changes the training).
RESUME_FREE = ("resume", "device", "save_outputs", "keep_checkpoints", "calibrate_unlabelled")


def resumed_config(cfg: Config, saved: dict) -> Config:
    """A resumed run keeps its saved configuration. A flag given with --resume that differs from both
    its default and the saved value would be silently ignored, so it is an error instead."""
    out = saved_config(saved, f"--resume {cfg.resume}")
    default = Config.from_preset(cfg.preset)
    for f in dataclasses.fields(Config):
        given = getattr(cfg, f.name)
        if f.name not in RESUME_FREE and given != getattr(default, f.name) and given != getattr(out, f.name):
            raise DataError(f"--resume {cfg.resume}: --{f.name} {given} differs from the resumed run's "
                            f"{getattr(out, f.name)}; a resumed run keeps its configuration (only "
                            f"{', '.join('--' + n for n in RESUME_FREE if n != 'resume')} may change): start a new "
                            "run to change it")
    return dataclasses.replace(out, device=cfg.device, save_outputs=cfg.save_outputs,
                               calibrate_unlabelled=cfg.calibrate_unlabelled,
                               keep_checkpoints=cfg.keep_checkpoints or out.keep_checkpoints)


def extended_config(cfg: Config, run: Path, done: int, extend_to: int, stopped: int | None = None) -> Config:
    """--extend_to: the same run, trained to ``extend_to`` epochs. Nothing depends on --epochs but the
    number of epochs (and the start of iterative training, hence refused with --il), so the result
    equals a run started with --epochs extend_to. A run that ``stopped`` early (--early_stop) is
    refused too: its stop is part of its result. A finished run's final files move to
    <run>/epoch<done>/ first: nothing it wrote is lost."""
    if extend_to <= done:
        raise DataError(f"--extend_to {extend_to}: {run} has already trained {done} epochs; give a larger number")
    if stopped:
        raise DataError(f"--extend_to: {run} stopped early at epoch {stopped} (--early_stop); "
                        "start a new run with a larger --early_stop instead (nothing was changed)")
    if cfg.il:
        raise DataError(f"--extend_to: {run} uses iterative training, whose start depends on --epochs; "
                        "start a new run with the epochs wanted instead")
    if (run / "results.json").is_file():
        archive = run / f"epoch{done}"
        if archive.exists():
            raise DataError(f"--extend_to: {archive} already exists; move it away first (nothing was changed)")
        archive.mkdir()
        for name in FINAL_FILES:
            if (run / name).exists():
                (run / name).rename(archive / name)
    return dataclasses.replace(cfg, epochs=extend_to)


def finished_run(run: Path, log: logging.Logger) -> dict:
    """--resume of a finished run: report its results, train and write nothing."""
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    log.info(f"{run} is finished (results.json present): nothing to resume; its results:")
    print(format_results(results))
    return results


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *args], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def provenance(device: torch.device, data_root: Path) -> dict:
    """Where this session of a run comes from: the code (git commit; dirty = tracked files differ from
    it), the library versions, the device and the dataset folder. Null where unknown."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "transformers": _version("transformers"), "device": str(device), "device_name": _device_name(device),
            "threads": torch.get_num_threads(), "dataset": str(data_root.resolve()), "started": _now()}


def write_outputs(run: Path, model: HUMEA, inputs: ModelInputs, data: MMKG, test_pairs: np.ndarray, cfg: Config):
    """The model's test metrics in both directions; with --save_outputs also its embeddings, router
    weights, expert gates and the test predictions with names. The model is the last epoch's, or with
    --early_stop the best-validation epoch's."""
    ids = np.arange(data.num_entities)
    out = model.embed(ids, inputs)
    res = alignment_metrics(out.fused, test_pairs, cfg, with_predictions=cfg.save_outputs)
    if not cfg.save_outputs:
        return res
    atomic_write(run / "entity_embeddings.npy", lambda f: np.save(f, out.fused.cpu().numpy()), "wb")
    atomic_write(run / "modality_weights.npy", lambda f: np.save(f, out.weights.cpu().numpy()), "wb")
    gates = {m: g.cpu().numpy() for m, g in out.gates.items()}
    atomic_write(run / "expert_gates.npz", lambda f: np.savez(f, modalities=np.array(model.modalities), **gates), "wb")
    p = res["predictions"]
    names = data.names
    columns = ("left_id", "left_name", "pred_right_id", "pred_right_name", "score", "gold_right_id",
               "gold_right_name", "correct", "rank")
    header = "\t".join(columns) + "\n"
    lines = [f"{lft}\t{names[lft]}\t{pr}\t{names[pr]}\t{s:.5f}\t{g}\t{names[g]}\t{int(pr == g)}\t{r:g}\n"
             for lft, pr, s, g, r in zip(p["left"], p["pred_right"], p["score"], p["gold_right"], p["rank"])]
    atomic_write(run / "predictions.tsv", lambda f: f.writelines([header, *lines]))
    return res


# ---------------------------------------------------------------------------------------------
# Training: the model, the batches, the curriculum and one epoch.
# ---------------------------------------------------------------------------------------------


def build_model(cfg: Config, inputs: ModelInputs, device):
    """HUMEA, the optional CLUB networks and their two optimisers."""
    try:
        model = HUMEA(ModelConfig.from_config(cfg), inputs).to(device)
    except ValueError as e:  # e.g. every modality switched off: a bad combination of flags and data
        raise DataError(str(e)) from None
    with_experts = [m for m in model.modalities if not isinstance(model.experts[m], PassThrough)]
    switches = cfg.switches
    use_club = switches.use_club and switches.use_hmoe and cfg.n_exp > 1 and with_experts
    club = CLUBDisentanglement(with_experts, cfg.hidden, cfg.hidden).to(device) if use_club else None
    opt = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    q_opt = torch.optim.AdamW(club.parameters(), lr=cfg.q_lr) if club else None
    return model, club, opt, q_opt


def entity_table(model: HUMEA) -> torch.nn.Parameter | None:
    """The graph encoder's entity table e^g, or None when the graph modality is switched off."""
    return model.graph_encoder.entity.weight if "graph" in model.modalities else None


def parameter_groups(model: HUMEA, cfg: Config) -> list[dict]:
    """One AdamW group of every parameter, or with --entity_lr two: the entity table e^g at its own rate
    and the rest at --lr."""
    if not cfg.entity_lr:
        return [{"params": list(model.parameters())}]
    table = entity_table(model)
    if table is None:
        raise DataError(f"--entity_lr {cfg.entity_lr}: the graph modality is switched off, so there is no entity "
                        "table to give a learning rate")
    return [{"params": [p for p in model.parameters() if p is not table]}, {"params": [table], "lr": cfg.entity_lr}]


def training_pairs(cfg: Config, data: MMKG, split: Split, log: logging.Logger) -> tuple[np.ndarray, dict]:
    """The seed split's training pairs, or those of --train_ill_path with a count of how many of them
    are gold test pairs (a leak of test labels into training, reported loudly)."""
    if not cfg.train_ill_path:
        pairs, leak = split.train, {}
    else:
        pairs = read_pair_file(cfg.train_ill_path, data)
        n_gold_test = pair_overlap(pairs, split.test)
        leak = {"train_ill_path": cfg.train_ill_path, "pairs": len(pairs), "gold_test_pairs": n_gold_test}
        log.info(kv(train_ill_path=cfg.train_ill_path, pairs=len(pairs), gold_test_pairs=n_gold_test))
        if n_gold_test:
            leak["warning"] = (f"{n_gold_test} of the {len(pairs)} training pairs are gold TEST pairs: "
                               "test labels reach training; numbers are not comparable with a clean split")
            log.warning("WARNING: " + leak["warning"])
    if len(pairs) == 0 or len(split.test) == 0:
        raise DataError(f"--rate {cfg.rate} of {len(data.links)} aligned pairs leaves {len(pairs)} training and "
                        f"{len(split.test)} test pairs; both must be non-empty")
    return pairs, leak


def loss_batches(pairs: np.ndarray, bsize: int, gen: torch.Generator, shuffle: bool = True):
    """Shuffle the training pairs and cut them into batches of ``bsize`` (the last may be smaller);
    ``shuffle=False`` cuts them in the given order (the curriculum's groups of neighbours)."""
    perm = torch.randperm(len(pairs), generator=gen).numpy() if shuffle else np.arange(len(pairs))
    return [pairs[perm[s:s + bsize]] for s in range(0, len(pairs), bsize)]


# The official curriculum: epochs [0, CURRICULUM_EPOCHS), rebuilt every CURRICULUM_EVERY epochs.
CURRICULUM_EPOCHS, CURRICULUM_EVERY, CURRICULUM_K = 250, 50, 5


@torch.no_grad()
def curriculum_pairs(model: HUMEA, inputs: ModelInputs, pairs: np.ndarray, k: int, gen: torch.Generator,
                     chunk: int = 4096) -> np.ndarray:
    """The official curriculum, as intended (--curriculum): each training pair, in a shuffled order,
    followed by the k other training pairs whose left entities' fused embeddings are most similar to
    its left entity's, so that hard negatives share a batch. Pairs therefore repeat. (P * (k + 1), 2).

    The official code builds an N x N similarity over all entities and has two defects
    (docs/departures.md): it reads the row of entity id i instead of the i-th pair's entity, and it
    compares j + 1 with the pair ids when it skips the pair itself. Here the similarity is P x P over
    the training pairs only, in row blocks, and the pair itself is excluded by its position."""
    emb = torch.nn.functional.normalize(model.embed(pairs[:, 0], inputs).fused, dim=-1)  # (P, M*D)
    k = min(k, len(pairs) - 1)
    order = torch.randperm(len(pairs), generator=gen).numpy()
    groups = np.empty((len(pairs), k + 1), dtype=np.int64)
    for s in range(0, len(pairs), chunk):
        rows = torch.as_tensor(order[s:s + chunk], device=emb.device)
        sim = emb[rows] @ emb.t()  # (chunk, P)
        sim[torch.arange(len(rows)), rows] = -torch.inf  # not the pair itself
        groups[s:s + len(rows), 0] = rows.cpu().numpy()
        if k:
            groups[s:s + len(rows), 1:] = sim.topk(k, dim=1).indices.cpu().numpy()
    return pairs[groups.reshape(-1)]


@dataclass
class EpochForward:
    """One training epoch's forward pass: the model's output on the epoch's entities and the loss terms
    of Eq. 13-16 and 9 before their weights. ``router_cl`` is --router_holdout's fused loss on its own
    pairs, already scaled (None without them); the step adds it to ``fused_cl``."""
    out: object
    fused_cl: torch.Tensor
    router_cl: torch.Tensor | None
    uni_cl: dict
    distill: dict
    club_term: torch.Tensor
    experts: dict
    club_pairs: object


def epoch_forward(model: HUMEA, club: CLUBDisentanglement | None, inputs: ModelInputs, pairs: np.ndarray,
                  cfg: Config, gen: torch.Generator, shuffle: bool = True,
                  router_pairs: np.ndarray | None = None) -> EpochForward:
    """The forward pass of :func:`train_epoch` (docs/analysis/spike.py splits its gradient by loss term).

    The experts run only on the entities of the training pairs: the losses read nothing else,
    and each expert acts on one entity at a time, so this equals the full computation.
    L_CLUB (Eq. 9) is defined on "a batch of entities"; it is computed on one random batch of
    ``club_bsize`` training entities per epoch, not on every loss batch: its variational networks
    run on every (entity, expert) row, which would otherwise cost more than the rest of the epoch.

    ``router_pairs`` (--router_holdout): pairs whose fused loss L_f^CL, in batches of their own, trains
    the router alone; they have no unimodal losses, and the router gets nothing from ``pairs``. Their
    loss is scaled by (all pairs / router pairs), so that the router's fit keeps its weight against the
    balance term, which reaches the router on every entity."""
    model.train()
    held = router_pairs is not None and len(router_pairs) > 0
    ents = np.unique(np.concatenate([pairs.ravel(), router_pairs.ravel()]) if held else pairs)
    if club is not None:
        club.requires_grad_(False)  # Q_m is fitted by its own optimiser below, not by this loss
    ids = torch.as_tensor(ents, device=inputs.graph.src.device)
    router_only = None
    if held:  # the entities of the router's pairs only (an entity also in ``pairs`` trains its modalities)
        router_only = torch.as_tensor(np.isin(ents, router_pairs) & ~np.isin(ents, pairs), device=ids.device)
    out = model(ids, inputs, router_only=router_only)
    fused_cl, uni_cl, distill = alignment_losses(model, out, ents, pairs, cfg, gen, shuffle)  # Eq. 13-16
    router_cl = None
    if held:  # the router's own pairs: L_f^CL only, scaled to the weight it would have on every pair
        tau = dataclasses.replace(cfg, tau_cl=cfg.router_tau) if cfg.router_tau else cfg
        router_cl = alignment_losses(model, out, ents, router_pairs, tau, gen, True, unimodal=False)[0]
        router_cl = router_cl * ((len(pairs) + len(router_pairs)) / len(router_pairs))
    club_term, experts, club_pairs = club_bound(club, out, len(ents), cfg, gen)  # Eq. 9
    return EpochForward(out, fused_cl, router_cl, uni_cl, distill, club_term, experts, club_pairs)


def train_epoch(model: HUMEA, club: CLUBDisentanglement | None, inputs: ModelInputs, pairs: np.ndarray,
                cfg: Config, gen: torch.Generator, opt, q_opt, epoch: int, shuffle: bool = True,
                router_pairs: np.ndarray | None = None) -> dict[str, float]:
    """One optimiser step on the sum of the losses of all batches (as the official code does); the
    forward pass is :func:`epoch_forward`.

    ``epoch`` is the number of this epoch (1 = the first; the numbering of metrics.jsonl), used only to
    name it when a loss term is NaN or infinite: FloatingPointError, raised before any parameter changes."""
    f = epoch_forward(model, club, inputs, pairs, cfg, gen, shuffle, router_pairs)
    fused_cl = f.fused_cl if f.router_cl is None else f.fused_cl + f.router_cl
    total, terms = combined_loss(model, f.out, fused_cl, f.uni_cl, f.distill, f.club_term, cfg)  # Eq. 17
    for name, value in terms.items():
        finite_or_raise(name, torch.as_tensor(value).detach(), epoch)
    terms = {k: float(torch.as_tensor(v).detach()) for k, v in terms.items()}
    opt.zero_grad(set_to_none=True)
    total.backward()
    table = entity_table(model)
    if table is not None and table.grad is not None:  # what --table_brake watches (before any clipping)
        terms["table_grad_norm"] = float(torch.linalg.vector_norm(table.grad, dtype=torch.float64))
    terms["grad_norm"] = clip_gradient(model, cfg.grad_clip)
    opt.step()
    if club is not None:
        # CLUB's variational networks Q_m are fitted by their own optimiser on detached outputs.
        club.requires_grad_(True)
        q_opt.zero_grad(set_to_none=True)
        fit = club.q_fit_loss({m: e.detach() for m, e in f.experts.items()}, f.club_pairs)
        finite_or_raise("club_q_fit", fit, epoch)
        fit.backward()
        q_opt.step()
        terms["club_q_nll"] = float(fit.detach())
    terms["loss"] = terms.pop("total")
    return terms


def clip_gradient(model: torch.nn.Module, max_norm: float) -> float:
    """The global L2 norm of the model's gradient, logged so that a loss jump can be traced to the
    steps before it; with ``max_norm`` > 0 (--grad_clip) the gradient is rescaled to at most that norm.
    The norm is summed in float64: under --preset official the first step's gradient reaches ~4e23 (the
    bag-of-words experts' centres, through the exactly-zero outputs of entities without attributes,
    docs/departures.md "A first-step overflow"), whose float32 norm overflows to inf."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64)
                                                       for g in grads])))
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / norm)
    return norm


def alignment_losses(model: HUMEA, out, ents: np.ndarray, pairs: np.ndarray, cfg: Config, gen: torch.Generator,
                     shuffle: bool, unimodal: bool = True):
    """Eq. 13-16 summed over the epoch's loss batches: L_f^CL, {m: L_m^CL} and {m: L_m^AL} ({} when
    switched off, or with ``unimodal=False``). ``out`` holds the embeddings of the sorted entities ``ents``."""
    dev = out.fused.device
    fused_cl = 0.0
    uni_cl = {m: 0.0 for m in model.modalities} if cfg.switches.use_cl and unimodal else {}
    distill = {m: 0.0 for m in model.modalities} if cfg.switches.use_al and unimodal else {}
    batches = loss_batches(pairs, cfg.bsize, gen, shuffle)
    sizes, both = [len(b) for b in batches], np.concatenate(batches)  # (P, 2) in batch order
    rows1 = torch.as_tensor(np.searchsorted(ents, both[:, 0]), device=dev)
    rows2 = torch.as_tensor(np.searchsorted(ents, both[:, 1]), device=dev)

    def side(x, rows):
        # One gather per embedding for all batches, cut into per-batch views: the backward then joins
        # the batch gradients once instead of scattering each batch into a full-size zero tensor.
        return x[rows].split(sizes)

    fused1, fused2 = side(out.fused, rows1), side(out.fused, rows2)
    uni1 = {m: side(out.unimodal[m], rows1) for m in model.modalities}
    uni2 = {m: side(out.unimodal[m], rows2) for m in model.modalities}
    # (P, M) both entities of the pair have the modality (--missing mask), cut like the embeddings.
    both_have = None if out.present is None else (out.present[rows1] & out.present[rows2]).split(sizes)
    for i in range(len(batches)):  # losses of all batches are summed
        present = None if both_have is None else {m: both_have[i][:, j] for j, m in enumerate(model.modalities)}
        f_cl, m_cl, m_al = batch_alignment_losses(
            fused1[i], fused2[i], {m: u[i] for m, u in uni1.items()}, {m: u[i] for m, u in uni2.items()},
            cfg.tau_cl, cfg.tau_al, unimodal_cl=bool(uni_cl), distill=bool(distill), present=present,
            joint_teacher=cfg.distill_direction == "joint_teacher")
        fused_cl = fused_cl + f_cl
        for m in m_cl:
            uni_cl[m] = uni_cl[m] + m_cl[m]
        for m in m_al:
            distill[m] = distill[m] + m_al[m]
    return fused_cl, uni_cl, distill


def club_bound(club: CLUBDisentanglement | None, out, n_ents: int, cfg: Config, gen: torch.Generator):
    """Eq. 9 on one random batch of ``club_bsize`` of the epoch's entities: (L_CLUB, the batch's expert
    outputs {m: (B, K, D)}, the expert pairs of --club random_pair or None). Zero without CLUB."""
    dev = out.fused.device
    if club is None:
        return torch.zeros((), device=dev), {}, None
    rows = torch.randperm(n_ents, generator=gen)[:cfg.club_bsize].to(dev)
    experts = {m: out.experts[m][rows] for m in club.q}  # (B, K, D)
    club_pairs = random_expert_pairs(club.q, cfg.n_exp, gen) if cfg.club == "random_pair" else None
    return club(experts, club_pairs), experts, club_pairs


def combined_loss(model: HUMEA, out, fused_cl, uni_cl: dict, distill: dict, club_term, cfg: Config):
    """Eq. 17 plus the router balance term: (total, {term name: value} for the log)."""
    weights = getattr(model, "loss_weights", None)  # --loss_weighting uncertainty
    total = total_loss(fused_cl, uni_cl, club_term, distill, cfg.cl_loss, distill_weight(cfg), cfg.mi_loss,
                       weights["cl"] if weights else None, weights["al"] if weights else None)  # Eq. 17
    balance = torch.zeros((), device=out.fused.device)
    if cfg.router_balance > 0:
        balance = balance_term(model, out, cfg)
        total = total + cfg.router_balance * balance
    terms = {"fused_cl": fused_cl, "uni_cl": sum(uni_cl.values(), 0.0), "distill": sum(distill.values(), 0.0),
             "club": club_term, "balance": balance, "total": total}
    return total, terms


def distill_weight(cfg: Config) -> float:
    """lambda_2 of Eq. 17: --al_loss, or its square under the official code's joint teacher (which
    multiplies its distillation loss by al_loss twice)."""
    return cfg.al_loss ** 2 if cfg.distill_direction == "joint_teacher" else cfg.al_loss


def balance_term(model: HUMEA, out, cfg: Config) -> torch.Tensor:
    """The router balance term before its weight (--router_balance). With --router_balance_reach router
    its weights are HUMEA.detached_router_weights, so that it trains the router's own parameters only;
    with all (the default) it also reaches every modality's experts and the entity table through the
    router's input."""
    weights = model.detached_router_weights(out) if cfg.router_balance_reach == "router" else out.weights
    return router_imbalance(weights, out.present)


def router_imbalance(weights: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Mean over entities of KL(w || uniform over the modalities the entity has) = log M_e - H(w)."""
    m_e = weights.new_full((weights.shape[0],), weights.shape[1]) if present is None else present.sum(1).float()
    plogp = torch.where(weights > 0, weights * torch.log(weights.clamp_min(1e-30)), torch.zeros_like(weights))
    return (plogp.sum(1) + torch.log(m_e)).mean()


def finite_or_raise(name: str, value: torch.Tensor, epoch: int) -> None:
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"loss term '{name}' is {float(value)} at epoch {epoch}")


def numerical_fault(e: FloatingPointError, run: Path, saved_epoch: int | None, cfg: Config) -> FloatingPointError:
    """The NaN/inf message: which term, which epoch, and what is left on disk."""
    kept = (f"the last good checkpoint, {run / 'checkpoint.pt'} (epoch {saved_epoch}), is kept" if saved_epoch
            else f"it stopped before the first checkpoint (--save_every {cfg.save_every})")
    return FloatingPointError(f"{e}; training stopped and {kept}; results.json was not written")


# ---------------------------------------------------------------------------------------------
# Evaluation, the modality-health monitor and pseudo-labels.
# ---------------------------------------------------------------------------------------------


def alignment_metrics(emb: torch.Tensor, pairs: np.ndarray, cfg: Config, ids: np.ndarray | None = None,
                      with_predictions: bool = False,
                      extra_candidates: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """utils.evaluate_alignment with the run's CSLS and chunk settings."""
    return evaluate_alignment(emb, pairs, ids=ids, csls_k=cfg.csls_k, use_csls=cfg.csls, chunk=cfg.eval_chunk,
                              with_predictions=with_predictions, extra_candidates=extra_candidates)


def evaluate(model: HUMEA, inputs: ModelInputs, pairs: np.ndarray, cfg: Config, with_predictions=False,
             health_ids: np.ndarray | None = None, distractors: np.ndarray | None = None):
    """Metrics of ``pairs``; with ``health_ids`` (entities among the pairs') also their modality_health;
    ``distractors`` (pairs whose left and right entities join the candidates, never as queries)."""
    release_free_heap()  # the freed memory of the training epochs, before the evaluation's own peak
    ids = np.unique(pairs if distractors is None else np.concatenate([pairs, distractors]))
    emb = model.embed(ids, inputs)
    extra = None if distractors is None else (distractors[:, 0], distractors[:, 1])
    res = alignment_metrics(emb.fused, pairs, cfg, ids=ids, with_predictions=with_predictions, extra_candidates=extra)
    if health_ids is None:
        return res
    return res, modality_health(model.modalities, emb, np.searchsorted(ids, health_ids))


# --calibrate_weights: the factors tried for each modality's weight, the most steps of the search, and how many
# test entities of each side join the validation links' candidates in the fit (a fixed sample).
CALIBRATION_GRID, CALIBRATION_STEPS, CALIBRATION_DISTRACTORS = (0.0, 0.5, 1.0, 2.0, 4.0), 20, 1000


def fit_factors(score, num_modalities: int) -> tuple[np.ndarray, float, float]:
    """The factors (one per modality) that maximise ``score(factors)``, by steepest ascent over CALIBRATION_GRID
    from all ones: each step scores every change of one factor and takes the best one if it raises the score
    (the first in modality and grid order on a tie), so the result never scores below the learned weights (all
    ones). The earlier versions kept any rise as they went through the modalities and stopped in local optima
    (docs/accuracy.md, "Calibrating the weights on validation links"). Returns the factors, their score and the
    learned weights' score."""
    factors = np.ones(num_modalities)
    best = learned = score(factors)
    for _ in range(CALIBRATION_STEPS):
        step, stepped = best, None
        for i in range(num_modalities):
            for value in CALIBRATION_GRID:
                trial = factors.copy()
                trial[i] = value
                if value != factors[i] and trial.any() and (got := score(trial)) > step:
                    step, stepped = got, trial
        if stepped is None:
            break
        best, factors = step, stepped
    return factors, best, learned


def factor_objective(unimodal: list[torch.Tensor], weights: torch.Tensor, pairs: np.ndarray, cfg: Config,
                     ids: np.ndarray | None = None, extra: tuple[np.ndarray, np.ndarray] | None = None):
    """``score(factors)``: the MRR of ``pairs`` when the router's ``weights`` (R, M) are calibrated by
    ``factors`` (layers.calibrated_weights), i.e. alignment_metrics(weighted_concat(unimodal, calibrated
    weights), pairs, cfg, ids, extra_candidates=extra)["avg"]["mrr"], without building the fused embeddings.
    Their cosine is sum_m w_m(a) w_m(b) <h'_m(a), h'_m(b)> / (|h^f(a)| |h^f(b)|), with |h^f(a)|^2 =
    sum_m w_m(a)^2 |h'_m(a)|^2: the M matrices of dot products are computed once, and a factor vector costs M
    scaled sums of an (L, C) matrix and the ranking (25 ms for 1,224 x 1,224 candidates on this CPU, a tenth
    of the fused path). ``unimodal``: M tensors (R, D) whose rows are ``ids`` (None: the entity ids)."""
    left_ids, right_ids = candidate_ids(pairs, extra)
    rows = (lambda e: e) if ids is None else (lambda e: np.searchsorted(ids, e))
    at_left, at_right = torch.as_tensor(rows(left_ids)), torch.as_tensor(rows(right_ids))
    left = [u[at_left].float() for u in unimodal]
    right = [u[at_right].float() for u in unimodal]
    dots = [a @ b.t() for a, b in zip(left, right)]  # M x (L, C)
    left_sq = torch.stack([(a * a).sum(1) for a in left], 1)  # (L, M)
    right_sq = torch.stack([(b * b).sum(1) for b in right], 1)  # (C, M)
    left_w, right_w = weights[at_left].float(), weights[at_right].float()
    left_pos, right_pos = np.searchsorted(left_ids, pairs[:, 0]), np.searchsorted(right_ids, pairs[:, 1])

    def score(factors: np.ndarray) -> float:
        scale = torch.as_tensor(factors, dtype=left_w.dtype)
        wl, wr = calibrated_weights(left_w, scale), calibrated_weights(right_w, scale)
        sim = torch.zeros(len(left_ids), len(right_ids), device=left_w.device)
        for m, d in enumerate(dots):
            sim.addcmul_(d * wl[:, m, None], wr[None, :, m])
        sim.div_((wl * wl * left_sq).sum(1).sqrt().clamp_min(1e-12)[:, None])  # F.normalize's eps
        sim.div_((wr * wr * right_sq).sum(1).sqrt().clamp_min(1e-12)[None, :])
        return similarity_metrics(sim, left_pos, right_pos, cfg.csls_k, cfg.csls)["avg"]["mrr"]

    return score


def calibration_distractors(test: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The test entities (left, right; sorted) that join the validation links' candidates in --calibrate_weights'
    fit: CALIBRATION_DISTRACTORS of each side, the same at every evaluation (drawn from the seed on a stream of
    their own). No test link is read: the two sides are drawn apart."""
    rng = np.random.default_rng([seed, 20261207])
    sides = []
    for side in (np.unique(test[:, 0]), np.unique(test[:, 1])):
        n = min(CALIBRATION_DISTRACTORS, len(side))
        sides.append(np.sort(rng.choice(side, n, replace=False)))
    return sides[0], sides[1]


def calibrated_evaluation(model: HUMEA, inputs: ModelInputs, valid: np.ndarray, test: np.ndarray,
                          cfg: Config) -> tuple[dict, dict]:
    """--calibrate_weights. One embedding of the validation and test entities gives (1) the validation links
    ranked with every test entity as a distractor ("valid_heldout", as evaluate(distractors=test) ranks them)
    and (2) the calibration: one factor per modality on every entity's router weights
    (layers.calibrated_weights), fitted (fit_factors, on factor_objective) to the MRR of the validation links
    ranked among themselves and a fixed sample of test entities (calibration_distractors), then the test pairs
    ranked under the calibrated weights. The factors are fitted afresh at each evaluation and change nothing
    in the training."""
    release_free_heap()
    ids = np.unique(np.concatenate([valid, test]))
    emb = model.embed(ids, inputs)
    heldout = alignment_metrics(emb.fused, valid, cfg, ids=ids, extra_candidates=(test[:, 0], test[:, 1]))

    extra = calibration_distractors(test, cfg.seed)
    valid_mrr = factor_objective([emb.unimodal[m] for m in model.modalities], emb.weights, valid, cfg, ids=ids,
                                 extra=extra)
    factors, fitted, learned = fit_factors(valid_mrr, len(model.modalities))
    fused = calibrated_fusion([emb.unimodal[m] for m in model.modalities], emb.weights, factors)
    return heldout, {"factors": dict(zip(model.modalities, factors.tolist())), "valid_mrr": fitted,
                     "valid_mrr_learned": learned, "distractors": len(extra[0]),
                     "test": alignment_metrics(fused, test, cfg, ids=ids)}


def unaligned_entities(data: MMKG, train_pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The entities of each KG (left, right; sorted ids) that are in none of ``train_pairs``."""
    aligned = np.zeros(data.num_entities, dtype=bool)
    aligned[train_pairs.ravel()] = True
    return np.nonzero((data.kg == 0) & ~aligned)[0], np.nonzero((data.kg == 1) & ~aligned)[0]


def unlabelled_calibration(model: HUMEA, inputs: ModelInputs, data: MMKG, train_pairs: np.ndarray,
                           test: np.ndarray, cfg: Config) -> dict:
    """--calibrate_unlabelled. One factor per modality on every entity's router weights
    (layers.calibrated_weights), fitted (fit_factors, the search of --calibrate_weights) to the share of
    mutual CSLS nearest neighbours between the two KGs' entities that are in no training pair (the
    candidates of iterative training, utils.mutual_nearest_pairs); then the test pairs ranked under the
    calibrated weights. No link is read for the fit: a weighting under which more entities are each
    other's best match is taken to align more of them (docs/accuracy.md, "Calibrating the weights without
    labels"). Changes nothing in the training."""
    left, right = unaligned_entities(data, train_pairs)
    if not len(left) or not len(right):
        raise DataError("--calibrate_unlabelled: every entity of one KG is in a training pair, so no entity is "
                        "left to fit the weights on (give --no-calibrate_unlabelled)")
    release_free_heap()
    ids = np.unique(np.concatenate([left, right, test.ravel()]))
    emb = model.embed(ids, inputs)
    parts = [emb.unimodal[m] for m in model.modalities]
    at_left, at_right = torch.as_tensor(np.searchsorted(ids, left)), torch.as_tensor(np.searchsorted(ids, right))

    def share(factors: np.ndarray) -> float:
        fused = calibrated_fusion(parts, emb.weights, factors)
        return mutual_share(fused[at_left], fused[at_right], left, right, cfg.csls_k, cfg.eval_chunk)

    factors, fitted, learned = fit_factors(share, len(model.modalities))
    fused = calibrated_fusion(parts, emb.weights, factors)
    return {"factors": dict(zip(model.modalities, factors.tolist())), "mutual_share": fitted,
            "mutual_share_learned": learned, "candidates": [len(left), len(right)],
            "test": alignment_metrics(fused, test, cfg, ids=ids)}


# The modality-health monitor: the entities it samples, and its warning thresholds.
HEALTH_SAMPLE, COLLAPSED_COSINE, NEGLIGIBLE_WEIGHT = 500, 0.9, 0.01


def health_sample(test_pairs: np.ndarray, seed: int) -> np.ndarray:
    """A fixed sample of HEALTH_SAMPLE test entities (sorted), the same at every evaluation."""
    ents = np.unique(test_pairs)
    return np.sort(np.random.default_rng(seed).choice(ents, min(HEALTH_SAMPLE, len(ents)), replace=False))


def modality_health(modalities, emb, rows) -> dict:
    """Per modality, the mean pairwise cosine of the unimodal embeddings h'_m of the sampled entities
    that have the modality (near 1: every entity gets the same vector, the modality carries nothing),
    and its mean router weight over the sample."""
    rows = torch.as_tensor(rows, device=emb.fused.device)
    cosine, weight = {}, {}
    for j, m in enumerate(modalities):
        u = emb.unimodal[m][rows]
        if emb.present is not None:
            u = u[emb.present[rows, j]]
        n = len(u)
        s = u @ u.t()
        cosine[m] = round(float((s.sum() - s.diagonal().sum()) / max(n * n - n, 1)), 4)
        weight[m] = round(float(emb.weights[rows, j].mean()), 4)
    return {"cosine": cosine, "weight": weight}


# Pairs sampled (fixed per run) for the per-modality Hits@1 of the health record: among HEALTH_PAIRS test
# pairs, and among as many training pairs, each entity ranked against its sample's other side only.
HEALTH_PAIRS = 1000


def health_pair_sample(pairs: np.ndarray, seed: int) -> np.ndarray:
    """A fixed sample of at most HEALTH_PAIRS rows of ``pairs``, the same at every evaluation."""
    rows = np.random.default_rng(seed).choice(len(pairs), min(HEALTH_PAIRS, len(pairs)), replace=False)
    return pairs[np.sort(rows)]


def modality_hits(model: HUMEA, inputs: ModelInputs, samples: dict[str, np.ndarray], cfg: Config) -> dict:
    """Hits@1 of each unimodal embedding h'_m (and of the fused one) on each sample of pairs, e.g.
    {"test": ..., "train": ...}: a modality whose training Hits@1 climbs while its test Hits@1 does not
    is memorising the seed pairs. Every pair counts, also those whose entities lack the modality."""
    ids = np.unique(np.concatenate([p.ravel() for p in samples.values()]))
    emb = model.embed(ids, inputs)
    tables = {**emb.unimodal, "fused": emb.fused}  # modality -> (R, D), rows = ids
    return {name: {m: round(alignment_metrics(e, pairs, cfg, ids=ids)["avg"]["hits@1"], 4) for m, e in tables.items()}
            for name, pairs in samples.items()}


# A training loss per pair this many times the previous evaluation's is a spike: the most a loss rose between
# two evaluations in the 1000-epoch FB15K-DB15K runs without one is x1.03; seed 43's spike was x1.43.
LOSS_SPIKE = 1.2


def loss_per_pair(record: dict) -> float | None:
    """A record's training loss divided by the pairs it was summed over (records before the pair count
    was kept give the sum, as they were compared then)."""
    if "loss" not in record:
        return None
    return record["loss"] / record["train_pairs"] if record.get("train_pairs") else record["loss"]


def loss_spike_warning(previous: dict | None, record: dict) -> str | None:
    """The warning for a training loss that jumped since the previous evaluation (a late spike gives no
    NaN and collapses no modality, so nothing else in the log would show it), or None.

    The loss is the sum over the epoch's training pairs, so it is compared per pair, and only between
    two evaluations on the same pairs: a pseudo-label step or the curriculum's regrouping between them
    changes what it measures (iterative training's first step more than tripled the sum)."""
    if not previous or previous.get("pair_version") != record.get("pair_version"):
        return None
    before, now = loss_per_pair(previous), loss_per_pair(record)
    if before is None or now is None or before <= 0:
        return None
    ratio = now / before
    if ratio <= LOSS_SPIKE:
        return None
    return (f"the training loss rose from {previous['loss']:.4g} at epoch {previous['epoch']} to {record['loss']:.4g} "
            f"(x{ratio:.2f} per training pair > x{LOSS_SPIKE}): a loss spike; later evaluations may be worse than "
            "earlier ones (docs/accuracy.md, 'Late loss spikes': the ones traced started in the entity table, "
            "which --entity_lr slows and --spike_guard rolls back; --val_ratio with --early_stop keeps the "
            "best-validation model)")


def health_warnings(health: dict) -> list[str]:
    out = [f"modality {m} has collapsed: mean pairwise cosine {c:.3f} > {COLLAPSED_COSINE} (every entity gets "
           "nearly the same embedding)" for m, c in health["cosine"].items() if c > COLLAPSED_COSINE]
    out += [f"modality {m} has a negligible weight: {w:.4f} < {NEGLIGIBLE_WEIGHT}"
            for m, w in health["weight"].items() if w < NEGLIGIBLE_WEIGHT]
    return out


def pseudo_label_candidates(model: HUMEA, inputs: ModelInputs, data: MMKG, train_pairs: np.ndarray, cfg: Config,
                            factors: np.ndarray | None = None):
    """The mutual CSLS nearest neighbours among the entities that are in none of ``train_pairs``, (P, 2),
    with each one's CSLS margin over its runner-up (P,). ``factors`` (one per modality): the fused embeddings
    under the calibrated weights (layers.calibrated_weights) instead of the router's."""
    left, right = unaligned_entities(data, train_pairs)
    release_free_heap()
    emb = model.embed(np.concatenate([left, right]), inputs)
    fused = emb.fused if factors is None else calibrated_fusion([emb.unimodal[m] for m in model.modalities],
                                                                 emb.weights, factors)
    return mutual_nearest_pairs(fused[:len(left)], fused[len(left):], left, right, cfg.csls_k, cfg.eval_chunk,
                                with_margins=True)


def pseudo_label_step(model: HUMEA, inputs: ModelInputs, data: MMKG, train_pairs: np.ndarray, cfg: Config):
    """Iterative training: the candidates (pseudo_label_candidates) with a CSLS margin of at least
    --il_margin. Uses no label; the gold links are read only to report precision."""
    pairs, margins = pseudo_label_candidates(model, inputs, data, train_pairs, cfg)
    return with_margin(pairs, margins, cfg.il_margin)


def with_margin(pairs: np.ndarray, margins: np.ndarray, margin: float) -> np.ndarray:
    """The candidate pairs whose CSLS margin is at least ``margin`` (all of them for 0)."""
    return pairs[margins >= margin] if margin else pairs


# --il_precision: the margins it chooses among, and the fewest candidates an estimate may rest on.
MARGIN_GRID = tuple(round(0.01 * i, 2) for i in range(31))
MARGIN_MIN_PAIRS = 20


def margin_for_precision(pairs: np.ndarray, margins: np.ndarray, gold: np.ndarray, held: np.ndarray,
                         target: float, grid=MARGIN_GRID) -> tuple[float, float]:
    """The smallest margin of ``grid`` at which the candidates ``pairs`` (P, 2) that contain an entity of
    the held-out links ``held`` (H, 2) are links (``gold``, P bool) at a rate of at least ``target``,
    over at least MARGIN_MIN_PAIRS of them; and that estimate. The grid's largest margin and NaN if none
    reaches it.

    A candidate counts half for each of its sides that is held out. A right pair's two sides are one
    held-out link, so it counts 1 or 0; a wrong pair joins two links, each held out on its own, so it
    would count twice as often as a right one if either side counted it fully, and the estimate would
    read low. With halves both kinds count at the rate at which links are held out."""
    weight = 0.5 * np.isin(pairs[:, 0], held[:, 0]) + 0.5 * np.isin(pairs[:, 1], held[:, 1])
    for m in grid:
        w = weight * (margins >= m)
        if (w > 0).sum() < MARGIN_MIN_PAIRS:
            continue
        estimate = float((w * gold).sum() / w.sum())
        if estimate >= target:
            return float(m), estimate
    return float(grid[-1]), float("nan")


def rows_in(pairs: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each row of ``pairs``, whether it is also a row of ``reference`` (P,) bool."""
    ref = {(int(a), int(b)) for a, b in reference}
    return np.array([(int(a), int(b)) in ref for a, b in pairs], dtype=bool)


def pair_overlap(pairs: np.ndarray, reference: np.ndarray) -> int:
    """How many rows of ``pairs`` are also rows of ``reference``."""
    return int(rows_in(pairs, reference).sum())


# ---------------------------------------------------------------------------------------------
# The spike guard: a loss spike is rolled back, and the run goes on with a lower rate for the entity table.
# ---------------------------------------------------------------------------------------------

# Each rollback multiplies the rate again; after this many the guard only warns (a spike that comes back
# at 1/16 of the rate is not the instability that a lower rate cures).
GUARD_MAX_ROLLBACKS = 4


def entity_group_layout(opt: torch.optim.Optimizer, model: HUMEA, split: bool) -> None:
    """Arrange the AdamW groups as one group of every parameter, or (``split``) every other parameter and
    the entity table on its own, the layout --entity_lr starts with, so that the table can get a rate of
    its own. A parameter's AdamW state is keyed by the parameter and stays; a new table group starts with
    the settings (the rate included) of the group it leaves, so the next step is the same either way."""
    table = entity_table(model)
    if table is None or (len(opt.param_groups) == 2) == split:
        return
    settings = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    if split:
        opt.param_groups = [{**settings, "params": [p for p in model.parameters() if p is not table]},
                            {**settings, "params": [table]}]
    else:
        opt.param_groups = [{**settings, "params": list(model.parameters())}]


def slow_entity_table(s: Session, factor: float, rates: list[float] | None = None) -> str:
    """Multiply the entity table's learning rate by ``factor`` (its own AdamW group from now on); with the
    graph switched off, every group's. ``rates``: the rates to multiply (default: those in force). The
    remedy, in words, for the log."""
    rates = [g["lr"] for g in s.opt.param_groups] if rates is None else rates
    if entity_table(s.model) is not None:
        entity_group_layout(s.opt, s.model, split=True)
        s.opt.param_groups[-1]["lr"] = rates[-1] * factor  # the table's group is the last in either layout
        return f"entity table's learning rate at {rates[-1] * factor:.4g}"
    for group, lr in zip(s.opt.param_groups, rates):
        group["lr"] = lr * factor
    return f"learning rate at {', '.join(f'{lr * factor:.4g}' for lr in rates)} (no entity table: every parameter)"


class SpikeGuard:
    """--spike_guard: watch every epoch's training loss per pair; on a spike, go back to the last good
    state and go on with a lower rate for the entity table (docs/accuracy.md, "Late loss spikes": both
    traced spikes started in the table's hub rows, and half the table's rate from the epoch-550
    checkpoint removed each).

    The last good state is kept in memory at every evaluation and every saved checkpoint, after the
    check of that epoch. A spike is an epoch whose loss per pair is more than ``threshold`` times the
    lowest since then on the same pairs (``pair_version``: a pseudo-label step or the curriculum's
    regrouping starts a new reference). The rollback restores the parameters, both optimisers, the RNGs,
    the history and the pseudo pairs; the wall time and the list of rollbacks go on."""

    def __init__(self, threshold: float, lr_factor: float):
        self.threshold, self.lr_factor = threshold, lr_factor
        self.kept: dict | None = None
        self.reference: tuple[int, float] | None = None  # (pair_version, lowest loss per pair since kept)
        self.rise = 1.0  # the largest loss per pair over the reference since the last evaluation

    def mark(self, s: Session, version: int, per_pair: float) -> None:
        """A good state: the reference starts again from its epoch's loss. The reference travels in the
        checkpoint (state["guard_reference"]), so a resumed run watches exactly as the run would have."""
        self.reference, self.rise = (version, per_pair), 1.0
        s.state["guard_reference"] = [version, per_pair]

    def keep(self, s: Session, epoch: int) -> None:
        self.kept = copy.deepcopy(s.snapshot(epoch))
        self.load_reference(s)

    def load_reference(self, s: Session) -> None:
        """The reference of the state kept (or resumed), which the state carries."""
        reference = s.state.get("guard_reference")
        self.reference = (int(reference[0]), float(reference[1])) if reference else None

    def spike(self, epoch_loss: float, pairs: int, version: int) -> float | None:
        """The epoch's ratio to the reference when it is a spike, else None (and the reference moves)."""
        per_pair = epoch_loss / pairs
        if self.reference is None or self.reference[0] != version:
            self.reference = (version, per_pair)
            return None
        ratio = per_pair / self.reference[1]
        self.rise = max(self.rise, ratio)
        if ratio > self.threshold and self.kept is not None:
            return ratio
        self.reference = (version, min(self.reference[1], per_pair))
        return None

    def roll_back(self, s: Session, epoch: int, ratio: float) -> int:
        """Return to the kept state with the remedy applied; the epoch to continue after."""
        kept = self.kept
        rates = [g["lr"] for g in s.opt.param_groups]  # in force now (lowered by earlier rollbacks or brakes)
        entity_group_layout(s.opt, s.model, split=len(kept["opt"]["param_groups"]) == 2)
        restore(copy.deepcopy(kept), s.model, s.club, s.opt, s.q_opt, s.gen)  # kept stays as it was
        for key in ("history", "pseudo_pairs", "pseudo_steps", "curriculum", "best_model", "stopped",
                    "pair_version", "guard_reference", "peak_grad", "brake_window", "brake_version", "brake_rise"):
            s.state[key] = copy.deepcopy(kept.get(key))  # not "brakes": a brake since then stays in the rates
        remedy = slow_entity_table(s, self.lr_factor, rates)
        event = {"epoch": epoch, "loss_ratio": round(ratio, 4), "rolled_back_to": kept["epoch"], "remedy": remedy}
        s.state["guard"].append(event)
        s.log.warning(f"WARNING epoch {epoch}: the training loss per pair rose x{ratio:.2f} over its lowest since "
                      f"epoch {kept['epoch']} (> x{self.threshold}, --spike_guard): rolled back to epoch "
                      f"{kept['epoch']}, going on with the {remedy} (rollback {len(s.state['guard'])} of at most "
                      f"{GUARD_MAX_ROLLBACKS})")
        self.load_reference(s)  # as when kept: the state is the kept one again
        self.rise = 1.0
        return kept["epoch"]

    def exhausted(self, s: Session) -> bool:
        return len(s.state["guard"]) >= GUARD_MAX_ROLLBACKS


# The brake's memory of the table's gradient norm (epochs), the fewest it compares against, the epochs of
# growth in a row it needs, and the most times it acts in a run.
BRAKE_WINDOW, BRAKE_MIN_HISTORY, BRAKE_RISING, BRAKE_MAX = 50, 10, 3, 4


class TableBrake:
    """--table_brake: lower the entity table's rate when its gradient starts to run away, before the loss
    moves. In both traced spikes (docs/accuracy.md, "Late loss spikes") the table's gradient norm grew
    1.1-1.6 times per epoch for about ten epochs while the loss and the test metrics stayed put, and half
    the table's rate, given before that growth, turned it into a decaying alternation.

    An epoch brakes when the table's gradient norm has risen for BRAKE_RISING epochs in a row and is more
    than ``ratio`` times its median over the last BRAKE_WINDOW epochs: the table's rate is multiplied by
    ``factor`` from the next step on. Nothing is undone (the loss has not risen); the window starts
    again. A gradient that only alternates (up, down, up) never brakes, however large its swing. The
    window and the events travel in the state (checkpoints, rollbacks). A brake that never acts only
    reads the gradient: the run is bit for bit the run without it."""

    def __init__(self, ratio: float, factor: float):
        self.ratio, self.factor = ratio, factor

    def watch(self, s: Session, epoch: int, grad: float, version: int) -> None:
        state = s.state
        if state["brake_version"] != version:  # other pairs (pseudo-labels, curriculum): other gradients
            state["brake_window"], state["brake_version"] = [], version
        window = state["brake_window"]
        if len(window) >= BRAKE_MIN_HISTORY and len(state["brakes"]) < BRAKE_MAX:
            ratio = grad / max(float(np.median(window)), 1e-12)
            state["brake_rise"] = max(state["brake_rise"], ratio)
            recent = [*window[-BRAKE_RISING:], grad]
            rising = all(a < b for a, b in zip(recent, recent[1:]))
            if rising and ratio > self.ratio:
                remedy = slow_entity_table(s, self.factor)
                state["brakes"].append({"epoch": epoch, "grad_ratio": round(ratio, 4), "table_grad_norm":
                                        round(grad, 6), "remedy": remedy})
                s.log.warning(f"WARNING epoch {epoch}: the entity table's gradient norm rose for {BRAKE_RISING} "
                              f"epochs in a row to {grad:.4g}, x{ratio:.2f} its median over the last {len(window)} "
                              f"epochs (> x{self.ratio}, --table_brake): going on with the {remedy} (brake "
                              f"{len(state['brakes'])} of at most {BRAKE_MAX})")
                state["brake_window"] = []
                return
        window.append(grad)
        del window[:-BRAKE_WINDOW]


# ---------------------------------------------------------------------------------------------
# Progress a person can see.
# ---------------------------------------------------------------------------------------------

# Without a terminal: a line after the first epoch, then every PROGRESS_EVERY epochs or
# PROGRESS_SECONDS seconds, whichever comes first.
PROGRESS_EVERY, PROGRESS_SECONDS = 10, 60.0


class Progress:
    """The epoch, the loss, the seconds per epoch and the estimated time left: a tqdm bar when stderr is
    a terminal, else plain lines (a log file or a pipe shows them as they come)."""

    def __init__(self, start: int, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.start, self.total = start, total
        self.t0 = self.last_line = time.perf_counter()
        isatty = getattr(self.stream, "isatty", None)
        self.bar = (tqdm(total=total, initial=start, desc="train", unit="epoch", dynamic_ncols=True,
                         file=self.stream) if isatty and isatty() else None)

    def update(self, epoch: int, loss: float, hits1: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", hits1=f"{hits1:.3f}", refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if not (epoch == self.start + 1 or epoch % PROGRESS_EVERY == 0 or epoch == self.total
                or now - self.last_line >= PROGRESS_SECONDS):
            return
        self.last_line = now
        per_epoch = (now - self.t0) / (epoch - self.start)
        left = datetime.timedelta(seconds=round(per_epoch * (self.total - epoch)))
        line = kv(epoch=f"{epoch}/{self.total}", loss=loss, sec_per_epoch=per_epoch, eta=str(left), test_hits1=hits1)
        print(f"{time.strftime('%H:%M:%S')} progress {line}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Results: selection rules, the summary and the printed table.
# ---------------------------------------------------------------------------------------------


# The record key of each validation ranking (--valid_pool): its own candidates, or with the test entities.
VALID_KEYS = {"valid": "valid", "heldout": "valid_heldout"}


def best_of(history, key: str):
    rows = [h for h in history if h.get(key)]
    return max(rows, key=lambda h: (h[key]["avg"]["mrr"], -h["epoch"])) if rows else None


def stale_evaluations(history, key: str) -> int:
    """Evaluations with a validation score after the best-validation one (0 while the last is the best):
    --early_stop's count."""
    best = best_of(history, key)
    return sum(1 for h in history if h.get(key) and h["epoch"] > best["epoch"]) if best else 0


def summarise(history, cfg: Config, extra: dict) -> dict:
    last = history[-1]
    valid_key = VALID_KEYS[cfg.valid_pool]
    best_valid = best_of(history, valid_key)
    best_test = best_of(history, "test")
    pick = lambda h, keys: {k: h[k] for k in keys if k in h} if h else None
    keys = ("epoch", "test", *VALID_KEYS.values(), "calibrated")
    calibrated = [h for h in history if h.get("calibrated")]
    if calibrated:  # --calibrate_weights: the epoch whose fitted validation MRR is highest
        best = max(calibrated, key=lambda h: (h["calibrated"]["valid_mrr"], -h["epoch"]))
        extra = {**extra, "best_calibrated_valid_epoch": {"epoch": best["epoch"], **best["calibrated"]}}
    return {
        "last_epoch": pick(last, keys),
        "best_valid_epoch": {**pick(best_valid, keys), "selected_by": valid_key} if best_valid else None,
        "best_test_epoch": {**pick(best_test, ("epoch", "test")),
                            "note": "selected on the TEST set (highest test MRR): the rule behind the paper's "
                                    "Table 1 and the official logs; optimistic, shown for comparison only"},
        "selection_metric": "mrr (mean of both directions)",
        "config": cfg.to_dict(), **extra,
    }


def rounded(obj, digits: int = 6):
    """``obj`` with every float rounded to ``digits`` decimals, for reading (0.523, not 0.5229999999999999);
    metrics.jsonl keeps the full precision."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    return obj


def format_table(rows: dict) -> str:
    lines = [f"{'':28s} {'Hits@1':>7s} {'Hits@5':>7s} {'Hits@10':>7s} {'MRR':>7s} {'MR':>8s}"]
    for name, res in rows.items():
        if res is None:
            continue
        m = res["avg"]
        lines.append(f"{name:28s} {m['hits@1']:7.4f} {m['hits@5']:7.4f} {m['hits@10']:7.4f} {m['mrr']:7.4f} "
                     f"{m['mr']:8.1f}")
    return "\n".join(lines)


def format_results(results: dict) -> str:
    rows = {f"last epoch ({results['last_epoch']['epoch']})": results["last_epoch"]["test"]}
    if results["best_valid_epoch"]:
        rows[f"best valid epoch ({results['best_valid_epoch']['epoch']})"] = results["best_valid_epoch"]["test"]
    rows[f"best TEST epoch ({results['best_test_epoch']['epoch']})*"] = results["best_test_epoch"]["test"]
    if results["last_epoch"].get("calibrated"):
        rows[f"last epoch, calibrated ({results['last_epoch']['epoch']})"] = results["last_epoch"]["calibrated"]["test"]
        best = results["best_calibrated_valid_epoch"]
        rows[f"best calib. valid ({best['epoch']})"] = best["test"]
    for key in ("last_epoch", "best_valid_epoch"):
        if (results[key] or {}).get("calibrated_unlabelled"):
            rows[f"{key.split('_')[0]}, no-label calib. ({results[key]['epoch']})"] = \
                results[key]["calibrated_unlabelled"]["test"]
    return (format_table(rows) + "\n* chosen on the test set, the paper's rule: optimistic, for comparison only"
            + f"\n(test pairs: {results['pairs']['test']}, both directions averaged, "
            + ("CSLS" if results["config"]["csls"] else "cosine") + ")")


# ---------------------------------------------------------------------------------------------
# Main: set up or resume the run, the epoch loop, finish.
# ---------------------------------------------------------------------------------------------


@dataclass
class Session:
    """What the phases of one run share."""

    cfg: Config
    run: Path
    log: logging.Logger
    early: logging.handlers.BufferingHandler  # the lines logged before the run folder exists
    data_root: Path
    data: MMKG
    split: Split
    train_pairs: np.ndarray  # the seed pairs (all of them, --router_holdout's included)
    leak: dict  # --train_ill_path's overlap with the test pairs
    inputs: ModelInputs
    model: HUMEA
    club: CLUBDisentanglement | None
    opt: torch.optim.Optimizer
    q_opt: torch.optim.Optimizer | None
    gen: torch.Generator
    state: dict  # what the checkpoint carries besides the states: history, pseudo pairs, seconds, ...
    start: int  # epochs done before this session
    tic: float = 0.0  # the run clock: wall time since tic is not yet in state["seconds"]
    saved_epoch: int | None = None  # the epoch of the checkpoint on disk
    router_pairs: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    expert_pairs: np.ndarray | None = None  # the seed pairs the modalities train on: train_pairs less router_pairs

    def snapshot(self, epoch: int) -> dict:
        return snapshot(self.model, self.club, self.opt, self.q_opt, self.gen, epoch, self.state)

    def add_elapsed(self) -> None:
        """Add the wall time since ``tic`` to the run's seconds. The seconds travel in the checkpoint,
        so a resumed run counts the epochs it kept, not the ones lost to the kill."""
        now = time.perf_counter()
        self.state["seconds"] += now - self.tic
        self.tic = now


def set_up(cfg: Config, run: Path | None, ckpt: dict | None) -> Session:
    """Load and split the data, build the model, restore the checkpoint when resuming. Nothing is
    written yet: a run that fails on bad input creates no folder and touches no file."""
    data_root = dataset_dir(cfg)
    resuming = run is not None  # else a new run, from scratch or from a checkpoint (--branch_from, --il_from)
    if not resuming:
        run = run_folder(cfg, data_root)
        refuse_existing_run(run)  # before anything is written
    log = get_logger(None)
    early = logging.handlers.BufferingHandler(capacity=1 << 30)  # lines wait here until the folder exists
    log.addHandler(early)
    set_seed(cfg.seed)
    device = torch.device(cfg.device)
    data = load_dataset(data_root, cfg.switches.modalities_off, seed=cfg.seed, log=log,
                        min_coverage=cfg.min_feature_coverage)
    split = split_links(data.links, cfg.rate, cfg.seed, cfg.val_ratio)
    train_pairs, leak = training_pairs(cfg, data, split, log)
    log.info(kv(train=len(train_pairs), valid=len(split.valid), test=len(split.test), rate=cfg.rate))
    inputs = ModelInputs.from_data(data, device, cfg.feature_norm, cfg.missing)
    model, club, opt, q_opt = build_model(cfg, inputs, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    log.info(kv(modalities=",".join(model.modalities), disabled=",".join(cfg.switches.off) or "none",
                params=sum(p.numel() for p in model.parameters()), edges=inputs.graph.num_edges, device=device))
    state = {"history": [], "pseudo_pairs": np.zeros((0, 2), dtype=np.int64), "pseudo_steps": [],
             "config": cfg.to_dict(), "seconds": 0.0, "curriculum": None,
             "provenance": provenance(device, data_root),
             "best_model": None, "stopped": None,  # --early_stop: the best-validation weights, the stop epoch
             # which training pairs the loss is over (epoch_pairs); --spike_guard's rollbacks and reference
             "pair_version": 0, "guard": [], "guard_reference": None,
             "peak_grad": 0.0,  # the largest gradient norm since the last evaluation, carried by checkpoints
             # --table_brake: its events, the table's recent gradient norms (and on which pairs), and the
             # largest ratio to their median since the last evaluation
             "brakes": [], "brake_window": [], "brake_version": 0, "brake_rise": 0.0}
    start = 0
    if ckpt is not None:
        entity_group_layout(opt, model, split=len(ckpt["opt"]["param_groups"]) == 2)  # after a rollback: 2
        try:
            restore(ckpt, model, club, opt, q_opt, gen)
        except DataError as e:
            if resuming:
                raise
            raise DataError(f"--branch_from {cfg.branch_from}: the checkpoint's model does not fit the flags given "
                            f"(a flag that shapes the model differs from the checkpoint's): {e}") from None
        start = ckpt["epoch"]
        state.update(history=ckpt["history"], pseudo_pairs=ckpt["pseudo_pairs"], seconds=ckpt["seconds"],
                     pseudo_steps=ckpt.get("pseudo_steps", []), curriculum=ckpt.get("curriculum"),
                     best_model=ckpt.get("best_model"), stopped=ckpt.get("stopped"),
                     pair_version=ckpt.get("pair_version", 0), guard=ckpt.get("guard", []),
                     guard_reference=ckpt.get("guard_reference"), peak_grad=ckpt.get("peak_grad", 0.0),
                     **{k: ckpt[k] for k in ("brakes", "brake_window", "brake_version", "brake_rise") if k in ckpt})
        first = ckpt.get("provenance") or {}
        if resuming:
            state["provenance"].update(started=first.get("started"), resumed=[
                *first.get("resumed", []), {"epoch": start, "at": state["provenance"]["started"]}],
                **({"branched_from": first["branched_from"]} if "branched_from" in first else {}))
            log.info(kv(resumed_from=str(run), epoch=start, pseudo_pairs=len(state["pseudo_pairs"])))
        else:
            state["provenance"]["branched_from"] = {"checkpoint": cfg.branch_from, "epoch": start,
                                                    "commit": first.get("commit")}
            log.info(kv(branched_from=cfg.branch_from, epoch=start, pseudo_pairs=len(state["pseudo_pairs"])))
    router_pairs = router_holdout_pairs(train_pairs, cfg)
    if len(router_pairs):
        if not any(p.requires_grad for p in model.fusion.parameters()):
            raise DataError(f"--router_holdout {cfg.router_holdout}: this fusion has no parameters to train on the "
                            "held-out pairs (the HMoE is switched off)")
        log.info(kv(router_holdout=len(router_pairs), expert_pairs=len(train_pairs) - len(router_pairs)))
    return Session(cfg, run, log, early, data_root, data, split, train_pairs, leak, inputs, model, club, opt, q_opt,
                   gen, state, start, saved_epoch=start or None, router_pairs=router_pairs,
                   expert_pairs=train_pairs[~rows_in(train_pairs, router_pairs)] if len(router_pairs) else train_pairs)


def checkpoint_session(path: Path) -> Session:
    """The run of a checkpoint file as it stood at that epoch (its configuration, its data from the
    configuration's --file_dir, its weights), for the analysis scripts; nothing is written."""
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file (a run's checkpoint.pt, or a copy of one)")
    ckpt = read_checkpoint(path)
    return set_up(saved_config(ckpt["config"], str(path)), path.parent, ckpt)


def router_holdout_pairs(train_pairs: np.ndarray, cfg: Config) -> np.ndarray:
    """--router_holdout: the seed pairs on which only the router learns, a fixed random fraction drawn
    from the seed (its own stream: the split and the training draws do not change), at least 2 (a
    contrastive batch needs a negative); (0, 2) when off."""
    if not cfg.router_holdout:
        return np.zeros((0, 2), dtype=np.int64)
    n = max(2, round(cfg.router_holdout * len(train_pairs)))
    if n >= len(train_pairs) - 1:
        raise DataError(f"--router_holdout {cfg.router_holdout} of {len(train_pairs)} training pairs leaves too few "
                        "for the modalities")
    pick = np.random.default_rng([cfg.seed, 20261206]).permutation(len(train_pairs))[:n]
    return train_pairs[np.sort(pick)]


def open_run_folder(s: Session) -> None:
    """Create (or reopen) the run folder: log.txt, config.json with the provenance, and metrics.jsonl
    rewritten from the checkpoint's history (dropping lines written after it)."""
    s.run.mkdir(parents=True, exist_ok=True)
    s.log.removeHandler(s.early)
    s.log = open_run_log(s.run, s.early)
    remove_partial_writes(s.run)
    atomic_write_json(s.run / "config.json", {**s.cfg.to_dict(), "provenance": s.state["provenance"]})
    atomic_write(s.run / "metrics.jsonl", lambda f: f.writelines(json.dumps(h) + "\n" for h in s.state["history"]))


def checkpoint_record(s: Session, epoch: int, terms: dict, sample: np.ndarray, pair_samples: dict) -> None:
    """Evaluate (test, validation, modality health), append the record to the history and to
    metrics.jsonl, log it."""
    record = {"epoch": epoch, **{k: round(v, 6) for k, v in terms.items()}}
    record["test"], record["health"] = evaluate(s.model, s.inputs, s.split.test, s.cfg, health_ids=sample)
    record["health"]["hits1"] = modality_hits(s.model, s.inputs, pair_samples, s.cfg)
    if len(s.split.valid):
        record["valid"] = evaluate(s.model, s.inputs, s.split.valid, s.cfg)
        if s.cfg.calibrate_weights:  # one embedding of the validation and test entities serves both
            record["valid_heldout"], record["calibrated"] = calibrated_evaluation(s.model, s.inputs, s.split.valid,
                                                                                  s.split.test, s.cfg)
        else:
            record["valid_heldout"] = evaluate(s.model, s.inputs, s.split.valid, s.cfg, distractors=s.split.test)
    s.add_elapsed()
    record["seconds"] = round(s.state["seconds"], 2)
    spike = loss_spike_warning(s.state["history"][-1] if s.state["history"] else None, record)
    s.state["history"].append(record)
    key = VALID_KEYS[s.cfg.valid_pool]
    if s.cfg.early_stop and key in record and best_of(s.state["history"], key) is record:
        s.state["best_model"] = {k: v.detach().clone() for k, v in s.model.state_dict().items()}
    with open(s.run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    t = record["test"]["avg"]
    valid = {f"{k}_mrr": record[k]["avg"]["mrr"] for k in VALID_KEYS.values() if k in record}
    loss = {k: terms[k] for k in ("loss", "grad_norm_max") if k in terms}
    s.log.info(kv(epoch=epoch, **loss, test_hits1=t["hits@1"], test_hits10=t["hits@10"], test_mrr=t["mrr"], **valid))
    if "calibrated" in record:
        c = record["calibrated"]
        s.log.info(kv(calibrated_test_hits1=c["test"]["avg"]["hits@1"], calibrated_test_mrr=c["test"]["avg"]["mrr"],
                      factors=",".join(f"{m}={f:g}" for m, f in c["factors"].items())))
    h = record["health"]
    s.log.info("health " + " ".join(f"{m}:cos={h['cosine'][m]:.3f},w={h['weight'][m]:.3f}" for m in h["cosine"]))
    test, seeds = h["hits1"]["test"], h["hits1"]["train"]
    s.log.info(f"hits1 on {len(pair_samples['test'])} test / {len(pair_samples['train'])} training pairs " +
               " ".join(f"{m}={test[m]:.3f}/{seeds[m]:.3f}" for m in test))
    for warning in health_warnings(h) + ([spike] if spike else []):
        s.log.warning(f"WARNING epoch {epoch}: {warning}")


def epoch_pairs(s: Session, epoch: int) -> tuple[np.ndarray, bool]:
    """The pairs epoch ``epoch`` trains on and whether to shuffle them: the seed (and pseudo) pairs,
    or during the official curriculum (--curriculum) its neighbour groups, in order."""
    current = np.concatenate([s.expert_pairs, s.state["pseudo_pairs"]])
    if not (s.cfg.curriculum and epoch <= CURRICULUM_EPOCHS):
        if s.cfg.curriculum and epoch == CURRICULUM_EPOCHS + 1:
            s.state["pair_version"] += 1  # from the curriculum's groups back to the pairs themselves
        return current, True
    if (epoch - 1) % CURRICULUM_EVERY == 0 or s.state["curriculum"] is None:
        s.state["pair_version"] += 1
        k = CURRICULUM_K - (epoch - 1) // CURRICULUM_EVERY
        s.state["curriculum"] = curriculum_pairs(s.model, s.inputs, current, k, s.gen, s.cfg.eval_chunk)
        s.log.info(kv(epoch=epoch, curriculum_k=k, curriculum_pairs=len(s.state["curriculum"])))
    return s.state["curriculum"], False


def step_margin(s: Session, pairs: np.ndarray, margins: np.ndarray, epoch: int) -> float:
    """The CSLS margin a pseudo-label step keeps candidates at: --il_margin; with --il_precision, the one
    the first step chose on the validation links (margin_for_precision; the test links are not read),
    which its record keeps for the later steps."""
    if not s.cfg.il_precision:
        return s.cfg.il_margin
    if s.state["pseudo_steps"]:
        return s.state["pseudo_steps"][0]["margin"]
    valid = s.split.valid
    margin, estimate = margin_for_precision(pairs, margins, rows_in(pairs, valid), valid, s.cfg.il_precision)
    s.log.info(kv(epoch=epoch, il_margin_chosen=margin, valid_precision_estimate=estimate, valid_links=len(valid),
                  il_precision=s.cfg.il_precision))
    return margin


def last_factors(s: Session) -> np.ndarray:
    """--il_weights calibrated: the factors of the last evaluation's calibration (all ones before the first)."""
    fitted = next((h["calibrated"]["factors"] for h in reversed(s.state["history"]) if "calibrated" in h), {})
    return np.array([fitted.get(m, 1.0) for m in s.model.modalities])


def add_pseudo_labels(s: Session, epoch: int) -> None:
    """Iterative training's step (--il_select): new mutual nearest neighbours join the pseudo pairs, or
    the pseudo pairs are chosen anew among every entity outside the seed pairs, at the margin of
    step_margin (which reads the validation links with --il_precision). The other gold links are read
    only for the log's and results.json's precision."""
    old = s.state["pseudo_pairs"]
    outside = s.train_pairs if s.cfg.il_select == "reselect" else np.concatenate([s.train_pairs, old])
    factors = last_factors(s) if s.cfg.il_weights == "calibrated" else None
    pairs, margins = pseudo_label_candidates(s.model, s.inputs, s.data, outside, s.cfg, factors)
    margin = step_margin(s, pairs, margins, epoch)
    if s.cfg.il_select == "reselect":
        pseudo = with_margin(pairs, margins, margin)
        new = pseudo[~rows_in(pseudo, old)]
    else:
        new = with_margin(pairs, margins, margin)
        pseudo = np.concatenate([old, new])
    s.state["pseudo_pairs"] = pseudo
    s.state["pair_version"] += 1
    step = {"epoch": epoch, "new": len(new), "correct": pair_overlap(new, s.data.links),
            "dropped": len(old) - (len(pseudo) - len(new)), "total": len(pseudo),
            "total_correct": pair_overlap(pseudo, s.data.links), "margin": margin,
            **({"factors": dict(zip(s.model.modalities, factors.tolist()))} if factors is not None else {})}
    s.state["pseudo_steps"].append(step)  # for reports
    s.log.info(kv(epoch=epoch, pseudo_new=step["new"], pseudo_new_precision=step["correct"] / max(step["new"], 1),
                  pseudo_dropped=step["dropped"], pseudo_total=step["total"],
                  pseudo_precision=step["total_correct"] / max(step["total"], 1),
                  **({"pseudo_factors": "/".join(f"{x:g}" for x in factors)} if factors is not None else {})))


def epoch_loop(s: Session) -> None:
    """Train from epoch start + 1 to the last; evaluate, pseudo-label and checkpoint on the way."""
    cfg, state = s.cfg, s.state
    if state["stopped"]:  # stopped early before the kill: only the final files are missing
        return
    il_start = cfg.il_start if cfg.il_start >= 0 else cfg.epochs
    sample = health_sample(s.split.test, cfg.seed)
    pair_samples = {"test": health_pair_sample(s.split.test, cfg.seed),
                    "train": health_pair_sample(s.train_pairs, cfg.seed)}  # the seed pairs, not the pseudo-labels
    s.tic = time.perf_counter()
    if s.start == 0:  # epoch 0: the untrained model, and whether a modality is collapsed from the start
        checkpoint_record(s, 0, {}, sample, pair_samples)
        s.tic = time.perf_counter()
    progress = Progress(s.start, cfg.total_epochs)
    guard = SpikeGuard(cfg.spike_guard, cfg.spike_guard_lr) if cfg.spike_guard else None
    brake = TableBrake(cfg.table_brake, cfg.spike_guard_lr) if cfg.table_brake else None
    if guard:
        guard.keep(s, s.start)
    epoch = s.start  # epochs done
    while epoch < cfg.total_epochs:
        epoch += 1  # the number of this epoch, and of epochs done at its end
        current, shuffle = epoch_pairs(s, epoch)
        try:
            terms = train_epoch(s.model, s.club, s.inputs, current, cfg, s.gen, s.opt, s.q_opt, epoch, shuffle=shuffle,
                                router_pairs=s.router_pairs)
        except FloatingPointError as e:
            fault = numerical_fault(e, s.run, s.saved_epoch, cfg)
            s.log.error(f"stopping: {fault}")
            raise fault from None
        terms.update(train_pairs=len(current), pair_version=state["pair_version"])  # what the loss was summed over
        if guard and epoch >= cfg.spike_guard_from and not guard.exhausted(s):
            ratio = guard.spike(terms["loss"], len(current), state["pair_version"])
            if ratio is not None:
                epoch = guard.roll_back(s, epoch, ratio)
                continue
        if brake and epoch >= cfg.spike_guard_from and "table_grad_norm" in terms:
            brake.watch(s, epoch, terms["table_grad_norm"], state["pair_version"])
        if cfg.il and epoch > il_start and (epoch - il_start) % cfg.il_step == 0:
            add_pseudo_labels(s, epoch)
        state["peak_grad"] = max(state["peak_grad"], terms["grad_norm"])  # since the last evaluation
        evaluated = epoch % cfg.check_point == 0 or epoch == cfg.total_epochs
        if evaluated:
            extra = {"grad_norm_max": state["peak_grad"], **({"loss_rise_max": guard.rise} if guard else {}),
                     **({"table_grad_rise_max": state["brake_rise"]} if brake else {})}
            checkpoint_record(s, epoch, {**terms, **extra}, sample, pair_samples)
            state["peak_grad"] = state["brake_rise"] = 0.0
            key = VALID_KEYS[cfg.valid_pool]
            if cfg.early_stop and stale_evaluations(state["history"], key) >= cfg.early_stop:
                state["stopped"] = epoch
                s.log.info(kv(early_stop=epoch, best_valid_epoch=best_of(state["history"], key)["epoch"],
                              patience=cfg.early_stop, selected_by=key))
                break
        last_h1 = state["history"][-1]["test"]["avg"]["hits@1"] if state["history"] else float("nan")
        progress.update(epoch, terms["loss"], last_h1)
        saved = cfg.save_every and epoch % cfg.save_every == 0 and epoch < cfg.total_epochs
        good = guard and (evaluated or saved)
        if good:  # before the save, so that the checkpoint carries the reference
            guard.mark(s, terms["pair_version"], terms["loss"] / len(current))
        if saved:
            s.add_elapsed()
            atomic_torch_save(s.run / "checkpoint.pt", s.snapshot(epoch))
            s.saved_epoch = epoch
            if cfg.keep_checkpoints and epoch in {int(e) for e in cfg.keep_checkpoints.split(",")}:
                with open(s.run / "checkpoint.pt", "rb") as src:  # a copy of the file just written
                    atomic_write(s.run / f"checkpoint_e{epoch}.pt", lambda f: shutil.copyfileobj(src, f), mode="wb")
        if good:
            guard.keep(s, epoch)
    progress.close()
    s.add_elapsed()


def finish(s: Session) -> dict:
    """The final checkpoint, the outputs and, written last, results.json (its presence marks a
    finished run); prints the metrics table."""
    cfg, state = s.cfg, s.state
    done = state["stopped"] or cfg.total_epochs
    atomic_torch_save(s.run / "checkpoint.pt", s.snapshot(done))
    outputs_from = "last_epoch"
    if state["best_model"] is not None:  # --early_stop: the outputs are the best-validation model's
        s.model.load_state_dict(state["best_model"])
        outputs_from = "best_valid_epoch"
    final = write_outputs(s.run, s.model, s.inputs, s.data, s.split.test, cfg)
    if cfg.il:
        write_pair_file(s.run / "train_ill_final.tsv", np.concatenate([s.train_pairs, state["pseudo_pairs"]]))
    extra = {"dataset": str(s.data_root), "run_dir": str(s.run), "modalities": list(s.model.modalities),
             "pairs": {"train": len(s.train_pairs), "valid": len(s.split.valid), "test": len(s.split.test),
                       "pseudo": len(state["pseudo_pairs"]),
                       **({"router_holdout": len(s.router_pairs)} if len(s.router_pairs) else {})},
             **({"pseudo_steps": state["pseudo_steps"]} if cfg.il else {}),
             "spike_guard": {"threshold": cfg.spike_guard, "lr_factor": cfg.spike_guard_lr,
                             "rollbacks": state["guard"]},
             "table_brake": {"ratio": cfg.table_brake, "lr_factor": cfg.spike_guard_lr, "events": state["brakes"]},
             "train_seconds": round(state["seconds"], 2),
             "seconds_per_epoch": round(state["seconds"] / max(done, 1), 4),
             "data_notes": s.data.notes, **({"train_ill": s.leak} if s.leak else {})}
    if cfg.early_stop:
        extra["early_stop"] = {"patience": cfg.early_stop, "stopped_at_epoch": state["stopped"],
                               "outputs_from": outputs_from}
    results = summarise(state["history"], cfg, extra)
    results[outputs_from]["test_directions"] = {k: final[k] for k in ("l2r", "r2l")}
    if cfg.calibrate_unlabelled:  # the model of the outputs: the last epoch's, or the best-validation epoch's
        cal = results[outputs_from]["calibrated_unlabelled"] = unlabelled_calibration(
            s.model, s.inputs, s.data, s.train_pairs, s.split.test, cfg)
        s.log.info(kv(unlabelled_calibrated_test_hits1=cal["test"]["avg"]["hits@1"],
                      unlabelled_calibrated_test_mrr=cal["test"]["avg"]["mrr"], mutual_share=cal["mutual_share"],
                      mutual_share_learned=cal["mutual_share_learned"],
                      **{f"factor_{m}": f for m, f in cal["factors"].items()}))
    results["provenance"] = {**state["provenance"], "finished": _now()}
    print(format_results(results))
    results = {**rounded({k: v for k, v in results.items() if k != "config"}), "config": results["config"]}
    atomic_write_json(s.run / "results.json", results)  # written last: its presence marks a finished run
    s.log.info(f"run folder: {s.run}")
    return results


def add_unlabelled_calibration(run: Path, cfg: Config, ckpt: dict) -> dict:
    """--add_calibration: --calibrate_unlabelled's record for a run that finished without it, fitted at its
    final checkpoint and added to results.json's last epoch with when and by which commit it was added; every
    other entry stays as it was. Refused (nothing written) for an unfinished run, a run that has the record,
    or a checkpoint that is not the last epoch's."""
    path = run / "results.json"
    if not path.is_file():
        raise DataError(f"--add_calibration: {run} has no results.json; an unfinished run records the "
                        "calibration when it finishes")
    results = json.loads(path.read_text(encoding="utf-8"))
    last = results["last_epoch"]
    if last.get("calibrated_unlabelled"):
        raise DataError(f"--add_calibration: {path} already has last_epoch.calibrated_unlabelled; nothing was "
                        "changed")
    if ckpt["epoch"] != last["epoch"]:
        raise DataError(f"--add_calibration: {run}/checkpoint.pt is at epoch {ckpt['epoch']}, results.json's "
                        f"last epoch is {last['epoch']}; nothing was changed")
    s = set_up(dataclasses.replace(cfg, calibrate_unlabelled=True), run, ckpt)
    cal = unlabelled_calibration(s.model, s.inputs, s.data, s.train_pairs, s.split.test, s.cfg)
    last["calibrated_unlabelled"] = rounded(cal)
    results["calibrated_unlabelled_added"] = {"at": _now(), "git_commit": _git("rev-parse", "HEAD")}
    atomic_write_json(path, results)
    print(unlabelled_factors_line(cal))
    print(format_results(results))
    return results


def unlabelled_factors_line(cal: dict) -> str:
    """The factors --calibrate_unlabelled chose, and the share of mutual nearest neighbours under the router's
    weights and under the fitted ones, as one line."""
    return "factors without labels " + kv(**cal["factors"]) + " " + kv(
        mutual_share_learned=cal["mutual_share_learned"], mutual_share=cal["mutual_share"])


def branch_checkpoint(cfg: Config) -> dict:
    """--branch_from: the checkpoint a new run starts from (a run folder's checkpoint.pt, or a file)."""
    path = Path(cfg.branch_from)
    path = path / "checkpoint.pt" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"--branch_from {cfg.branch_from}: no checkpoint there (a run folder with checkpoint.pt, "
                        "or a checkpoint file)")
    ckpt = read_checkpoint(path)
    if ckpt["epoch"] >= cfg.total_epochs:
        raise DataError(f"--branch_from {cfg.branch_from}: the checkpoint has done {ckpt['epoch']} epochs, and "
                        f"this run is {cfg.total_epochs} epochs long: nothing would be trained")
    return ckpt


# What --il_from lets differ between the finished run and the iterative one: the iterative flags, and
# where and how the runs are written (nothing that changes the first --epochs epochs).
IL_FROM_FREE = ("il", "il_start", "il_epochs", "il_step", "il_select", "il_margin", "il_precision", "il_from",
                "branch_from", "run_name", "out_dir", *RESUME_FREE)


def il_from_checkpoint(cfg: Config) -> tuple[Config, dict]:
    """--il_from RUN: RUN's final checkpoint, and the configuration that branches from it; a DataError unless
    RUN finished exactly --epochs epochs with every flag but the iterative ones equal (a flag RUN predates
    counts as its default, as on --resume), so that the branch is the iterative run itself."""
    run = Path(cfg.il_from)
    if not cfg.il or cfg.branch_from:
        raise DataError(f"--il_from {run}: it starts iterative training from that run, so it needs --il and no "
                        "--branch_from")
    if cfg.il_start not in (-1, cfg.epochs):
        raise DataError(f"--il_from {run}: iterative training must start after --epochs (--il_start {cfg.il_start})")
    if not (run / "results.json").is_file():
        raise DataError(f"--il_from {run}: not a finished run (no results.json there); finish it first, or train "
                        "from scratch")
    ckpt = load_checkpoint(run)
    base = saved_config(ckpt["config"], f"--il_from {run}")
    differ = [f"--{f.name} {getattr(cfg, f.name)} (that run: {getattr(base, f.name)})"
              for f in dataclasses.fields(Config)
              if f.name not in IL_FROM_FREE and getattr(cfg, f.name) != getattr(base, f.name)]
    if differ:
        raise DataError(f"--il_from {run}: that run differs in {'; '.join(differ)}; its epochs would not be "
                        "this run's (train from scratch, or use --branch_from for a run that differs)")
    if ckpt["epoch"] != cfg.epochs or ckpt.get("stopped"):
        raise DataError(f"--il_from {run}: its checkpoint is at epoch {ckpt['epoch']}, not --epochs {cfg.epochs}")
    return dataclasses.replace(cfg, branch_from=str(run)), ckpt


def main(cfg: Config, eval_only: bool = False, extend_to: int = 0, add_calibration: bool = False) -> dict:
    """One run: set up or resume, the epoch loop, finish. With ``eval_only`` (and --resume): evaluate
    the checkpoint on the test pairs and write nothing. With ``extend_to`` (and --resume): train the
    run on to that many epochs. With ``add_calibration`` (and --resume of a finished run): add
    --calibrate_unlabelled's record to its results.json (add_unlabelled_calibration)."""
    cfg.validate()
    run = ckpt = None
    actions = [name for name, on in (("eval_only", eval_only), ("extend_to", extend_to),
                                     ("add_calibration", add_calibration)) if on]
    if len(actions) > 1:
        raise DataError(f"--{' and --'.join(actions)} exclude each other: give one action on the resumed run")
    if cfg.resume:
        run = Path(cfg.resume)
        ckpt = load_checkpoint(run)
        cfg = resumed_config(cfg, ckpt["config"])
        if extend_to:
            cfg = extended_config(cfg, run, ckpt["epoch"], extend_to, ckpt.get("stopped"))
        if (run / "results.json").is_file() and not (eval_only or add_calibration):
            return finished_run(run, get_logger(None))
    elif actions:
        raise DataError(f"--{actions[0]} needs --resume <run folder>: the run whose checkpoint to use")
    elif cfg.il_from:
        cfg, ckpt = il_from_checkpoint(cfg)
    elif cfg.branch_from:
        ckpt = branch_checkpoint(cfg)
    if add_calibration:
        return add_unlabelled_calibration(run, cfg, ckpt)
    s = set_up(cfg, run, ckpt)
    if eval_only:
        res = evaluate(s.model, s.inputs, s.split.test, cfg)
        rows = {f"test (checkpoint, epoch {s.start})": res}
        if cfg.calibrate_weights:  # with this version's search, whichever version wrote the run's records
            _, res["calibrated"] = calibrated_evaluation(s.model, s.inputs, s.split.valid, s.split.test, cfg)
            rows["test, calibrated"] = res["calibrated"]["test"]
            print("factors " + kv(**res["calibrated"]["factors"]))
        if cfg.calibrate_unlabelled:
            cal = res["calibrated_unlabelled"] = unlabelled_calibration(s.model, s.inputs, s.data, s.train_pairs,
                                                                        s.split.test, cfg)
            rows["test, no-label calibrated"] = cal["test"]
            print(unlabelled_factors_line(cal))
        print(format_table(rows))
        return res
    open_run_folder(s)
    if extend_to:
        s.log.info(kv(extended_from=s.start, extended_to=extend_to))
    epoch_loop(s)
    return finish(s)


def cli(argv=None) -> int:
    try:
        main(*parse_args(argv))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: numerical fault: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(cli())
