"""What several modules share: the modality table and the ablation switches, the run configuration,
seeding and logging, safe file writing, and the evaluation.

Axis letters: N entities, P aligned pairs, Q query entities, C candidates, L left entities.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import logging
import math
import os
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """Bad input (a file or a flag): the message names the file, the line and what was expected."""


# ---------------------------------------------------------------------------------------------
# Modalities and ablation switches.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Modality:
    """One row of MODALITY_TABLE. Adding a modality is adding a row (and its code to run.sh)."""

    name: str  # canonical name: flags, log lines, output files
    aliases: tuple[str, ...]  # other names --without accepts, the paper's symbol first (Table 2's "w/o v")
    source: str  # its input: a feature pickle in the dataset folder ("{folder}" = the folder's name), or
    #              "graph" (the GAT on the triples) or a builder of data_process.dataset (BUILDERS)
    without_code: int  # the official integer <without> code that run.sh translates to this name


# In the paper's order; every encoder, loss, log line and ablation follows it.
MODALITY_TABLE = (
    Modality("graph", ("g",), "graph", 2),
    Modality("image", ("v", "img"), "{folder}_id_img_feature_dict.pkl", 1),
    Modality("rel_bow", ("r_b",), "relation_bow", 3),
    Modality("rel_text", ("r_t",), "triples_feature_dict.pkl", 4),
    Modality("attr_bow", ("a_b",), "attribute_bow", 5),
    Modality("attr_text", ("a_t",), "attribute_feature_dict.pkl", 6),
)
MODALITIES = tuple(m.name for m in MODALITY_TABLE)
MODALITY_ALIASES = {a: m.name for m in MODALITY_TABLE for a in m.aliases}
# Switchable loss / architecture components (Table 2's last rows): name -> (run.sh's integer
# <without> code or None, what switching it off removes).
COMPONENTS = {"cl": (7, "the unimodal contrastive losses L_m^CL, Eq. 15"),
              "al": (8, "the unimodal distillation losses L_m^AL, Eq. 16"),
              "club": (None, "the expert disentanglement loss L_CLUB, Eq. 9"),
              "hmoe": (None, "the hierarchical MoE, replaced by one linear layer per modality (on the input "
                             "normalised as --moe_input_norm says) and uniform fusion")}


def parse_without(text: str) -> list[str]:
    """'image,cl' or 'v' -> canonical names; unknown names are an error listing the valid ones.
    The one parser of --without; the rest of the code reads ``Config.switches``."""
    names = []
    for raw in filter(None, (t.strip() for t in text.replace(" ", ",").split(","))):
        name = MODALITY_ALIASES.get(raw, raw)
        if name not in MODALITIES and name not in COMPONENTS:
            valid = ", ".join(MODALITIES + tuple(COMPONENTS) + tuple(MODALITY_ALIASES))
            raise DataError(f"--without: unknown component '{raw}'; valid names: {valid}")
        names.append(name)
    return names


@dataclass(frozen=True)
class Switches:
    """The ablations of --without, decided once (``Config.switches``); the loader, the model and the
    training loop read these, never the flag."""

    modalities_off: frozenset[str] = frozenset()
    use_cl: bool = True  # unimodal contrastive losses L_m^CL (Eq. 15)
    use_al: bool = True  # unimodal distillation losses L_m^AL (Eq. 16)
    use_club: bool = True  # expert disentanglement loss L_CLUB (Eq. 9)
    use_hmoe: bool = True  # intra-modal experts and the inter-modal router (Eq. 5-12)

    @classmethod
    def parse(cls, without: str) -> Switches:
        names = set(parse_without(without))
        return cls(frozenset(names & set(MODALITIES)), use_cl="cl" not in names, use_al="al" not in names,
                   use_club="club" not in names, use_hmoe="hmoe" not in names)

    @property
    def off(self) -> tuple[str, ...]:
        """Every name switched off, sorted (run folder names, log lines)."""
        components = [n for n, on in (("cl", self.use_cl), ("al", self.use_al), ("club", self.use_club),
                                      ("hmoe", self.use_hmoe)) if not on]
        return tuple(sorted([*self.modalities_off, *components]))


# ---------------------------------------------------------------------------------------------
# Configuration: one dataclass, the single source of flags, defaults and help texts.
# ---------------------------------------------------------------------------------------------


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16}  # --amp: autocast dtype of the experts and router
# --min_feature_coverage's default: the real datasets' feature files cover 84-100% of the entities
# (docs/data.md), the embedded default's 85-100%; a file covering under 1% is more likely broken than meant.
MIN_FEATURE_COVERAGE = 0.01


def _flag(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Config:
    file_dir: str = _flag("", "dataset folder in the standard layout; empty = the embedded synthetic default")
    rate: float = _flag(0.2, "fraction of the aligned pairs used as training seeds, in (0, 1)")
    val_ratio: float = _flag(0.0, "fraction of the training seeds held out for model selection "
                                  "(0 = the paper's protocol: no validation split)")
    train_ill_path: str = _flag("", "file of 'id1<TAB>id2' training pairs replacing the seed split's training "
                                    "pairs (e.g. pseudo-labels); the test pairs stay those of the split")
    min_feature_coverage: float = _flag(MIN_FEATURE_COVERAGE,
                                        "refuse a modality whose input (a feature pickle, training_attrs_1/2, "
                                        "the triples) covers less than this fraction of the entities, in [0, 1] "
                                        "(0 = accept any coverage); a modality without its file is switched off, "
                                        "not refused")
    valid_pool: str = _flag("valid", "candidates of the validation ranking that picks the best-validation epoch "
                                     "and drives --early_stop: 'valid' = the validation pairs' own entities (as "
                                     "the test protocol ranks the test pairs), 'heldout' = those plus every test "
                                     "entity as a distractor (no test link is read); both are recorded",
                            choices=("valid", "heldout"))
    calibrate_weights: bool = _flag(False, "at every evaluation, also fit one factor per modality on every "
                                           "entity's router weights to the validation links (their MRR, ranked "
                                           "among themselves and 1,000 test entities per side) and rank the "
                                           "test pairs under the "
                                           "calibrated weights; the training is unchanged (needs --val_ratio; "
                                           "docs/accuracy.md, 'Calibrating the weights on validation links')",
                                    boolean=True)
    calibrate_unlabelled: bool = _flag(True, "at the end of the run, also fit one factor per modality on every "
                                             "entity's router weights to the number of mutual CSLS nearest "
                                             "neighbours among the entities in no training pair (no link read: the "
                                             "candidates of iterative training) and rank the test pairs under those "
                                             "weights, recorded beside the router's; the training is unchanged "
                                             "(docs/accuracy.md, 'Calibrating the weights without labels')",
                                       boolean=True)
    seed: int = _flag(42, "random seed for the split, initialisation and training")
    epochs: int = _flag(1000, "training epochs (one optimiser step per epoch, as the official code)")
    check_point: int = _flag(10, "evaluate every this many epochs")
    early_stop: int = _flag(0, "with --val_ratio > 0: stop once the validation MRR has not improved for this "
                               "many evaluations, and write the outputs (embeddings, weights, predictions) "
                               "of the best-validation epoch's model (0 = off: all --epochs, the paper's "
                               "protocol)")
    hidden_units: str = _flag("300,300,300", "GAT sizes 'in,hidden,out' (all equal: the weight is diagonal); "
                                             "the last is the hidden size D of every network")
    heads: str = _flag("2,2", "attention heads per GAT layer, comma separated (one entry per layer)")
    lr: float = _flag(5e-4, "AdamW learning rate")
    weight_decay: float = _flag(0.01, "AdamW weight decay (torch's default, which the official code used)")
    entity_lr: float = _flag(0.0, "AdamW learning rate of the graph encoder's entity table e^g alone (0 = --lr). "
                                  "The late loss spike traced in docs/accuracy.md started in this table's rows "
                                  "of the hub entities; half the rate for the table alone removed it there")
    grad_clip: float = _flag(0.0, "rescale the model's gradient to at most this global L2 norm before each "
                                  "step (0 = no clipping, as the paper and the official code); the norm "
                                  "before clipping is logged as grad_norm either way")
    spike_guard: float = _flag(1.2, "roll back a loss spike: when an epoch's training loss per training pair is "
                                    "more than this many times its lowest since the last evaluation (on the same "
                                    "pairs), the run returns to its state at that evaluation and goes on with the "
                                    "entity table's learning rate times --spike_guard_lr (0 = off; "
                                    "docs/reliability.md, 'the loss spikes')")
    spike_guard_from: int = _flag(100, "the epoch from which --spike_guard watches (in the first epochs the loss "
                                       "per pair can rise by x1.1-x1.25 from one epoch to the next while the router "
                                       "and the experts settle, measured on the tests' small synthetic pair; the "
                                       "spikes seen came after epoch 500)")
    spike_guard_lr: float = _flag(0.5, "what each rollback of --spike_guard, and each brake of --table_brake, "
                                       "multiplies the learning rate of the entity table by (of every parameter "
                                       "when the graph is off), in (0, 1]")
    table_brake: float = _flag(2.0, "slow the entity table before a spike: from --spike_guard_from on, when the "
                                    "norm of the table's gradient has risen for 3 epochs in a row to more than "
                                    "this many times its median over the last 50 epochs, its learning rate is "
                                    "multiplied by --spike_guard_lr (0 = off; docs/accuracy.md, 'The table "
                                    "brake')")
    dropout: float = _flag(0.0, "dropout on the GAT layer inputs, in [0, 1)")
    attn_dropout: float = _flag(0.0, "dropout on the GAT attention coefficients, in [0, 1)")
    n_exp: int = _flag(5, "experts per modality K (Eq. 6)")
    fusion_weight_dim: int = _flag(0, "hidden width of the inter-modal router (Eq. 11); 0 = one linear layer")
    bsize: int = _flag(512, "seed pairs per loss batch (in-batch negatives, Eq. 13)")
    tau_cl: float = _flag(0.1, "temperature of the contrastive losses (Eq. 13)")
    tau_al: float = _flag(4.0, "temperature of the distillation distributions (Eq. 16)")
    cl_loss: float = _flag(1.0, "lambda_1: weight of the unimodal contrastive losses (Eq. 17)")
    al_loss: float = _flag(0.1, "lambda_2: weight of the unimodal distillation losses (Eq. 17)")
    mi_loss: float = _flag(1e-4, "weight of the CLUB loss (Eq. 17; the official code's 1e-4)")
    club_bsize: int = _flag(128, "entities in the batch on which L_CLUB (Eq. 9) is computed each epoch")
    q_lr: float = _flag(5e-4, "learning rate of the CLUB variational networks' own AdamW")
    without: str = _flag("", "comma-separated names to switch off: the modalities "
                              f"{', '.join(MODALITIES)} (or the paper's g, v, r_b, r_t, a_b, a_t), and the "
                              "components " + "; ".join(f"{c}: {what}" for c, (_, what) in COMPONENTS.items()))
    csls: bool = _flag(True, "rank with CSLS (--no-csls: plain cosine)", boolean=True)
    csls_k: int = _flag(3, "neighbourhood size k of CSLS")
    il: bool = _flag(False, "iterative training: add mutual nearest neighbours as pseudo pairs", boolean=True)
    il_start: int = _flag(-1, "epoch at which iterative training starts (-1 = after --epochs)")
    il_epochs: int = _flag(500, "extra epochs of iterative training after --epochs (the paper's +500)")
    il_step: int = _flag(10, "epochs between two pseudo-label updates")
    il_select: str = _flag("reselect", "what a pseudo-label update does: reselect (the pseudo pairs become the "
                                       "mutual nearest neighbours among every entity outside the seed pairs: a "
                                       "pair that is no longer mutual leaves) or accumulate (those among the "
                                       "entities in no pair yet join the pseudo pairs, which keep every pair once "
                                       "added; the precision of its additions falls step by step, "
                                       "docs/accuracy.md)", choices=("reselect", "accumulate"))
    il_margin: float = _flag(0.05, "keep a mutual nearest pair only if its CSLS score is at least this far "
                                   "above the runner-up's in both directions (CSLS units, 2 cos - r_l - r_r; 0 = "
                                   "every mutual pair; with 0.05, 9 pairs in 10 were right against 3 in 4 on "
                                   "FB15K-DB15K at rate 0.2, docs/accuracy.md)")
    il_precision: float = _flag(0.0, "choose the margin instead of --il_margin, at the first pseudo-label step: "
                                     "the smallest of 0, 0.01, ..., 0.3 at which the candidates that contain a "
                                     "validation entity are validation links at this rate (needs --val_ratio; "
                                     "the step's record keeps the margin, later steps reuse it; 0 = off; "
                                     "docs/accuracy.md, 'A validation split could choose it')")
    il_weights: str = _flag("router", "the modality weights behind iterative training's pseudo-labels: router (the "
                                      "learned weights) or calibrated (the router's times the factors that "
                                      "--calibrate_weights fitted at the last evaluation before the step; needs "
                                      "--calibrate_weights)", choices=("router", "calibrated"))
    device: str = _flag("cuda" if torch.cuda.is_available() else "cpu",
                        "torch device, e.g. cpu, cuda, cuda:1; the default is cuda on a machine with CUDA, else "
                        "cpu (on this machine: %(default)s)")
    out_dir: str = _flag("runs", "parent folder of the run folders")
    run_name: str = _flag("", "run folder name (default: <dataset>_r<rate>_s<seed>[_wo-...])")
    save_every: int = _flag(50, "write a resumable checkpoint every this many epochs (0 = only at the end)")
    keep_checkpoints: str = _flag("", "epochs whose checkpoint is also kept as checkpoint_e<epoch>.pt, comma "
                                      "separated, each a multiple of --save_every (e.g. the states before a "
                                      "spike, for docs/analysis/spike.py; about 200 MB each on FB15K-DB15K)")
    save_outputs: bool = _flag(True, "write entity_embeddings.npy, modality_weights.npy, expert_gates.npz and "
                                     "predictions.tsv at the end (--no-save_outputs: only config.json, log.txt, "
                                     "metrics.jsonl, checkpoint.pt and results.json, e.g. for sweeps)", boolean=True)
    resume: str = _flag("", "run folder to resume from its last checkpoint")
    branch_from: str = _flag("", "start a new run from another run's checkpoint (its folder, or a copy of a "
                                 "checkpoint.pt): its weights, optimiser and RNG states, epochs done and "
                                 "evaluations, trained on with the flags given here (those that shape the model "
                                 "must match), e.g. iterative training after the epoch-100 checkpoint of a run")
    il_from: str = _flag("", "start iterative training (--il) from a finished run with the same flags (its "
                             "folder): its final checkpoint stands for the first --epochs epochs, which are "
                             "the same computation, so only the iterative epochs are trained; refused if a flag "
                             "other than the iterative ones differs, or if that run did not train exactly "
                             "--epochs epochs")
    eval_chunk: int = _flag(4096, "query rows per block of the evaluation's cosine matrix; the matrix "
                                    "is kept whole up to 2^28 entries (1 GiB), larger ones use O(chunk x C)")
    amp: str = _flag("none", "mixed precision of the expert and router matmuls: none (float32) or bf16 "
                             "(autocast; the GAT, the losses and CSLS stay float32)", choices=tuple(AMP_DTYPES))
    # The method: the paper's choices by default; each of the official code's departures is one option
    # (docs/departures.md), and --preset official turns them all on (PRESETS).
    preset: str = _flag("paper", "paper: the paper's method (these defaults); official: every departure of "
                                 "the official code at once (--router global --expert linear --feature_norm "
                                 "official --missing fill --loss_weighting uncertainty --distill_direction "
                                 "joint_teacher --curriculum --club random_pair); flags given beside it win",
                        choices=("paper", "official"))
    expert: str = _flag("ffn", "intra-modal experts: ffn (Eq. 5, with a Graph-MoE) or linear (the official "
                               "code's (x - c_k) A_k experts with a noisy zero-initialised gate, no Graph-MoE)",
                        choices=("ffn", "linear"))
    graph_moe: bool = _flag(True, "FFN experts on the GAT output too (the paper's Graph-MoE); --no-graph_moe "
                                  "passes the GAT output straight to the fusion", boolean=True)
    graph_residual: bool = _flag(True, "the Graph-MoE adds its (normalised) input to the expert mixture: "
                                       "h' = h + sum_k g_k FFN_k(h), so it starts near the GAT output "
                                       "(--no-graph_residual: Eq. 6 as printed)", boolean=True)
    moe_input_norm: str = _flag("layernorm", "normalisation of each FFN MoE's input: layernorm (no affine; "
                                             "keeps small GAT outputs from being drowned by the expert "
                                             "biases, docs/accuracy.md) or none", choices=("layernorm", "none"))
    expert_dropout: float = _flag(0.5, "dropout on the hidden layer of every FFN expert (Eq. 5), in [0, 1): "
                                       "holds off their memorising the seed pairs (docs/accuracy.md)")
    router: str = _flag("entity", "inter-modal weights: entity (Eq. 11, a router per entity), global (the "
                                  "official code's one weight vector over 7 modality combinations, top 5) or "
                                  "modality (one learned weight per modality for every entity, the low-capacity "
                                  "router for --router_holdout)", choices=("entity", "global", "modality"))
    router_init: str = _flag("uniform", "initial per-entity router: uniform (last layer zero: every entity "
                                        "starts with weights 1/M, its bias is a global weight vector) or "
                                        "default (torch's init)", choices=("uniform", "default"))
    router_holdout: float = _flag(0.0, "fraction of the training pairs on which only the router learns: their "
                                       "fused loss reaches the router and nothing else, and the other pairs' "
                                       "fused loss reaches everything but the router, so that the router weighs "
                                       "modalities by how well they carry over to pairs they were not fitted on "
                                       "(0 = off, the paper: the router learns from every pair; docs/accuracy.md, "
                                       "'FB15K-YAGO15K'), in [0, 0.5)")
    router_tau: float = _flag(0.0, "temperature of the fused loss on --router_holdout's pairs, the one the router "
                                   "is fitted by (0 = --tau_cl). On FB15K-YAGO15K that loss at tau_cl 0.1 prefers "
                                   "weights that rank the same pairs worse than at 0.05 (docs/accuracy.md, "
                                   "'FB15K-YAGO15K')")
    router_balance: float = _flag(10.0, "weight beta of the router balance term beta * mean_e KL(w_e || uniform) "
                                        "over the epoch's training entities (0 = Eq. 17 as printed: no term)")
    router_balance_reach: str = _flag("all", "what the router balance term trains: all (the router and, through its "
                                             "input, every modality's experts and the entity table) or router (the "
                                             "router's own parameters only: the modality embeddings enter it "
                                             "detached; switched to in mid-run it broke the entity table within "
                                             "five epochs, docs/accuracy.md 'The table brake')",
                                      choices=("all", "router"))
    feature_norm: str = _flag("l2", "input feature rows: l2 (every text, image and bag-of-words row "
                                    "L2-normalised), official (text and image L2, bag-of-words raw counts / "
                                    "binary) or bow_l2 (bag-of-words L2, text and image raw)",
                              choices=("l2", "official", "bow_l2"))
    missing: str = _flag("mask", "modalities an entity lacks: mask (no part in its fused embedding, the "
                                 "router renormalises over the rest, its unimodal losses skip it) or fill "
                                 "(the official random fill / zero bag-of-words, used like real inputs)",
                         choices=("mask", "fill"))
    loss_weighting: str = _flag("sum", "combining the unimodal losses: sum (Eq. 17) or uncertainty (learned "
                                       "log-variances s: sum exp(-s) L + s, as the official code)",
                                choices=("sum", "uncertainty"))
    distill_direction: str = _flag("paper", "Eq. 16 teacher: paper (the unimodal distribution teaches the "
                                            "fused one) or joint_teacher (the detached fused distribution "
                                            "teaches each unimodal one, weighted by al_loss twice, as the "
                                            "official code)", choices=("paper", "joint_teacher"))
    curriculum: bool = _flag(False, "the official curriculum: in epochs 1-250, every 50 epochs, each training "
                                    "pair is followed by its k = 5 - epoch // 50 nearest other training pairs",
                             boolean=True)
    club: str = _flag("all_pairs", "CLUB expert pairs per modality per step: all_pairs (Eq. 9) or random_pair "
                                   "(one random ordered pair, as the official code)",
                      choices=("all_pairs", "random_pair"))


    @classmethod
    def from_preset(cls, preset: str = "paper", **overrides) -> Config:
        """The Config of a preset (PRESETS) with some fields replaced."""
        if preset not in PRESETS:
            raise DataError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        return cls(**{**PRESETS[preset], "preset": preset, **overrides})

    @property
    def hidden(self) -> int:
        return int(self.hidden_units.split(",")[-1])

    @functools.cached_property
    def switches(self) -> Switches:
        """--without, parsed once."""
        return Switches.parse(self.without)

    @property
    def total_epochs(self) -> int:
        return self.epochs + (self.il_epochs if self.il else 0)

    def to_dict(self) -> dict:
        """Every field: what config.json and the checkpoint record, and what ``Config(**d)`` rebuilds."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise DataError(f"--rate must be in (0, 1), got {self.rate}")
        if not 0.0 <= self.val_ratio < 1.0:
            raise DataError(f"--val_ratio must be in [0, 1), got {self.val_ratio}")
        dims = _positive_ints("hidden_units", self.hidden_units)
        if len(set(dims)) != 1 or len(dims) < 2:
            raise DataError("--hidden_units must be equal sizes 'D,D,...' (diagonal GAT weight), "
                            f"got {self.hidden_units}")
        heads = _positive_ints("heads", self.heads)
        if len(heads) != len(dims) - 1 or len(set(heads)) != 1:
            raise DataError(f"--heads needs one equal entry per GAT layer ({len(dims) - 1}), got {self.heads}")
        for name in ("epochs", "check_point", "n_exp", "bsize", "club_bsize", "csls_k", "il_step", "eval_chunk"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "il_epochs", "fusion_weight_dim", "router_balance", "grad_clip", "early_stop",
                     "spike_guard_from", "il_margin",
                     "entity_lr"):
            if getattr(self, name) < 0:
                raise DataError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints:
            keep = _positive_ints("keep_checkpoints", self.keep_checkpoints)
            if not self.save_every or any(e % self.save_every for e in keep):
                raise DataError(f"--keep_checkpoints {self.keep_checkpoints}: each epoch must be a multiple of "
                                f"--save_every ({self.save_every}), whose checkpoints they keep")
        if self.spike_guard and not 1.0 < self.spike_guard < math.inf:
            raise DataError(f"--spike_guard must be 0 (off) or a ratio above 1, got {self.spike_guard}")
        if self.table_brake and not 1.0 < self.table_brake < math.inf:
            raise DataError(f"--table_brake must be 0 (off) or a ratio above 1, got {self.table_brake}")
        if not 0.0 < self.spike_guard_lr <= 1.0:
            raise DataError(f"--spike_guard_lr must be in (0, 1], got {self.spike_guard_lr}")
        if not 0.0 <= self.router_holdout < 0.5:
            raise DataError(f"--router_holdout must be in [0, 0.5), got {self.router_holdout}")
        if self.router_tau < 0 or (self.router_tau and not self.router_holdout):
            raise DataError(f"--router_tau {self.router_tau}: a temperature >= 0 for the router's own pairs, which "
                            "only --router_holdout has")
        if self.early_stop and not self.val_ratio:
            raise DataError(f"--early_stop {self.early_stop} needs a validation split to watch: give --val_ratio > 0")
        if self.calibrate_weights and not self.val_ratio:
            raise DataError("--calibrate_weights fits the modality weights to the validation links: give "
                            "--val_ratio > 0")
        if self.il_weights == "calibrated" and not self.calibrate_weights:
            raise DataError("--il_weights calibrated labels with the factors --calibrate_weights fits: give "
                            "--calibrate_weights (and --val_ratio > 0)")
        if not 0.0 <= self.il_precision <= 1.0:
            raise DataError(f"--il_precision must be in [0, 1] (0 = off), got {self.il_precision}")
        if self.il_precision and not (self.il and self.val_ratio):
            raise DataError(f"--il_precision {self.il_precision} chooses iterative training's margin on the "
                            "validation links: it needs --il and --val_ratio > 0")
        if self.early_stop and self.il:
            raise DataError("--early_stop and --il exclude each other: iterative training starts after --epochs")
        for name in ("lr", "q_lr", "tau_cl", "tau_al"):
            if not 0.0 < getattr(self, name) < math.inf:
                raise DataError(f"--{name} must be a positive number, got {getattr(self, name)}")
        if not 0.0 <= self.min_feature_coverage <= 1.0:
            raise DataError(f"--min_feature_coverage must be in [0, 1], got {self.min_feature_coverage}")
        for name in ("dropout", "attn_dropout", "expert_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise DataError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise DataError(f"--device: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DataError(f"--device {self.device}: CUDA is not available on this machine (use --device cpu)")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise DataError(f"--{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        self.switches  # noqa: B018 - parses --without: an unknown name is an error here


# What each --preset sets; a flag given beside the preset wins. "paper" is the Config defaults.
PRESETS: dict[str, dict] = {
    "paper": {},
    "official": dict(expert="linear", graph_moe=False, graph_residual=False, moe_input_norm="none",
                     expert_dropout=0.0, router="global", router_balance=0.0,
                     feature_norm="official", missing="fill", loss_weighting="uncertainty",
                     distill_direction="joint_teacher", curriculum=True, club="random_pair"),
}


def _positive_ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise DataError(f"--{flag} must be comma-separated positive integers, got '{text}'")
    return values


# ---------------------------------------------------------------------------------------------
# Seeding and logging.
# ---------------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_logger(log_file: Path | None = None) -> logging.Logger:
    """The project's one logger: plain lines to stderr (tqdm-safe) and to the run's log file."""
    log = logging.getLogger("humea")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    stream = _TqdmHandler()
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def kv(**items) -> str:
    """key=value metric line; floats with 4 decimals."""
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())


# ---------------------------------------------------------------------------------------------
# Safe writing: a kill during a write never leaves a half-written file in place.
# ---------------------------------------------------------------------------------------------


def atomic_write(path: Path, write_fn, mode: str = "w") -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results should read like any other file
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False))


