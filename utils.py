"""Configuration, data loading, evaluation, seeding, logging and safe file writing.

Axis letters: N entities, P aligned pairs, F feature size, Q query entities, C candidates.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# The six modalities, in the paper's order; every encoder, loss, log line and ablation follows it.
MODALITIES = ("graph", "image", "rel_bow", "rel_text", "attr_bow", "attr_text")
# The paper's symbols (Table 2: w/o g, v, r_b, r_t, a_b, a_t) are accepted as aliases.
MODALITY_ALIASES = {"g": "graph", "v": "image", "r_b": "rel_bow", "r_t": "rel_text",
                    "a_b": "attr_bow", "a_t": "attr_text", "img": "image"}
# Switchable loss / architecture components (Table 2's last rows).
COMPONENTS = ("cl", "al", "club", "hmoe")
COMPONENT_HELP = {"cl": "unimodal contrastive losses L_m^CL (Eq. 15)",
                  "al": "unimodal distillation losses L_m^AL (Eq. 16)",
                  "club": "expert disentanglement loss L_CLUB (Eq. 9)",
                  "hmoe": "hierarchical MoE (one linear layer per modality, uniform fusion)"}
BOW_TOP = 1000  # bag-of-words vocabulary size (relations and attribute names), as in the paper


class DataError(ValueError):
    """Bad input: the message names the file, the line and what was expected."""


# ---------------------------------------------------------------------------------------------
# Configuration: one dataclass, the single source of flags, defaults and help texts.
# ---------------------------------------------------------------------------------------------


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16}  # --amp: autocast dtype of the experts and router


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
    seed: int = _flag(42, "random seed for the split, initialisation and training")
    epochs: int = _flag(1000, "training epochs (one optimiser step per epoch, as the official code)")
    check_point: int = _flag(10, "evaluate every this many epochs")
    hidden_units: str = _flag("300,300,300", "GAT sizes 'in,hidden,out' (all equal: the weight is diagonal); "
                                             "the last is the hidden size D of every network")
    heads: str = _flag("2,2", "attention heads per GAT layer, comma separated (one entry per layer)")
    lr: float = _flag(5e-4, "AdamW learning rate")
    weight_decay: float = _flag(0.01, "AdamW weight decay (torch's default, which the official code used)")
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
    without: str = _flag("", "comma-separated components to switch off: modalities "
                              f"{', '.join(MODALITIES)} (or g, v, r_b, r_t, a_b, a_t) and {', '.join(COMPONENTS)}")
    csls: bool = _flag(True, "rank with CSLS (--no-csls: plain cosine)", boolean=True)
    csls_k: int = _flag(3, "neighbourhood size k of CSLS")
    il: bool = _flag(False, "iterative training: add mutual nearest neighbours as pseudo pairs", boolean=True)
    il_start: int = _flag(-1, "epoch at which iterative training starts (-1 = after --epochs)")
    il_epochs: int = _flag(500, "extra epochs of iterative training after --epochs (the paper's +500)")
    il_step: int = _flag(10, "epochs between two pseudo-label updates")
    device: str = _flag("cuda" if torch.cuda.is_available() else "cpu", "torch device (default: cuda when present)")
    out_dir: str = _flag("runs", "parent folder of the run folders")
    run_name: str = _flag("", "run folder name (default: <dataset>_r<rate>_s<seed>[_wo-...])")
    save_every: int = _flag(50, "write a resumable checkpoint every this many epochs (0 = only at the end)")
    resume: str = _flag("", "run folder to resume from its last checkpoint")
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
    expert_dropout: float = _flag(0.0, "dropout on the hidden layer of every FFN expert (Eq. 5), in [0, 1)")
    router: str = _flag("entity", "inter-modal weights: entity (Eq. 11, a router per entity) or global (the "
                                  "official code's one weight vector over 7 modality combinations, top 5)",
                        choices=("entity", "global"))
    router_init: str = _flag("uniform", "initial per-entity router: uniform (last layer zero: every entity "
                                        "starts with weights 1/M, its bias is a global weight vector) or "
                                        "default (torch's init)", choices=("uniform", "default"))
    router_balance: float = _flag(10.0, "weight beta of the router balance term beta * mean_e KL(w_e || uniform) "
                                        "over the epoch's training entities (0 = Eq. 17 as printed: no term)")
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

    @property
    def disabled(self) -> set[str]:
        return set(parse_without(self.without))

    @property
    def total_epochs(self) -> int:
        return self.epochs + (self.il_epochs if self.il else 0)

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
        for name in ("save_every", "il_epochs", "fusion_weight_dim", "router_balance"):
            if getattr(self, name) < 0:
                raise DataError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "q_lr", "tau_cl", "tau_al"):
            if not 0.0 < getattr(self, name) < math.inf:
                raise DataError(f"--{name} must be a positive number, got {getattr(self, name)}")
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
        parse_without(self.without)


# What each --preset sets; a flag given beside the preset wins. "paper" is the Config defaults.
PRESETS: dict[str, dict] = {
    "paper": {},
    "official": dict(expert="linear", graph_moe=False, graph_residual=False, moe_input_norm="none",
                     router="global", router_balance=0.0,
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


def parse_without(text: str) -> list[str]:
    """'image,cl' or 'v' -> canonical names; unknown names are an error listing the valid ones."""
    names = []
    for raw in filter(None, (t.strip() for t in text.replace(" ", ",").split(","))):
        name = MODALITY_ALIASES.get(raw, raw)
        if name not in MODALITIES and name not in COMPONENTS:
            valid = ", ".join(MODALITIES + COMPONENTS + tuple(MODALITY_ALIASES))
            raise DataError(f"--without: unknown component '{raw}'; valid names: {valid}")
        names.append(name)
    return names


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


def config_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# Data: the standard MMEA folder layout (MCLEA / MEAformer / official HUMEA data).
# ---------------------------------------------------------------------------------------------


@dataclass
class MMKG:
    """Two KGs in one id space, their gold links and per-entity modality inputs."""

    root: Path
    names: list[str]  # (N,) entity name by id
    kg: np.ndarray  # (N,) 0 = KG1 (left), 1 = KG2 (right)
    links: np.ndarray  # (P, 2) gold aligned pairs (KG1 id, KG2 id)
    triples: np.ndarray  # (T, 3) h, r, t over both KGs
    features: dict[str, np.ndarray]  # modality -> (N, F) float32, for the modalities with inputs (rows as
    #                                  read: bag-of-words counts / indicators, text and image vectors raw)
    coverage: dict[str, float]  # modality -> fraction of entities with a real vector
    present: dict[str, np.ndarray]  # modality -> (N,) bool: the entity has a real input (not a fill)
    notes: list[str]  # what the loader decided (disabled modalities, fills), for the log

    @property
    def num_entities(self) -> int:
        return len(self.names)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: required file is missing")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{path}: file is empty; expected at least one line")
    return lines


def _int(path: Path, lineno: int, token: str, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise DataError(f"{path} line {lineno}: expected an integer {what}, got '{token}'") from None


def _read_int_table(path: Path, columns: int, form: str) -> np.ndarray:
    """A tab-separated table of integers; fast path first, exact diagnosis on failure."""
    lines = _read_lines(path)
    rows = [line.split("\t") for line in lines]
    if all(len(r) == columns for r in rows):
        try:
            return np.array(rows, dtype=np.int64).reshape(-1, columns)
        except (ValueError, OverflowError):
            pass
    values = []
    for lineno, row in enumerate(rows, 1):
        if len(row) != columns:
            raise DataError(f"{path} line {lineno}: expected '{form}' ({columns} tab-separated fields), "
                            f"got {len(row)} field(s): {lines[lineno - 1][:80]!r}")
        ints = [_int(path, lineno, tok.strip(), "id") for tok in row]
        for v in ints:
            if not -(2**63) <= v < 2**63:
                raise DataError(f"{path} line {lineno}: id {v} is out of range (too large for a 64-bit integer)")
        values.append(ints)
    return np.array(values, dtype=np.int64).reshape(-1, columns)


def _read_ent_ids(path: Path) -> tuple[list[int], list[str]]:
    ids, names = [], []
    for lineno, line in enumerate(_read_lines(path), 1):
        parts = line.split("\t", 1)
        if len(parts) != 2 or not parts[1]:
            raise DataError(f"{path} line {lineno}: expected 'id<TAB>name', got {line[:80]!r}")
        ids.append(_int(path, lineno, parts[0], "entity id"))
        names.append(parts[1])
    return ids, names


def _check_ids(path: Path, array: np.ndarray, allowed: np.ndarray, cols, kg_name: str, num: int):
    """Every id in the given columns must be in range and an entity of the allowed KG."""
    for c in cols:
        col = array[:, c]
        bad = np.nonzero((col < 0) | (col >= num))[0]
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{path} line {i + 1}: id {col[i]} is out of range (entity ids are 0..{num - 1})")
        bad = np.nonzero(~allowed[col])[0]
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{path} line {i + 1}: id {col[i]} is not an entity of {kg_name}")


def load_dataset(file_dir: str | Path, disabled: set[str] = frozenset(), seed: int = 0,
                 log: logging.Logger | None = None) -> MMKG:
    """Load the standard layout in ``file_dir``.

    Required: ent_ids_1, ent_ids_2 (id TAB name), ill_ent_ids (id TAB id), triples_1,
    triples_2 (h TAB r TAB t). Optional: training_attrs_1/2 (name TAB attr TAB attr ...),
    <DATASET>_id_img_feature_dict.pkl, triples_feature_dict.pkl (relation text),
    attribute_feature_dict.pkl (attribute text). A modality without its input is disabled.
    """
    root = Path(file_dir)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist (expected ent_ids_1, ent_ids_2, ill_ent_ids, "
                        "triples_1, triples_2 inside)")
    notes: list[str] = []
    ids1, names1 = _read_ent_ids(root / "ent_ids_1")
    ids2, names2 = _read_ent_ids(root / "ent_ids_2")
    n = len(ids1) + len(ids2)
    names: list[str | None] = [None] * n
    kg = np.full(n, -1, dtype=np.int8)
    seen: dict[int, str] = {}
    for fname, ids, nms, side in (("ent_ids_1", ids1, names1, 0), ("ent_ids_2", ids2, names2, 1)):
        for lineno, (i, name) in enumerate(zip(ids, nms), 1):
            where = f"{root / fname} line {lineno}"
            if i in seen:
                raise DataError(f"{where}: duplicated entity id {i} (first defined at {seen[i]})")
            if not 0 <= i < n:
                raise DataError(f"{where}: id {i} is out of range; the ids of ent_ids_1 and ent_ids_2 together "
                                f"must be 0..{n - 1}")
            seen[i] = where
            names[i], kg[i] = name, side
    links = _read_int_table(root / "ill_ent_ids", 2, "id1<TAB>id2")
    _check_ids(root / "ill_ent_ids", links, kg == 0, [0], "KG1 (ent_ids_1)", n)
    _check_ids(root / "ill_ent_ids", links, kg == 1, [1], "KG2 (ent_ids_2)", n)
    triples = []
    for fname, side in (("triples_1", 0), ("triples_2", 1)):
        t = _read_int_table(root / fname, 3, "head<TAB>relation<TAB>tail")
        _check_ids(root / fname, t, kg == side, [0, 2], f"KG{side + 1} (ent_ids_{side + 1})", n)
        triples.append(t)
    triples = np.concatenate(triples)

    features: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    if "rel_bow" not in disabled:
        features["rel_bow"] = relation_bow(triples, n)
        present["rel_bow"] = features["rel_bow"].any(1)
    if "attr_bow" not in disabled:
        attrs = _read_attrs(root, names, kg)
        if attrs is None:
            notes.append("attr_bow: no training_attrs_1/2 files -> modality disabled")
        else:
            features["attr_bow"] = attribute_bow(attrs, n)
            present["attr_bow"] = features["attr_bow"].any(1)
    for modality, fname in (("image", _image_file(root)), ("rel_text", "triples_feature_dict.pkl"),
                            ("attr_text", "attribute_feature_dict.pkl")):
        if modality in disabled:
            continue
        path = root / fname if fname else None
        if path is None or not path.is_file():
            notes.append(f"{modality}: no {fname or '*_id_img_feature_dict.pkl'} in {root} -> modality disabled")
            continue
        mat, has = _read_feature_pickle(path, n, rng)
        if mat is None:
            notes.append(f"{modality}: {path.name} holds no vectors -> modality disabled")
            continue
        features[modality], present[modality] = mat, has
        if not has.all():
            notes.append(f"{modality}: {path.name} covers {has.mean():.1%} of entities; the rest drawn from the "
                         "per-dimension mean/std of the present vectors (seeded, as the official code did; "
                         "used only with --missing fill)")
    coverage = {m: float(p.mean()) for m, p in present.items()}
    data = MMKG(root, names, kg.astype(np.int64), links, triples, features, coverage, present, notes)
    if log:
        log.info(kv(dataset=str(root), entities=n, kg1=int((kg == 0).sum()), kg2=int((kg == 1).sum()),
                    links=len(links), triples=len(triples)))
        for note in notes:
            log.info(note)
        for m in MODALITIES[1:]:
            if m in features:
                log.info(kv(modality=m, dim=features[m].shape[1], coverage=coverage[m]))
    return data


def _image_file(root: Path) -> str | None:
    preferred = root / f"{root.name}_id_img_feature_dict.pkl"
    if preferred.is_file():
        return preferred.name
    found = sorted(root.glob("*_id_img_feature_dict.pkl"))
    return found[0].name if found else None


def _read_feature_pickle(path: Path, n: int, rng: np.random.Generator):
    """dict id -> vector  ->  (N, F) float32 matrix with the missing rows filled, and the (N,) mask of
    the entities that have a vector."""
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)  # the official data format; only load pickles you trust
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a data error here
        raise DataError(f"{path}: cannot unpickle ({type(e).__name__}: {e}); "
                        "expected a dict entity id -> vector") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict entity id -> vector, got {type(obj).__name__}")
    if not obj:
        return None, None
    dim = None
    mat = None
    present = np.zeros(n, dtype=bool)
    for key, vec in obj.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise DataError(f"{path}: key {key!r} is not an integer entity id") from None
        if not 0 <= i < n:
            raise DataError(f"{path}: key {i} is out of range (entity ids are 0..{n - 1})")
        try:
            v = np.asarray(vec, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"{path}: the value of entity {i} is not a numeric vector "
                            f"({type(vec).__name__})") from None
        if v.size == 0 or not np.isfinite(v).all():
            raise DataError(f"{path}: the vector of entity {i} is empty or holds NaN/inf values")
        if present[i]:
            raise DataError(f"{path}: entity {i} appears under two keys (e.g. {i} and '{i}')")
        if dim is None:
            dim = v.size
            mat = np.empty((n, dim), dtype=np.float32)
        elif v.size != dim:
            raise DataError(f"{path}: the vector of entity {i} has size {v.size}, expected {dim} "
                            "(the size of the first vector)")
        mat[i] = v
        present[i] = True
    missing = ~present
    if missing.any():
        mean, std = mat[present].mean(0), mat[present].std(0)
        mat[missing] = rng.normal(mean, std, size=(int(missing.sum()), dim)).astype(np.float32)
    return mat, present


def _read_attrs(root: Path, names: list[str], kg: np.ndarray):
    """training_attrs_1/2 -> list of (entity id, [attribute names]); None if both files absent."""
    files = [root / "training_attrs_1", root / "training_attrs_2"]
    if not any(p.is_file() for p in files):
        return None
    index = [{} for _ in range(2)]
    for i, name in enumerate(names):
        index[kg[i]][name] = i
    out = []
    for side, path in enumerate(files):
        if not path.is_file():
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split("\t")
            if len(parts) < 1 or not parts[0]:
                raise DataError(f"{path} line {lineno}: expected 'entity name<TAB>attr<TAB>attr...', got {line[:80]!r}")
            ent = index[side].get(parts[0])
            if ent is None:
                raise DataError(f"{path} line {lineno}: entity '{parts[0][:80]}' is not in ent_ids_{side + 1}")
            out.append((ent, [a for a in parts[1:] if a]))
    return out


def relation_bow(triples: np.ndarray, n: int, top: int = BOW_TOP) -> np.ndarray:
    """(N, top) counts of the `top` most frequent relations over the triples where the entity is
    head or tail (rows of isolated entities are zero; scaled later by ``normalise_features``)."""
    rels = np.concatenate([triples[:, 1], triples[:, 1]])
    ents = np.concatenate([triples[:, 0], triples[:, 2]])
    counts = np.bincount(rels)
    keep = np.argsort(-counts, kind="stable")[:min(top, int((counts > 0).sum()))]
    col = np.full(counts.size, -1)
    col[keep] = np.arange(keep.size)
    sel = col[rels] >= 0
    mat = np.zeros((n, keep.size), dtype=np.float32)
    np.add.at(mat, (ents[sel], col[rels[sel]]), 1.0)
    return mat


def attribute_bow(attrs, n: int, top: int = BOW_TOP) -> np.ndarray:
    """(N, top) binary indicators of the `top` most frequent attribute names."""
    freq: dict[str, int] = {}
    for _, names in attrs:
        for a in set(names):
            freq[a] = freq.get(a, 0) + 1
    vocab = sorted(freq, key=lambda a: (-freq[a], a))[:top]
    col = {a: j for j, a in enumerate(vocab)}
    mat = np.zeros((n, max(len(vocab), 1)), dtype=np.float32)
    for ent, names in attrs:
        for a in names:
            j = col.get(a)
            if j is not None:
                mat[ent, j] = 1.0
    return mat


BOW_MODALITIES = ("rel_bow", "attr_bow")


def normalise_features(features: dict[str, np.ndarray], scheme: str) -> dict[str, np.ndarray]:
    """Row scaling of the input features (--feature_norm): 'l2' L2-normalises every row; 'official'
    the text and image rows only (bag-of-words stay raw counts / indicators, as the official loader);
    'bow_l2' the bag-of-words rows only. Zero rows stay zero. Returns new arrays."""
    scaled = {"l2": set(features), "official": set(features) - set(BOW_MODALITIES),
              "bow_l2": set(BOW_MODALITIES)}[scheme]
    return {m: _l2_rows(x) if m in scaled else x.copy() for m, x in features.items()}


def _l2_rows(mat: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(mat, axis=1, keepdims=True)
    return mat / np.maximum(norm, 1e-12)


# ---------------------------------------------------------------------------------------------
# Splits and pair files.
# ---------------------------------------------------------------------------------------------


@dataclass
class Split:
    train: np.ndarray  # (P_train, 2)
    valid: np.ndarray  # (P_val, 2), empty when val_ratio = 0
    test: np.ndarray  # (P_test, 2)


def split_links(links: np.ndarray, rate: float, seed: int, val_ratio: float = 0.0) -> Split:
    """The paper's split: shuffle the aligned pairs with the seed, the first ``rate`` fraction
    trains, the rest tests. With val_ratio > 0 the last val_ratio of the training part is held
    out for model selection (the test pairs do not change)."""
    perm = np.random.RandomState(seed).permutation(len(links))
    shuffled = links[perm]
    n_train = int(len(links) * rate)
    train, test = shuffled[:n_train], shuffled[n_train:]
    n_val = int(round(len(train) * val_ratio))
    return Split(train[:len(train) - n_val], train[len(train) - n_val:], test)


def read_pair_file(path: str | Path, data: MMKG) -> np.ndarray:
    """A train_ill_path file: lines 'id1<TAB>id2' with id1 in KG1 and id2 in KG2."""
    path = Path(path)
    pairs = _read_int_table(path, 2, "id1<TAB>id2")
    _check_ids(path, pairs, data.kg == 0, [0], "KG1 (ent_ids_1): each pair must be (KG1 id, KG2 id)",
               data.num_entities)
    _check_ids(path, pairs, data.kg == 1, [1], "KG2 (ent_ids_2): each pair must be (KG1 id, KG2 id)",
               data.num_entities)
    return pairs


def write_pair_file(path: Path, pairs: np.ndarray) -> None:
    atomic_write(path, lambda f: f.writelines(f"{a}\t{b}\n" for a, b in pairs))


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


def _pairs_by_row(rows: np.ndarray, device):
    """Pairs grouped by their query row: ``group(a, b)`` = indices of the pairs whose row is in [a, b)."""
    order = np.argsort(rows, kind="stable")
    sorted_rows, order_t = rows[order], torch.as_tensor(order, device=device)
    return lambda a, b: order_t[slice(*np.searchsorted(sorted_rows, [a, b]))]


@torch.no_grad()
def _csls_and_gold(sim: _CosineBlocks, lp, rp, group, k: int, use_csls: bool):
    """First pass over S: the CSLS r terms of both sides (mean of the k largest cosines of each row,
    and of each column, merged slice by slice) and the gold cosines S[lp, rp]."""
    n_left, n_right = sim.left.shape[0], sim.right.shape[0]
    dev = sim.left.device
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


def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    r = ranks.double()
    return {"hits@1": float((r <= 1).double().mean()), "hits@5": float((r <= 5).double().mean()),
            "hits@10": float((r <= 10).double().mean()), "mrr": float((1.0 / r).mean()), "mr": float(r.mean())}


@torch.no_grad()
def evaluate_alignment(emb: torch.Tensor, pairs: np.ndarray, ids: np.ndarray | None = None, csls_k: int = 3,
                       use_csls: bool = True, chunk: int = 4096, with_predictions: bool = False):
    """Alignment metrics of ``pairs`` from entity embeddings ``emb``: (N, D) indexed by entity id,
    or (R, D) whose rows are the sorted entity ids ``ids``.

    Candidates are the test entities only: each left entity of ``pairs`` is ranked against all
    distinct right entities of ``pairs`` (left-to-right), and vice versa (right-to-left).
    Similarity is the cosine of L2-normalised embeddings, adjusted by CSLS with k = csls_k.
    Returns {"l2r": {...}, "r2l": {...}, "avg": {...}} with hits@1/5/10, mrr, mr; the
    headline numbers are "avg", the mean of the two directions. Each gold pair is ranked on
    its own: when an entity has two gold counterparts, the other one counts as a competitor.

    Both directions read one cosine matrix S (L, C) (see SIMILARITY_KEEP_ENTRIES). CSLS score
    2 S[i, j] - r_left[i] - r_right[j]: a query's own r term is the same for all its candidates, so
    left i ranks candidate j by S[i, j] - r_right[j] / 2 and right j ranks i by S[i, j] - r_left[i] / 2
    (halving is exact in floating point, so no order or tie changes). Ties count half, as in
    ``directional_ranks``.
    """
    pairs = np.asarray(pairs)
    left_ids, left_pos = np.unique(pairs[:, 0], return_inverse=True)
    right_ids, right_pos = np.unique(pairs[:, 1], return_inverse=True)
    dev = emb.device
    rows = (lambda e: e) if ids is None else (lambda e: np.searchsorted(ids, e))
    left = torch.nn.functional.normalize(emb[torch.as_tensor(rows(left_ids), device=dev)].float(), dim=-1)
    right = torch.nn.functional.normalize(emb[torch.as_tensor(rows(right_ids), device=dev)].float(), dim=-1)
    lp = torch.as_tensor(left_pos.reshape(-1), device=dev)  # (P,) row of each pair's left entity in S
    rp = torch.as_tensor(right_pos.reshape(-1), device=dev)  # (P,) column of its right entity
    sim = _CosineBlocks(left, right, chunk)
    group = _pairs_by_row(left_pos.reshape(-1), dev)
    r_left, r_right, gold = _csls_and_gold(sim, lp, rp, group, csls_k, use_csls)
    half_r_left, half_r_right = r_left / 2, r_right / 2
    gold_r2l = gold - half_r_left[lp]  # (P,) key of each pair's gold for its right entity
    n_pairs = len(pairs)
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
    n_cand = {"l2r": len(right_ids), "r2l": len(left_ids)}
    ranks = {d: 1 + (n_cand[d] - 1 + signs[d]) / 2 for d in signs}
    m1, m2 = rank_metrics(ranks["l2r"]), rank_metrics(ranks["r2l"])
    result = {"l2r": m1, "r2l": m2, "avg": {k: (m1[k] + m2[k]) / 2 for k in m1}}
    if with_predictions:
        result["predictions"] = {"left": pairs[:, 0], "gold_right": pairs[:, 1],
                                 "pred_right": right_ids[top1.cpu().numpy()],
                                 "score": top1_score.cpu().numpy(), "rank": ranks["l2r"].cpu().numpy()}
    return result


@torch.no_grad()
def mutual_nearest_pairs(left_emb: torch.Tensor, right_emb: torch.Tensor, left_ids: np.ndarray,
                         right_ids: np.ndarray, csls_k: int = 3, chunk: int = 4096) -> np.ndarray:
    """Pairs (l, r) such that r is l's best CSLS match among right_ids and l is r's best match
    among left_ids: the pseudo-labels of iterative training. left_emb / right_emb: (L, D) /
    (R, D) rows of left_ids / right_ids. Returns (P, 2) entity ids. One cosine matrix serves
    both r terms and both directions, as in evaluate_alignment."""
    if len(left_ids) == 0 or len(right_ids) == 0:
        return np.zeros((0, 2), dtype=np.int64)
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
    for sl, s in sim.slices():
        best_r[sl] = (s - half_r_right).argmax(1)
        key, row = (s - half_r_left[sl, None]).max(0)  # (R,): best left row of this slice per column
        better = key > best_l_key  # strict: the first best row wins, as argmax does
        best_l_key = torch.where(better, key, best_l_key)
        best_l = torch.where(better, row + sl.start, best_l)
    li = torch.arange(len(left_ids), device=dev)
    mutual = best_l[best_r] == li
    return np.stack([left_ids[li[mutual].cpu().numpy()], right_ids[best_r[mutual].cpu().numpy()]], 1)


def pair_overlap(pairs: np.ndarray, reference: np.ndarray) -> int:
    """How many rows of ``pairs`` are also rows of ``reference``."""
    if len(pairs) == 0 or len(reference) == 0:
        return 0
    ref = {(int(a), int(b)) for a, b in reference}
    return sum((int(a), int(b)) in ref for a, b in pairs)


def finite_or_raise(name: str, value: torch.Tensor, epoch: int) -> None:
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"loss term '{name}' is {float(value)} at epoch {epoch}")


def nan_to_none(x):
    return None if isinstance(x, float) and math.isnan(x) else x