def atomic_torch_save(path: Path, obj) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), mode="wb")


# ---------------------------------------------------------------------------------------------
# Evaluation: one cosine matrix per call, computed in row blocks; rankings in cache-sized slices.
# ---------------------------------------------------------------------------------------------

@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None


def release_free_heap() -> bool:
    """Give the free pages of the C heap back to the operating system (glibc's malloc_trim).

    glibc keeps the memory of freed tensors for reuse: after a training epoch at FB15K-DB15K shape
    the process holds about 1.9 GiB more than its live tensors, and an evaluation would then add
    its own peak on top of that. Called before each evaluation (not after every epoch: giving the
    pages back and faulting them in again slows an epoch by ~20%). Returns False where there is
    no glibc (macOS, musl, Windows): a no-op there."""
    trim = _malloc_trim()
    return trim is not None and trim(0) >= 0


# The cosine matrix S (L x C) is computed in blocks of ``chunk`` rows and kept while it has at most
# this many entries (1 GiB of float32, e.g. 16k x 16k): both CSLS r terms, both directions' ranks
# and the predictions then read the one matrix, one matmul where a per-direction computation needs
# four (on FB15K-DB15K each is 10k x 10k x 1800, 0.37 TFLOP). A larger S is computed twice (r terms,
# then ranks) and memory stays O(chunk x C).
SIMILARITY_KEEP_ENTRIES = 2**28
# Rows per slice of the element-wise ranking work: a (256, 10k) float32 slice (10 MB) stays in the
# last-level cache between its subtract, sign and sum passes (~4x faster than 4096-row slices).
_SLICE_ROWS = 256


def _row_blocks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield slice(s, min(s + chunk, n))


class _CosineBlocks:
    """S = left @ right.T (L, C), iterated as (row slice, S[row slice]) in slices of _SLICE_ROWS
    rows; matmuls in blocks of ``chunk`` rows. A second iteration reads the kept blocks when S is
    at most SIMILARITY_KEEP_ENTRIES, else computes them again."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, chunk: int):
        self.left, self.right, self.chunk = left, right, chunk
        self.shape, self.device = (left.shape[0], right.shape[0]), left.device
        self.keep = left.shape[0] * right.shape[0] <= SIMILARITY_KEEP_ENTRIES
        self.kept: list | None = None

    def _blocks(self):
        if self.kept is not None:
            yield from self.kept
            return
        kept = []
        for b in _row_blocks(self.left.shape[0], self.chunk):
            block = (b, self.left[b] @ self.right.t())  # (chunk, C)
            if self.keep:
                kept.append(block)
            yield block
        if self.keep:
            self.kept = kept

    def slices(self):
        for b, s in self._blocks():
            for o in range(0, s.shape[0], _SLICE_ROWS):
                yield slice(b.start + o, b.start + min(o + _SLICE_ROWS, s.shape[0])), s[o:o + _SLICE_ROWS]


class _GivenSimilarity:
    """A similarity matrix S (L, C) computed by the caller, read in the slices of _CosineBlocks."""

    def __init__(self, sim: torch.Tensor):
        self.sim, self.shape, self.device = sim, tuple(sim.shape), sim.device

    def slices(self):
        for o in range(0, self.shape[0], _SLICE_ROWS):
            yield slice(o, min(o + _SLICE_ROWS, self.shape[0])), self.sim[o:o + _SLICE_ROWS]


def _pairs_by_row(rows: np.ndarray, device):
    """Pairs grouped by their query row: ``group(a, b)`` = indices of the pairs whose row is in [a, b)."""
    order = np.argsort(rows, kind="stable")
    sorted_rows, order_t = rows[order], torch.as_tensor(order, device=device)
    return lambda a, b: order_t[slice(*np.searchsorted(sorted_rows, [a, b]))]


@torch.no_grad()
def _csls_and_gold(sim: _CosineBlocks, lp, rp, group, k: int, use_csls: bool):
    """First pass over S: the CSLS r terms of both sides (mean of the k largest cosines of each row,
    and of each column, merged slice by slice) and the gold cosines S[lp, rp]."""
    n_left, n_right = sim.shape
    dev = sim.device
    r_left = torch.zeros(n_left, device=dev)
    top_right = None  # (<= k, C): the k largest cosines of each column so far
    gold = torch.empty(len(lp), device=dev)
    for rows, s in sim.slices():
        if use_csls:
            r_left[rows] = s.topk(min(k, n_right), dim=1).values.mean(1)
            top = s.topk(min(k, s.shape[0]), dim=0).values
            if top_right is not None:
                top = torch.cat([top_right, top]).topk(min(k, top_right.shape[0] + top.shape[0]), dim=0).values
            top_right = top
        p = group(rows.start, rows.stop)
        gold[p] = s[lp[p] - rows.start, rp[p]]
    r_right = top_right.mean(0) if use_csls else torch.zeros(n_right, device=dev)
    return r_left, r_right, gold



def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    r = ranks.double()
    return {"hits@1": float((r <= 1).double().mean()), "hits@5": float((r <= 5).double().mean()),
            "hits@10": float((r <= 10).double().mean()), "mrr": float((1.0 / r).mean()), "mr": float(r.mean())}


@torch.no_grad()
def evaluate_alignment(emb: torch.Tensor, pairs: np.ndarray, ids: np.ndarray | None = None, csls_k: int = 3,
                       use_csls: bool = True, chunk: int = 4096, with_predictions: bool = False,
                       extra_candidates: tuple[np.ndarray, np.ndarray] | None = None):
    """Alignment metrics of ``pairs`` from entity embeddings ``emb``: (N, D) indexed by entity id,
    or (R, D) whose rows are the sorted entity ids ``ids``.

    Candidates are the test entities only: each left entity of ``pairs`` is ranked against all
    distinct right entities of ``pairs`` (left-to-right), and vice versa (right-to-left).
    ``extra_candidates`` = (left ids, right ids) adds entities to the two candidate sets without
    ranking them as queries (e.g. the test entities as distractors for the validation pairs); they
    also enter the CSLS terms.
    Similarity is the cosine of L2-normalised embeddings, adjusted by CSLS with k = csls_k.
    Returns {"l2r": {...}, "r2l": {...}, "avg": {...}} with hits@1/5/10, mrr, mr; the
    headline numbers are "avg", the mean of the two directions. Each gold pair is ranked on
    its own: when an entity has two gold counterparts, the other one counts as a competitor.

    Both directions read one cosine matrix S (L, C) (see SIMILARITY_KEEP_ENTRIES). CSLS score
    2 S[i, j] - r_left[i] - r_right[j]: a query's own r term is the same for all its candidates, so
    left i ranks candidate j by S[i, j] - r_right[j] / 2 and right j ranks i by S[i, j] - r_left[i] / 2
    (halving is exact in floating point, so no order or tie changes). Ties count half: rank = 1 +
    #(candidates scoring higher) + #(other candidates scoring the same) / 2, the expected rank under
    random tie breaking (tests/reference.py holds a one-direction reference of the rule).
    """
    pairs = np.asarray(pairs)
    left_ids, right_ids = candidate_ids(pairs, extra_candidates)
    left_pos, right_pos = np.searchsorted(left_ids, pairs[:, 0]), np.searchsorted(right_ids, pairs[:, 1])
    dev = emb.device
    rows = (lambda e: e) if ids is None else (lambda e: np.searchsorted(ids, e))
    left = torch.nn.functional.normalize(emb[torch.as_tensor(rows(left_ids), device=dev)].float(), dim=-1)
    right = torch.nn.functional.normalize(emb[torch.as_tensor(rows(right_ids), device=dev)].float(), dim=-1)
    ranks, top1, top1_score = _rank_pairs(_CosineBlocks(left, right, chunk), left_pos, right_pos, csls_k, use_csls,
                                          with_predictions)
    result = _both_directions(ranks)
    if with_predictions:
        result["predictions"] = {"left": pairs[:, 0], "gold_right": pairs[:, 1],
                                 "pred_right": right_ids[top1.cpu().numpy()],
                                 "score": top1_score.cpu().numpy(), "rank": ranks["l2r"].cpu().numpy()}
    return result


def candidate_ids(pairs: np.ndarray, extra_candidates: tuple[np.ndarray, np.ndarray] | None = None):
    """The sorted left and right candidates of evaluate_alignment: the pairs' entities of each side and the
    ``extra_candidates`` (left ids, right ids)."""
    extra_left, extra_right = extra_candidates if extra_candidates is not None else ((), ())
    left_ids = np.unique(np.concatenate([pairs[:, 0], np.asarray(extra_left, dtype=pairs.dtype)]))
    right_ids = np.unique(np.concatenate([pairs[:, 1], np.asarray(extra_right, dtype=pairs.dtype)]))
    return left_ids, right_ids


@torch.no_grad()
def similarity_metrics(sim: torch.Tensor, left_pos: np.ndarray, right_pos: np.ndarray, csls_k: int = 3,
                       use_csls: bool = True) -> dict:
    """evaluate_alignment's metrics from a similarity matrix ``sim`` (L, C) the caller computed (the cosines
    of the L left and C right candidates): pair i is (row left_pos[i], column right_pos[i]). The same CSLS,
    ranking and tie rule; no predictions."""
    ranks, _, _ = _rank_pairs(_GivenSimilarity(sim), np.asarray(left_pos), np.asarray(right_pos), csls_k, use_csls,
                              False)
    return _both_directions(ranks)


def _both_directions(ranks: dict) -> dict:
    m1, m2 = rank_metrics(ranks["l2r"]), rank_metrics(ranks["r2l"])
    return {"l2r": m1, "r2l": m2, "avg": {k: (m1[k] + m2[k]) / 2 for k in m1}}


def _rank_pairs(sim, left_pos: np.ndarray, right_pos: np.ndarray, csls_k: int, use_csls: bool,
                with_predictions: bool):
    """The rank of each pair's gold in both directions ({"l2r", "r2l"}: (P,) float64) from the cosines
    ``sim`` (_CosineBlocks or _GivenSimilarity), and each pair's best column for its left entity and that
    column's CSLS score (filled only ``with_predictions``)."""
    dev = sim.device
    lp = torch.as_tensor(left_pos.reshape(-1), device=dev)  # (P,) row of each pair's left entity in S
    rp = torch.as_tensor(right_pos.reshape(-1), device=dev)  # (P,) column of its right entity
    group = _pairs_by_row(left_pos.reshape(-1), dev)
    r_left, r_right, gold = _csls_and_gold(sim, lp, rp, group, csls_k, use_csls)
    half_r_left, half_r_right = r_left / 2, r_right / 2
    gold_r2l = gold - half_r_left[lp]  # (P,) key of each pair's gold for its right entity
    n_pairs = len(lp)
    # Per pair, the sum over all candidates c of sign(key(c) - key(gold)): #higher - #lower (the gold
    # adds 0). With #higher + #lower + #ties = C - 1 the tie rule's rank 1 + #higher + #ties / 2 is
    # 1 + (C - 1 + sum) / 2: one subtract, sign and sum per slice instead of two compares and two
    # counts (~5x less time). x - y is 0 only when x == y, so the signs are exact; float32 sums of
    # +-1 are exact integers up to 2^24 candidates.
    signs = {d: torch.zeros(n_pairs, dtype=torch.float64, device=dev) for d in ("l2r", "r2l")}
    top1 = torch.empty(n_pairs, dtype=torch.long, device=dev)
    top1_score = torch.empty(n_pairs, device=dev)
    for sl, s in sim.slices():
        p = group(sl.start, sl.stop)  # the pairs whose left entity is a row of this slice
        local = lp[p] - sl.start
        if len(p):  # left-to-right: the pair's row of S, each candidate keyed by S - r_right / 2
            key = s.index_select(0, local) - half_r_right  # (P_s, C)
            if with_predictions:
                best, top1[p] = key.max(1)
                top1_score[p] = 2 * best - r_left[lp[p]]
            signs["l2r"][p] = key.sub_(key.gather(1, rp[p, None])).sign_().sum(1).double()
        # Right-to-left: column rp[p] of S for every pair; the rows of this slice add their signs.
        key = (s.index_select(1, rp) - half_r_left[sl, None]).sub_(gold_r2l)  # (rows, P)
        key[local, p] = 0.0  # the gold itself (0 already when S is kept; exact when recomputed)
        signs["r2l"] += key.sign_().sum(0).double()
    n_cand = {"l2r": sim.shape[1], "r2l": sim.shape[0]}
    return {d: 1 + (n_cand[d] - 1 + signs[d]) / 2 for d in signs}, top1, top1_score


@torch.no_grad()
def mutual_nearest_pairs(left_emb: torch.Tensor, right_emb: torch.Tensor, left_ids: np.ndarray,
                         right_ids: np.ndarray, csls_k: int = 3, chunk: int = 4096, with_margins: bool = False):
    """Pairs (l, r) such that r is l's best CSLS match among right_ids and l is r's best match
    among left_ids: the pseudo-labels of iterative training. left_emb / right_emb: (L, D) /
    (R, D) rows of left_ids / right_ids. Returns (P, 2) entity ids. One cosine matrix serves
    both r terms and both directions, as in evaluate_alignment.

    ``with_margins`` also returns each pair's margin (P,): how far its CSLS score (2 cos - r_l - r_r)
    is above the runner-up's, in the worse of the two directions (l's second-best right entity, r's
    second-best left entity); +inf where there is no runner-up."""
    if len(left_ids) == 0 or len(right_ids) == 0:
        empty = np.zeros((0, 2), dtype=np.int64)
        return (empty, np.zeros(0)) if with_margins else empty
    dev = left_emb.device
    left = torch.nn.functional.normalize(left_emb.float(), dim=-1)
    right = torch.nn.functional.normalize(right_emb.float(), dim=-1)
    sim = _CosineBlocks(left, right, chunk)
    none = torch.zeros(0, dtype=torch.long, device=dev)
    r_left, r_right, _ = _csls_and_gold(sim, none, none, lambda a, b: none, csls_k, True)
    half_r_left, half_r_right = r_left / 2, r_right / 2
    best_r = torch.empty(len(left_ids), dtype=torch.long, device=dev)
    best_l = torch.zeros(len(right_ids), dtype=torch.long, device=dev)
    best_l_key = torch.full((len(right_ids),), -torch.inf, device=dev)
    # Half a CSLS score, less a constant of the row (of the column): differences are half CSLS differences.
    row_gap = torch.full((len(left_ids),), torch.inf, device=dev)
    second_l_key = torch.full((len(right_ids),), -torch.inf, device=dev)
    for sl, s in sim.slices():
        row_key = s - half_r_right  # (rows, R)
        best_r[sl] = row_key.argmax(1)
        key, row = (s - half_r_left[sl, None]).max(0)  # (R,): best left row of this slice per column
        if with_margins:
            if row_key.shape[1] > 1:
                top = row_key.topk(2, dim=1).values
                row_gap[sl] = top[:, 0] - top[:, 1]
            col_key = s - half_r_left[sl, None]
            runner = col_key.topk(2, dim=0).values[1] if col_key.shape[0] > 1 else torch.full_like(key, -torch.inf)
            # The two best of {best so far, second so far, this slice's best, its runner-up}.
            second_l_key = torch.maximum(torch.minimum(best_l_key, key), torch.maximum(second_l_key, runner))
        better = key > best_l_key  # strict: the first best row wins, as argmax does
        best_l_key = torch.where(better, key, best_l_key)
        best_l = torch.where(better, row + sl.start, best_l)
    li = torch.arange(len(left_ids), device=dev)
    mutual = best_l[best_r] == li
    pairs = np.stack([left_ids[li[mutual].cpu().numpy()], right_ids[best_r[mutual].cpu().numpy()]], 1)
    if not with_margins:
        return pairs
    cols = best_r[mutual]
    margins = 2 * torch.minimum(row_gap[mutual], best_l_key[cols] - second_l_key[cols])
    return pairs, margins.cpu().numpy()


def mutual_share(left_emb: torch.Tensor, right_emb: torch.Tensor, left_ids: np.ndarray, right_ids: np.ndarray,
                 csls_k: int = 3, chunk: int = 4096) -> float:
    """The criterion of --calibrate_unlabelled: the number of mutual CSLS nearest neighbours between
    left_ids and right_ids (mutual_nearest_pairs) over the smaller side's size, the most there can be."""
    pairs = mutual_nearest_pairs(left_emb, right_emb, left_ids, right_ids, csls_k, chunk)
    return len(pairs) / min(len(left_ids), len(right_ids))
