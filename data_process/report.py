"""Turn run folders into the results page: Table 1, Table 2, iterative training, Figure 3 and 4.

    python -m data_process.report --runs runs --out docs/results.md --figures docs/figures \
        --notes docs/results_notes.md

Which run fills which cell comes from run_all.sh's RUN_TABLE (parsed by :func:`load_run_list`);
every number of ours is read from ``<runs>/<name>/results.json`` and its neighbours, the paper's
numbers are the constants below. A run without results.json shows as "missing", never as a zero.
Each cell of ours comes in three selections: the last epoch, the best validation epoch (only
when the run had a validation split) and the best TEST epoch, which is the rule behind the
paper's Table 1 and is labelled as such. A run that departs from the paper's protocol (another
dataset, fewer epochs) is labelled a smoke run, and the page says so at the top.

A finished run's numbers are also kept as a record, ``docs/records/<name>.json`` (``--save_records``:
its results.json and a slim copy of its metrics.jsonl, a few tens of kB), which the repository
commits; a run whose folder is gone (run folders are not committed) is read from its record, so the
page can be regenerated without losing it.

matplotlib is optional (``pip install -e ".[plot]"``): without it the tables are written and the
page says that the figures were skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "run_all.sh"
RECORDS = ROOT / "docs" / "records"
SUPERSEDED = "superseded"  # <records>/superseded/<name>.<k>.json: earlier runs of a line a fresh run replaced
# What a record keeps of each metrics.jsonl line (the rest is the health monitor's detail).
RECORD_METRIC_KEYS = ("epoch", "loss", "grad_norm_max", "loss_rise_max", "table_grad_rise_max", "train_pairs",
                      "pair_version", "seconds")
# The stability table's loss rises are counted from this epoch (--spike_guard_from's default): before it the
# loss falls fast and one evaluation's loss says little about the next.
STABLE_FROM = 100

TABLES = ("table1", "table2", "seeds", "valid", "il", "fig3")
METRICS = ("hits@1", "hits@5", "hits@10", "mrr")
METRIC_LABELS = ("H@1", "H@5", "H@10", "MRR")
DATASETS = ("FB15K_DB15K", "FB15K_YAGO15K")
DATASET_LABEL = {"FB15K_DB15K": "FB15K-DB15K", "FB15K_YAGO15K": "FB15K-YAGO15K"}
RATES = (0.2, 0.5, 0.8)
# The paper's protocol: a run that departs from it is a smoke run, not a paper number.
PAPER_EPOCHS, PAPER_IL_EPOCHS, PAPER_CHECK_POINT = 1000, 500, 10
# Figure 3's sweep may train this many epochs a point instead of the paper's 1000 (the paper preset's best
# test epoch is 330-340): labelled so, not a smoke run; its default point is then BASE_RUN's first epochs.
FIG3_SHORT_EPOCHS = 400

# Paper, Table 1 ("Ours"): Hits@1, Hits@5, Hits@10, MRR; best test epoch (notes: official logs).
PAPER_TABLE1 = {
    ("FB15K_DB15K", 0.2): (0.5118, 0.6997, 0.7643, 0.5980),
    ("FB15K_DB15K", 0.5): (0.6949, 0.8434, 0.8803, 0.7630),
    ("FB15K_DB15K", 0.8): (0.8094, 0.9146, 0.9353, 0.8560),
    ("FB15K_YAGO15K", 0.2): (0.4393, 0.6278, 0.6989, 0.5280),
    ("FB15K_YAGO15K", 0.5): (0.6491, 0.8032, 0.8474, 0.7200),
    ("FB15K_YAGO15K", 0.8): (0.7737, 0.8904, 0.9196, 0.8270),
}
# The official logs (reproduction notes): last epoch of the same runs, and the iterative runs
# at their best test epoch (the paper prints no iterative numbers). No Hits@5 in the notes.
OFFICIAL_LAST = {
    ("FB15K_DB15K", 0.2): (0.473, None, 0.730, 0.561),
    ("FB15K_DB15K", 0.5): (0.692, None, 0.872, 0.757),
    ("FB15K_DB15K", 0.8): (0.808, None, 0.934, 0.855),
    ("FB15K_YAGO15K", 0.2): (0.428, None, 0.681, 0.515),
    ("FB15K_YAGO15K", 0.5): (0.647, None, 0.840, 0.717),
    ("FB15K_YAGO15K", 0.8): (0.738, None, 0.885, 0.791),
}
OFFICIAL_IL = {
    ("FB15K_DB15K", 0.2): (0.679, None, 0.854, 0.741),
    ("FB15K_DB15K", 0.5): (0.740, None, 0.894, 0.796),
    ("FB15K_DB15K", 0.8): (0.836, None, 0.940, 0.875),
    ("FB15K_YAGO15K", 0.2): (0.606, None, 0.794, 0.671),
    ("FB15K_YAGO15K", 0.5): (0.698, None, 0.861, 0.755),
    ("FB15K_YAGO15K", 0.8): (0.779, None, 0.912, 0.828),
}
# Paper, Table 2 (FB15K-DB15K 20%): Hits@1, Hits@5, Hits@10, MRR.
PAPER_TABLE2 = {
    "Ours": (0.5118, 0.6997, 0.7643, 0.5980),
    "w/o g": (0.4131, 0.5090, 0.5643, 0.4640),
    "w/o v": (0.4803, 0.6747, 0.7391, 0.5680),
    "w/o r_b": (0.4736, 0.6560, 0.7191, 0.5560),
    "w/o r_t": (0.4841, 0.6748, 0.7362, 0.5690),
    "w/o a_b": (0.4731, 0.6646, 0.7291, 0.5590),
    "w/o a_t": (0.4844, 0.6750, 0.7383, 0.5690),
    "w/o L_m^CL": (0.4840, 0.6722, 0.7346, 0.5680),
    "w/o L_m^AL": (0.4864, 0.6753, 0.7389, 0.5710),
    "w/o L_CLUB": (0.5033, 0.6892, 0.7576, 0.5918),
    "w/o HMoE": (0.4778, 0.6680, 0.7304, 0.5620),
}
# Table 2's "Ours", Figure 3's default point and Figure 4 are all this run (run_all.sh says so).
BASE_RUN = "t1_db_20"
# Figure 3: the swept flags, with the paper's symbols.
FIG3_PARAMS = {"cl_loss": "λ1 (cl_loss)", "al_loss": "λ2 (al_loss)", "tau_cl": "τ_cl (tau_cl)",
               "tau_al": "τ_al (tau_al)", "n_exp": "k (n_exp)"}
# The values of BASE_RUN (run.sh's official ones), used for a default point whose run is missing.
FIG3_DEFAULTS = {"cl_loss": 1.0, "al_loss": 0.1, "tau_cl": 0.1, "tau_al": 4.0, "n_exp": 5}
# What the paper's text reads from its Figure 3 (the observations after it), per swept flag. Its temperature
# T is Eq. 13's, i.e. tau_cl; Eq. 16 has none (tau_al is the official code's, docs/departures.md).
FIG3_PAPER_READING = {
    "n_exp": "(1) should not be too small; once enough, performance stabilises",
    "cl_loss": "(2) relatively stable, only minor fluctuations",
    "al_loss": "(2) relatively stable, only minor fluctuations",
    "tau_cl": "(3) the most significant impact; keep it around 0.1",
    "tau_al": "not in the paper's figure (Eq. 16 has no temperature; the official code's)",
}
SELECTIONS = (("last_epoch", "ours, last epoch"),
              ("best_valid_epoch", "ours, best valid epoch"),
              ("best_test_epoch", "ours, best TEST epoch*"))
# Table 1's extra row, after the last epoch: the last epoch under the weights calibrated without labels.
UNLABELLED = ("last_epoch_unlabelled", "ours, last epoch, weights calibrated without labels †")
UNLABELLED_NOTE = ("† the last epoch's embeddings ranked under the router's weights times one factor per "
                   "modality, fitted to the number of mutual CSLS nearest neighbours between the two KGs' "
                   "entities in no seed pair (`--calibrate_unlabelled`, on by default: no link is read and the "
                   "training is unchanged; docs/accuracy.md, 'Calibrating the weights without labels'). 'not "
                   "recorded': the run finished before the option existed.")
TEST_RULE_NOTE = ("\\* best TEST epoch: the evaluation with the highest test MRR, the selection rule behind "
                  "the paper's Table 1 and the official logs. It is chosen on the test set, so it is optimistic; "
                  "it is shown only to compare with the paper. The last epoch (and the best validation epoch, "
                  "when a run holds out `--val_ratio` of its seeds) are the honest numbers.")


# ---------------------------------------------------------------------------------------------
# The run list: run_all.sh's RUN_TABLE.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One line of RUN_TABLE: name | table | row | paper Hits@1 | run.sh arguments."""

    name: str
    table: str
    row: str
    expected: str
    args: tuple[str, ...]

    @property
    def positional(self) -> tuple[str, ...]:
        out = []
        for a in self.args:
            if a.startswith("--"):
                break
            out.append(a)
        return tuple(out)

    @property
    def flags(self) -> tuple[str, ...]:
        return self.args[len(self.positional):]

    @property
    def dataset(self) -> str:
        return self.positional[1]

    @property
    def rate(self) -> float:
        return float(self.positional[2])

    @property
    def without(self) -> str:
        return self.positional[4]

    @property
    def expected_hits1(self) -> float | None:
        try:
            return float(self.expected)
        except ValueError:
            return None

    def fig3_point(self) -> tuple[str, float]:
        """'al_loss=0.05' -> ('al_loss', 0.05)."""
        param, _, value = self.row.partition("=")
        return param.strip(), float(value)


def load_run_list(path: Path = RUN_ALL) -> list[RunSpec]:
    """Parse the here-document RUN_TABLE of run_all.sh (the same parse the script does)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    try:
        start = next(i for i, l in enumerate(lines) if "<<'RUN_TABLE'" in l) + 1
        end = next(i for i in range(start, len(lines)) if lines[i].strip() == "RUN_TABLE")
    except StopIteration:
        raise ValueError(f"{path}: no RUN_TABLE here-document (<<'RUN_TABLE' ... RUN_TABLE)") from None
    specs = []
    for lineno in range(start, end):
        line = lines[lineno].strip()
        if not line or line.startswith("#"):
            continue
        cols = [c.strip() for c in line.split("|")]
        if len(cols) != 5 or not all(cols):
            raise ValueError(f"{path} line {lineno + 1}: expected 5 non-empty '|' columns "
                             f"(name | table | row | paper Hits@1 | run.sh arguments), got: {line}")
        name, table, row, expected, args = cols
        specs.append(RunSpec(name, table, row, expected, tuple(args.split())))
    return specs


# ---------------------------------------------------------------------------------------------
# Reading run folders.
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_record(path: Path) -> tuple[dict | None, str | None, list | None]:
    """A record's (results, where they came from, its evaluations); (None, None, None) without one."""
    saved = _read_json(path)
    if not saved or not saved.get("results"):
        return None, None, None
    return saved["results"], saved.get("source", "a record"), saved.get("metrics") or None


@dataclass
class Run:
    spec: RunSpec
    folder: Path
    config: dict | None
    results: dict | None
    command: str | None
    record: str | None = None  # where the numbers came from when the run folder has no results.json
    record_metrics: list | None = None  # the record's evaluations (docs/records), when the numbers came from it
    alias_of: str | None = None  # the run whose numbers these are (w/o v on data without images: the full model)

    @classmethod
    def load(cls, spec: RunSpec, runs_dir: Path, records_dir: Path | None = None) -> Run:
        folder = Path(runs_dir) / spec.name
        results = _read_json(folder / "results.json")
        record, record_metrics = None, None
        if results is None and records_dir is not None:
            results, record, record_metrics = read_record(Path(records_dir) / f"{spec.name}.json")
        config = (results or {}).get("config") or _read_json(folder / "config.json")
        cmd_file = folder / "command.txt"
        command = cmd_file.read_text(encoding="utf-8").strip() if cmd_file.is_file() else None
        if command is None and record is not None:
            command = (results or {}).get("command")
        return cls(spec, folder, config, results, command, record, record_metrics)

    @property
    def metrics(self) -> list[dict]:
        """The evaluations: the folder's metrics.jsonl, or the record's when the numbers came from a record."""
        if self.record is not None:
            return self.record_metrics or []
        return [json.loads(line) for line in _lines(self.folder / "metrics.jsonl")]

    @property
    def finished(self) -> bool:
        return self.results is not None

    def selection(self, key: str) -> dict | None:
        """{'epoch': e, 'avg': {...}} of a selection (last_epoch, best_valid_epoch, best_test_epoch), or of the
        last epoch under the weights calibrated without labels (last_epoch_unlabelled)."""
        if key == "last_epoch_unlabelled":
            sel = (self.results or {}).get("last_epoch") or {}
            cal = sel.get("calibrated_unlabelled")
            return {"epoch": sel.get("epoch"), "avg": cal["test"]["avg"]} if cal else None
        sel = (self.results or {}).get(key)
        if not sel or "test" not in sel:
            return None
        return {"epoch": sel.get("epoch"), "avg": sel["test"]["avg"]}

    def calibrated(self, key: str) -> dict | None:
        """{'epoch': e, 'avg': {...}} of the test pairs under --calibrate_weights' weights: at the last epoch
        ('last_epoch') or at the epoch with the best calibrated validation MRR ('best_calibrated_valid_epoch')."""
        sel = (self.results or {}).get(key) or {}
        cal = sel.get("calibrated") if key == "last_epoch" else sel
        if not cal or "test" not in cal:
            return None
        return {"epoch": sel.get("epoch"), "avg": cal["test"]["avg"]}

    def calibrated_best_test(self) -> dict | None:
        """{'epoch': e, 'avg': {...}} of the evaluation whose calibrated test MRR is highest (--calibrate_weights;
        chosen on the test set, as best_test_epoch is)."""
        rows = [(m["epoch"], m["calibrated"]["test"]) for m in self.metrics if m.get("calibrated")]
        rows = [(e, t.get("avg", t)) for e, t in rows]  # a record keeps only the average
        if not rows:
            return None
        epoch, avg = max(rows, key=lambda r: (r[1]["mrr"], -r[0]))
        return {"epoch": epoch, "avg": avg}

    @property
    def dataset_name(self) -> str:
        if not self.config:
            return "?"
        return Path(self.config["file_dir"]).name if self.config.get("file_dir") else "embedded default"

    @property
    def status(self) -> str:
        if self.finished:
            if self.record is None:
                return "finished"
            return "finished (record)" if self.alias_of is None else f"= `{self.alias_of}` (the data has no images)"
        if not self.folder.is_dir():
            return "missing"
        done = [json.loads(l) for l in _lines(self.folder / "metrics.jsonl")]
        total = self.total_epochs
        at = f" at epoch {done[-1]['epoch']} of {total}" if done and total else ""
        return f"missing (unfinished{at})"

    @property
    def total_epochs(self) -> int | None:
        if not self.config:
            return None
        return self.config["epochs"] + (self.config.get("il_epochs", 0) if self.config.get("il") else 0)

    def smoke_reasons(self) -> list[str]:
        """How this run departs from the paper's protocol (empty: a paper-protocol run)."""
        if not self.config:
            return []
        c, why = self.config, []
        if self.dataset_name != self.spec.dataset:
            why.append(f"dataset {self.dataset_name} (the line's {self.spec.dataset})")
        if c["epochs"] != PAPER_EPOCHS and not (self.spec.table == "fig3" and c["epochs"] == FIG3_SHORT_EPOCHS):
            why.append(f"epochs {c['epochs']} (paper {PAPER_EPOCHS})")
        if c.get("il") and c.get("il_epochs") != PAPER_IL_EPOCHS:
            why.append(f"il_epochs {c.get('il_epochs')} (paper {PAPER_IL_EPOCHS})")
        if c.get("check_point") != PAPER_CHECK_POINT:
            why.append(f"check_point {c.get('check_point')} (paper {PAPER_CHECK_POINT})")
        return why

    def command_line(self) -> str:
        """The command run_all.sh recorded, else an equivalent train.py command from config.json."""
        if self.command:
            return self.command
        if not self.config:
            return f"(not run) {' '.join(['bash', 'run.sh', *self.spec.args])}"
        return "python train.py " + " ".join(_non_default_flags(self.config))


IMAGE_CODE = "1"  # run.sh's <without> code of the image modality


def without_images_alias(runs: list[Run]) -> list[Run]:
    """Table 2's "w/o v" on data without images is the full model, i.e. BASE_RUN (run_all.sh skips it):
    while its own folder has no results, it shows BASE_RUN's, marked as such."""
    base = next((r for r in runs if r.spec.name == BASE_RUN), None)
    if base is None or not base.finished or "image" in (base.results.get("modalities") or ["image"]):
        return runs
    out = []
    for r in runs:
        if r.spec.table == "table2" and r.spec.without == IMAGE_CODE and not r.finished:
            r = dataclasses.replace(r, config=base.config, results=base.results, command=base.command,
                                    record=f"{base.folder}/results.json", record_metrics=base.metrics,
                                    alias_of=base.spec.name)
        out.append(r)
    return out


def record_of(run: Run) -> dict:
    """What docs/records keeps of a finished run with a folder: results.json, the command, and each
    evaluation's loss and test / validation averages and router weights."""
    metrics = []
    for line in _lines(run.folder / "metrics.jsonl"):
        m = json.loads(line)
        slim = {k: m[k] for k in RECORD_METRIC_KEYS if k in m}
        for key in ("test", "valid", "valid_heldout"):
            if key in m:
                slim[key] = m[key]["avg"]
        if "calibrated" in m:
            slim["calibrated"] = {**m["calibrated"], "test": m["calibrated"]["test"]["avg"]}
        if "health" in m:
            slim["weight"] = m["health"].get("weight")
            slim["hits1"] = m["health"].get("hits1")
        metrics.append(slim)
    return {"source": f"{run.folder}/results.json", "results": {**run.results, "command": run.command},
            "metrics": metrics}


def same_run(a: dict, b: dict) -> bool:
    """Whether two records hold the same run: the same selections and training time (a record rewritten
    with other metric keys, or with the calibration that train.py --add_calibration adds to a finished run,
    is still the same run; a fresh run of the same command is not)."""
    ra, rb = a.get("results") or {}, b.get("results") or {}
    trained = lambda sel: {k: v for k, v in sel.items() if k != "calibrated_unlabelled"} if sel else sel
    return all(trained(ra.get(k)) == trained(rb.get(k)) for k in ("last_epoch", "best_test_epoch")) \
        and ra.get("train_seconds") == rb.get("train_seconds")


def supersede(path: Path) -> Path:
    """Move the record at ``path`` to <records>/superseded/<name>.<k>.json (the first free k) and return
    the new path: a fresh run of the same line must not erase the numbers of the run it replaces."""
    folder = path.parent / SUPERSEDED
    folder.mkdir(parents=True, exist_ok=True)
    k = 1
    while (folder / f"{path.stem}.{k}.json").exists():
        k += 1
    return path.rename(folder / f"{path.stem}.{k}.json")


def save_records(runs: list[Run], records_dir: Path) -> list[str]:
    """Write docs/records/<name>.json for every finished run read from its folder; the names written. A
    record of another run of the same line (a fresh run of the command) is first moved to
    docs/records/superseded/, never overwritten."""
    records_dir = Path(records_dir)
    written = []
    for run in runs:
        if run.finished and run.record is None:
            records_dir.mkdir(parents=True, exist_ok=True)
            record, path = record_of(run), records_dir / f"{run.spec.name}.json"
            earlier = _read_json(path) if path.exists() else None
            if earlier is not None and not same_run(earlier, record):
                kept = supersede(path)
                print(f"report: {path} held an earlier run of {run.spec.name}; kept as {kept}", file=sys.stderr)
            text = json.dumps(record, indent=None, separators=(",", ":"))
            path.write_text(text + "\n", encoding="utf-8")
            written.append(run.spec.name)
    return written


def superseded_runs(specs: list[RunSpec], records_dir: Path | None) -> dict[str, list[Run]]:
    """The earlier runs of each line whose records a fresh run superseded, oldest first, by line name."""
    out: dict[str, list[Run]] = {}
    folder = Path(records_dir) / SUPERSEDED if records_dir is not None else None
    if folder is None or not folder.is_dir():
        return out
    by_name = {s.name: s for s in specs}
    kept = []  # (line name, k, path) of <name>.<k>.json
    for path in folder.glob("*.json"):
        name, _, k = path.stem.rpartition(".")
        if name in by_name and k.isdigit():
            kept.append((name, int(k), path))
    for name, _, path in sorted(kept):
        results, source, metrics = read_record(path)
        if results is not None:
            out.setdefault(name, []).append(Run(by_name[name], path, results.get("config"), results,
                                                results.get("command"), source, metrics))
    return out


def _lines(path: Path) -> list[str]:
    try:
        return [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    except OSError:
        return []


def _non_default_flags(config: dict) -> list[str]:
    try:
        import dataclasses

        from utils import Config
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    except Exception:  # utils needs torch; without it every flag is listed
        defaults = {}
    out = []
    for key, value in config.items():
        if key in ("device", "provenance") or (key in defaults and defaults[key] == value):
            continue  # config.json's "provenance" records where the run came from, not a flag
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no-{key}")
        else:
            out.append(f"--{key} {shlex.quote(str(value))}")
    return out


def pseudo_label_stats(run: Run) -> tuple[int, int] | None:
    """(the final pseudo set's pairs, of which correct): the last of results.json's pseudo_steps (a record keeps
    them), else the sum of log.txt's pseudo_new lines (a run that predates pseudo_steps: there pairs were only
    added, so the sum is the final set). The gold links were read by train.py only to log the precision, never
    to choose pairs."""
    steps = (run.results or {}).get("pseudo_steps")
    if steps and "total_correct" in steps[-1]:
        return int(steps[-1]["total"]), int(steps[-1]["total_correct"])
    total = correct = 0
    seen = False
    for line in _lines(run.folder / "log.txt"):
        m_new = re.search(r"\bpseudo_new=(\d+)", line)
        m_prec = re.search(r"\bpseudo_new_precision=([0-9.]+)", line)
        if m_new and m_prec:
            seen = True
            n = int(m_new.group(1))
            total += n
            correct += round(n * float(m_prec.group(1)))
    return (total, correct) if seen else None


# ---------------------------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------------------------


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}" if isinstance(x, float) and x < 1.0001 else f"{x:g}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _ours_cells(run: Run | None, key: str, metrics=METRICS) -> list[str] | None:
    """Metric cells and the epoch of one selection; None when the run has no such selection."""
    if run is None or not run.finished:
        return ["missing"] * (len(metrics) + 1)
    sel = run.selection(key)
    if sel is None:
        return None
    mark = " †" if run.smoke_reasons() else ""
    return [_num(sel["avg"][m]) + mark for m in metrics] + [str(sel["epoch"])]


def _reference_cells(values, metrics=METRICS) -> list[str]:
    if values is None:
        return ["-"] * (len(metrics) + 1)
    return [_num(v) for v in values] + ["-"]


def _selections(show_valid: bool, unlabelled: bool = False):
    out = [(k, label) for k, label in SELECTIONS if show_valid or k != "best_valid_epoch"]
    return out[:1] + [UNLABELLED] + out[1:] if unlabelled else out


def _selection_cells(run: Run | None, key: str, metrics=METRICS) -> list[str]:
    c = _ours_cells(run, key, metrics)
    absent = "no valid split" if key == "best_valid_epoch" else "not recorded"
    return c if c is not None else [absent] + ["-"] * len(metrics)


def _grid_table(runs: dict, references: list[tuple[str, dict]], show_valid: bool,
                stand_ins: dict | None = None, unlabelled: bool = False) -> list[str]:
    """Table 1 layout: a block of rows per seed ratio, a column group per dataset. ``stand_ins`` (same keys):
    the run whose best validation epoch fills that row in place of the cell's own run (its numbers marked §;
    :func:`table1_section` chooses them). ``unlabelled``: a row for the last epoch under the weights
    calibrated without labels (UNLABELLED)."""
    header = ["Seeds", "Result"]
    for d in DATASETS:
        header += [f"{DATASET_LABEL[d]} {m}" for m in METRIC_LABELS] + [f"{DATASET_LABEL[d]} epoch"]
    rows = []
    for rate in RATES:
        block = []
        for label, ref in references:
            cells = []
            for d in DATASETS:
                cells += _reference_cells(ref.get((d, rate)))
            block.append([label, *cells])
        for key, label in _selections(show_valid, unlabelled):
            cells = []
            for d in DATASETS:
                mine = _selection_cells(runs.get((d, rate)), key)
                mark = PARTIAL_MARK.get(d, "")  # the data's completeness beside each of our numbers on it
                stand_in = (stand_ins or {}).get((d, rate))
                if key == "best_valid_epoch" and stand_in is not None:
                    mine, mark = _selection_cells(stand_in, key), mark + STAND_IN_MARK
                cells += [c + mark if c[:1].isdigit() else c for c in mine[:-1]] + mine[-1:]
            block.append([label, *cells])
        for i, r in enumerate(block):
            rows.append([f"{int(rate * 100)}%" if i == 0 else "", *r])
    return _md_table(header, rows)


def _run_names_line(runs: dict) -> str:
    return "Runs: " + ", ".join(f"{DATASET_LABEL[d]} {int(r * 100)}% = `{run.spec.name}`"
                                for (d, r), run in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1])))


def early_stop_runs(runs: list[Run]) -> dict:
    """The finished --val_ratio --early_stop runs of the "valid" table by (dataset, rate): the honest selection
    that Table 1's "best valid epoch" row shows for a cell whose own run trains on every seed pair."""
    return {(r.spec.dataset, r.spec.rate): r for r in runs
            if r.spec.table == "valid" and "--early_stop" in r.spec.flags and r.finished}


def table1_section(runs: list[Run], show_valid: bool) -> list[str]:
    cells = {(r.spec.dataset, r.spec.rate): r for r in runs if r.spec.table == "table1"}
    # An early-stopping split run stands in where the cell's own run has no validation split.
    stand_ins = {key: r for key, r in early_stop_runs(runs).items()
                 if _selection_cells(cells.get(key), "best_valid_epoch")[0] == "no valid split"}
    out = ["## Table 1: non-iterative results", "",
           "The paper's Table 1 (best test epoch, the paper's rule) and the official logs' last epoch of "
           "the same runs, beside ours.", ""]
    out += _grid_table(cells, [("paper (best test epoch)", PAPER_TABLE1),
                               ("official log, last epoch", OFFICIAL_LAST)], show_valid or bool(stand_ins),
                       stand_ins, unlabelled=True)
    out += ["", _run_names_line(cells), "", UNLABELLED_NOTE, "", PARTIAL_NOTE, ""]
    used = [r for _, r in sorted(stand_ins.items())]
    if used:
        out += [f"{STAND_IN_MARK.strip()} best valid epoch of " + ", ".join(
            f"`{r.spec.name}` ({DATASET_LABEL[r.spec.dataset]} {int(r.spec.rate * 100)}%)" for r in used)
            + ": the same command with " + ", ".join(sorted({f"`{' '.join(r.spec.flags)}`" for r in used}))
            + ": it holds out a validation split of the seed pairs (and trains on the rest), selects its epoch by "
            "the validation MRR and stops after --early_stop evaluations without a better one (the 'valid' "
            "table). The other rows' runs train on every seed pair and have no validation split.", ""]
    return out


# What the datasets built here hold (docs/data.md), for every summary line that quotes them.
DATA_NOTE = {"FB15K_DB15K": "complete graphs, no images",
             "FB15K_YAGO15K": "57% of YAGO15K's triples (70,414 of 122,886), no images"}
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"
# Our numbers on a partial dataset carry this mark, and the tables that show them say what it means.
PARTIAL_MARK = {"FB15K_YAGO15K": " ‡"}
# Table 1's "best valid epoch" cells read from an early-stopping split run (early_stop_runs) carry this mark.
STAND_IN_MARK = " §"
PARTIAL_NOTE = ("‡ FB15K-YAGO15K built from 57% of YAGO15K's relation triples (70,414 of 122,886; 747 linked "
                "YAGO entities in no triple; links and attributes complete, docs/data.md): not directly "
                "comparable with the paper's and the official logs' numbers on the complete graph.")


def _pair(values) -> str:
    """Hits@1 / MRR of a reference tuple (H@1, H@5, H@10, MRR)."""
    return f"{_num(values[0])} / {_num(values[3])}" if values else "-"


def _ours_pair(run: Run | None, key: str, calibrated: bool = False) -> str:
    """Hits@1 / MRR (epoch) of a selection of ``run``, or its latest evaluation while it is unfinished; with
    ``calibrated``, of the test ranking under --calibrate_weights' weights (the last epoch, or the epoch with
    the best calibrated test MRR for the best-test column)."""
    test_of = (lambda m: (m.get("calibrated") or {}).get("test")) if calibrated else (lambda m: m.get("test"))
    if run is not None and not run.finished and run.folder.is_dir():
        done = [m for m in run.metrics if test_of(m)]
        if done:  # an unfinished run: its latest evaluation in the last-epoch column, labelled so
            m, avg = done[-1], test_of(done[-1])["avg"]
            return (f"unfinished: {_num(avg['hits@1'])} / {_num(avg['mrr'])} at epoch {m['epoch']} of "
                    f"{run.total_epochs}" if key == "last_epoch" else "unfinished")
    if run is None or not run.finished:
        return "not run yet"
    if calibrated:
        sel = run.calibrated("last_epoch") if key == "last_epoch" else run.calibrated_best_test()
    else:
        sel = run.selection(key)
    return f"{_num(sel['avg']['hits@1'])} / {_num(sel['avg']['mrr'])} (epoch {sel['epoch']})" if sel else "-"


def readme_summary(runs: list[Run]) -> list[str]:
    """The README's opening table: each Table 1 cell, each iterative run at 20% and each run calibrated on a
    validation split, the paper's number, the official log's and ours (Hits@1 / MRR), with what the data
    here holds."""
    rows = []
    for table, rates, reference in (("table1", RATES, PAPER_TABLE1), ("il", (0.2,), OFFICIAL_IL)):
        for dataset in DATASETS:
            for rate in rates:
                run = next((r for r in runs if r.spec.table == table and r.spec.dataset == dataset
                            and r.spec.rate == rate), None)
                if run is None:
                    continue
                setting = f"{DATASET_LABEL[dataset]} {rate:.0%}" + (", iterative" if table == "il" else "")
                paper = _pair(reference.get((dataset, rate))) if table == "table1" else "-"
                official = _pair(OFFICIAL_LAST.get((dataset, rate)) if table == "table1"
                                 else reference.get((dataset, rate)))
                rows.append([setting, DATA_NOTE[dataset], paper, official, _ours_pair(run, "last_epoch"),
                             _ours_pair(run, "last_epoch_unlabelled"), _ours_pair(run, "best_test_epoch")])
    for run in runs:  # the runs calibrated on a validation split (--calibrate_weights)
        if run.spec.table != "valid" or "--calibrate_weights" not in run.spec.flags:
            continue
        dataset, rate = run.spec.dataset, run.spec.rate
        setting = f"{DATASET_LABEL[dataset]} {rate:.0%}, weights calibrated on a validation split (`{run.spec.name}`)"
        rows.append([setting, DATA_NOTE[dataset], _pair(PAPER_TABLE1.get((dataset, rate))),
                     _pair(OFFICIAL_LAST.get((dataset, rate))), _ours_pair(run, "last_epoch", calibrated=True),
                     "-", _ours_pair(run, "best_test_epoch", calibrated=True)])
    header = ["setting", "data here", "paper (best test epoch)", "official log (last epoch; iterative: best test)",
              "ours, last epoch", "ours, last epoch, weights calibrated without labels†", "ours, best test epoch*"]
    return [README_BEGIN, "", *_md_table(header, rows), "",
            "Hits@1 / MRR on the test pairs, both directions averaged. The paper and the official logs used "
            "images and complete graphs. \\* The best test epoch is chosen on the test set (the paper's rule), "
            "so it is optimistic; the last epoch is this repository's honest number. † The same embeddings "
            "under the router's weights times one factor per modality, fitted without any link to the number of "
            "mutual nearest neighbours among the entities in no seed pair (`--calibrate_unlabelled`, on by "
            "default; '-': the run predates it). Generated by "
            "`python -m data_process.report` from the same runs as [docs/results.md](docs/results.md), which "
            "has every cell, the validation-selected epochs and the commands.", "", README_END]


def splice_readme(path: Path, block: list[str]) -> None:
    """Replace the README's text between the results markers with ``block``."""
    text = Path(path).read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{path}: no '{README_BEGIN}' ... '{README_END}' block to replace")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    Path(path).write_text(head + "\n".join(block) + tail, encoding="utf-8")


def table2_section(runs: list[Run], by_name: dict[str, Run]) -> list[str]:
    """The paper's Table 2 with our rows: last epoch, last epoch under the weights calibrated without labels
    (UNLABELLED), best valid epoch (only when one of the rows' runs holds out a validation split) and best
    test epoch."""
    variants = [("Ours", by_name.get(BASE_RUN))]
    variants += [(r.spec.row, r) for r in runs if r.spec.table == "table2"]
    show_valid = any(run is not None and run.selection("best_valid_epoch") for _, run in variants)
    header = ["Method", "Result", *METRIC_LABELS, "epoch", "run"]
    rows = []
    for label, run in variants:
        block = [["paper", *_reference_cells(PAPER_TABLE2.get(label))]]
        for key, sel_label in _selections(show_valid, unlabelled=True):
            block.append([sel_label, *_selection_cells(run, key)])
        for i, r in enumerate(block):
            rows.append([label if i == 0 else "", *r, f"`{run.spec.name}`" if (i == 0 and run) else ""])
    return ["## Table 2: ablations on FB15K-DB15K 20%", "",
            "`w/o` switches off one modality (g graph, v image, r_b / r_t relation bag-of-words / text, "
            "a_b / a_t attribute bag-of-words / text) or one component (L_m^CL unimodal contrastive losses, "
            "L_m^AL distillation, L_CLUB, HMoE = the hierarchical mixture of experts).", "",
            *_md_table(header, rows), "", UNLABELLED_NOTE, ""]


# Column labels of a selection in the seeds and validation tables.
SHORT_SELECTION = {"last_epoch": "last", "best_valid_epoch": "best valid", "best_test_epoch": "best TEST*"}


def _selection_columns(keys) -> list[str]:
    return [f"{SHORT_SELECTION[k]} {c}" for k in keys for c in ("H@1", "MRR", "epoch")]


def _hits_mrr_epoch(sel: dict | None) -> list[str]:
    """Hits@1, MRR and epoch cells of one selection (Run.selection); "-" for each when there is none."""
    if sel is None:
        return ["-", "-", "-"]
    return [_num(sel["avg"]["hits@1"]), _num(sel["avg"]["mrr"]), str(sel["epoch"])]


def seed_spread(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation with n - 1) of the finished seeds' values; no deviation of one."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def seeds_section(runs: list[Run], by_name: dict[str, Run], show_valid: bool) -> list[str]:
    """The BASE_RUN setting repeated with other seeds (table "seeds"): one row per seed, then the
    mean and sample standard deviation over the finished ones. The seed also draws the split."""
    base = by_name.get(BASE_RUN)
    seeded = ([base] if base else []) + [r for r in runs if r.spec.table == "seeds"]
    if len(seeded) < 2:
        return []
    selections = _selections(show_valid)
    header = ["seed", "run", "state", *_selection_columns(k for k, _ in selections)]
    rows, values = [], {k: {"hits@1": [], "mrr": []} for k, _ in selections}
    for run in seeded:
        seed = (run.config or {}).get("seed", run.spec.positional[0])
        row = [str(seed), f"`{run.spec.name}`", run.status]
        for key, _ in selections:
            sel = run.selection(key)  # None for an unfinished run
            row += _hits_mrr_epoch(sel)
            for m in ("hits@1", "mrr") if sel else ():
                values[key][m].append(sel["avg"][m])
        rows.append(row)
    summary = ["mean ± std", "", f"{sum(r.finished for r in seeded)} finished"]
    for key, _ in selections:
        for m in ("hits@1", "mrr"):
            if not values[key][m]:
                summary.append("-")
                continue
            mean, std = seed_spread(values[key][m])
            summary.append(f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else " (one seed)"))
        summary.append("")
    rows.append(summary)
    spec = base.spec if base else seeded[0].spec
    return [f"## Seeds: {DATASET_LABEL.get(spec.dataset, spec.dataset)} {int(spec.rate * 100)}%", "",
            f"`{BASE_RUN}` repeated with other seeds. The seed draws the train/test split as well as the "
            "initialisation (the official code's split). Mean and sample standard deviation (n - 1) over "
            "the finished runs only.", "", *_md_table(header, rows), ""]


def valid_section(runs: list[Run]) -> list[str]:
    """Runs of table "valid": a line's setting with `--val_ratio` of the seeds held out, the three
    selections side by side and how far the honest one (best validation MRR) is from the test's."""
    held = [r for r in runs if r.spec.table == "valid"]
    if not held:
        return []
    header = ["run", "setting", "state", "split (train / valid / test)",
              *_selection_columns(k for k, _ in SELECTIONS), "best valid - best TEST* (H@1 / MRR)"]
    rows = []
    for run in held:
        pairs = (run.results or {}).get("pairs") or {}
        split = " / ".join(str(pairs.get(k, "-")) for k in ("train", "valid", "test")) if pairs else "-"
        sel = {key: run.selection(key) for key, _ in SELECTIONS}  # None for an unfinished run
        row = [f"`{run.spec.name}`", run.spec.row, run.status, split]
        row += [c for key, _ in SELECTIONS for c in _hits_mrr_epoch(sel[key])]
        v, t = sel["best_valid_epoch"], sel["best_test_epoch"]
        row.append("-" if v is None or t is None else
                   f"{v['avg']['hits@1'] - t['avg']['hits@1']:+.4f} / {v['avg']['mrr'] - t['avg']['mrr']:+.4f}")
        rows.append(row)
    out = ["## Selection on a validation split", "",
           "The paper selects its epoch on the test set. These runs hold out `--val_ratio` of the seed pairs "
           "as a validation split (trained on the rest) and report the epoch with the best validation MRR "
           "beside the last and the best-test epochs.", "", *_md_table(header, rows), ""]
    calibrated = [r for r in held if (r.config or {}).get("calibrate_weights")]
    if calibrated:
        out += calibrated_table(calibrated)
    return out


def calibrated_table(runs: list[Run]) -> list[str]:
    """The --calibrate_weights runs: the test pairs under the router's own weights and under the weights
    calibrated on the validation links, at the last epoch and at the best calibrated validation epoch."""
    header = ["run", "setting", "state", "last epoch H@1 / MRR", "calibrated, last epoch H@1 / MRR",
              "factors at the last epoch", "calibrated, best calibrated valid epoch H@1 / MRR (epoch)"]
    rows = []
    for run in runs:
        last, cal = run.selection("last_epoch"), run.calibrated("last_epoch")
        best = run.calibrated("best_calibrated_valid_epoch")
        factors = ((run.results or {}).get("last_epoch") or {}).get("calibrated", {}).get("factors", {})
        rows.append([f"`{run.spec.name}`", run.spec.row, run.status,
                     "-" if last is None else f"{_num(last['avg']['hits@1'])} / {_num(last['avg']['mrr'])}",
                     "-" if cal is None else f"{_num(cal['avg']['hits@1'])} / {_num(cal['avg']['mrr'])}",
                     " / ".join(f"{m} {f:g}" for m, f in factors.items()) or "-",
                     "-" if best is None else
                     f"{_num(best['avg']['hits@1'])} / {_num(best['avg']['mrr'])} ({best['epoch']})"])
    return ["Calibrated weights (`--calibrate_weights`): at every evaluation one factor per modality multiplies "
            "every entity's router weights, fitted to the validation links' MRR (ranked among themselves and "
            "1,000 test entities per side); the test pairs are then ranked "
            "under the calibrated weights. The training is that of the run without the flag (docs/accuracy.md, "
            "'Calibrating the weights on validation links').", "", *_md_table(header, rows), ""]


def iterative_section(runs: list[Run], show_valid: bool) -> list[str]:
    cells = {(r.spec.dataset, r.spec.rate): r for r in runs if r.spec.table == "il"}
    out = ["## Iterative training (`--il`, +500 epochs of mutual-nearest-neighbour pseudo pairs)", "",
           "The paper prints no iterative numbers (\"reported in the code repository\"); the reference rows are "
           "the official iterative logs at their best test epoch, whose pseudo-label file was never published.",
           ""]
    out += _grid_table(cells, [("official log, iterative (best test epoch)", OFFICIAL_IL)], show_valid)
    out += ["", _run_names_line(cells), "", PARTIAL_NOTE, ""]
    stats = []
    for _, run in sorted(cells.items()):
        s = pseudo_label_stats(run) if run.finished else None
        if s is None:
            stats.append([f"`{run.spec.name}`", "missing" if not run.finished else "-", "-"])
        else:
            stats.append([f"`{run.spec.name}`", str(s[0]), _num(s[1] / s[0]) if s[0] else "-"])
    out += ["The pseudo pairs of the last iterative epoch and their precision (the gold links are read only "
            "to log this; the selection never sees them):", "",
            *_md_table(["run", "pseudo pairs", "precision"], stats), ""]
    return out


def fig3_epochs(runs: list[Run]) -> int:
    """The epochs of Figure 3's sweep: FIG3_SHORT_EPOCHS when a finished point trained that many, else the
    paper's."""
    done = {(r.config or {}).get("epochs") for r in runs if r.spec.table == "fig3" and r.finished}
    return FIG3_SHORT_EPOCHS if FIG3_SHORT_EPOCHS in done else PAPER_EPOCHS


def first_epochs(run: Run, epochs: int) -> Run:
    """``run`` as it stood after ``epochs`` epochs, from its evaluations: the last epoch is the one at
    ``epochs`` and the best TEST epoch the highest test MRR up to it. Unfinished (no numbers) when the
    evaluations do not reach it."""
    evals = [m for m in run.metrics if "test" in m and m["epoch"] <= epochs]
    at = next((m for m in evals if m["epoch"] == epochs), None)
    if at is None:
        return dataclasses.replace(run, results=None)
    avg = lambda m: m["test"]["avg"] if "avg" in m["test"] else m["test"]  # noqa: E731 (records keep the avg)
    best = max(evals, key=lambda m: avg(m)["mrr"])
    results = {**run.results, "last_epoch": {"epoch": epochs, "test": {"avg": avg(at)}},
               "best_test_epoch": {"epoch": best["epoch"], "test": {"avg": avg(best)}}}
    return dataclasses.replace(run, results=results)


def fig3_points(runs: list[Run], by_name: dict[str, Run]) -> dict[str, list[tuple[float, Run, bool]]]:
    """param -> [(value, run, is_default)], sorted by value; the default point is BASE_RUN (its first
    FIG3_SHORT_EPOCHS epochs when the sweep trained that many)."""
    points: dict[str, list] = {p: [] for p in FIG3_PARAMS}
    for r in runs:
        if r.spec.table != "fig3":
            continue
        param, value = r.spec.fig3_point()
        if r.config and param in r.config:
            value = float(r.config[param])
        points.setdefault(param, []).append((value, r, False))
    base = by_name.get(BASE_RUN)
    epochs = fig3_epochs(runs)
    if base is not None and base.finished and epochs != (base.config or {}).get("epochs", PAPER_EPOCHS):
        base = first_epochs(base, epochs)
    if base is not None:
        for param in points:
            value = (base.config or {}).get(param, FIG3_DEFAULTS[param])
            points[param].append((float(value), base, True))
    return {p: sorted(v, key=lambda t: t[0]) for p, v in points.items()}


def fig3_section(points, figure: str | None, skipped: str | None, epochs: int = PAPER_EPOCHS) -> list[str]:
    short = (f" **Each point trained {epochs} epochs, not the paper's {PAPER_EPOCHS}** (the paper preset's best "
             f"test epoch is near 340), and the default point is `{BASE_RUN}` as it stood at epoch {epochs}: "
             f"'last' is epoch {epochs} and 'best TEST' the best up to it." if epochs != PAPER_EPOCHS else "")
    out = ["## Figure 3: hyper-parameter sensitivity (FB15K-DB15K 20%)", "",
           "Each swept flag is changed alone from the Table 1 run's values; the default point is "
           f"`{BASE_RUN}`. The paper gives this figure as a plot only (no printed numbers)." + short, ""]
    if figure:
        out += [f"![Figure 3]({figure})", ""]
    elif skipped:
        out += [f"*Figure skipped: {skipped}*", ""]
    header = ["parameter", "value", "run", "last H@1", "last MRR", "best-TEST* H@1", "best-TEST* MRR"]
    rows = []
    for param, pts in points.items():
        for value, run, default in pts:
            last = _ours_cells(run, "last_epoch", ("hits@1", "mrr")) or ["-", "-"]
            best = _ours_cells(run, "best_test_epoch", ("hits@1", "mrr")) or ["-", "-"]
            rows.append([FIG3_PARAMS.get(param, param), f"{value:g}" + (" (default)" if default else ""),
                         f"`{run.spec.name}`", *last[:2], *best[:2]])
    return out + _md_table(header, rows) + [""] + fig3_reading(points)


def fig3_reading(points) -> list[str]:
    """The paper's reading of each sweep beside what the finished points show: the range of their best-TEST
    and last Hits@1, with the value at each end."""
    def spread(pts, key):
        cells = [(sel["avg"]["hits@1"], value) for value, run, _ in pts if (sel := run.selection(key)) is not None]
        if not cells:
            return "-"
        (lo, at_lo), (hi, at_hi) = min(cells), max(cells)
        if len(cells) == 1:
            return f"{_num(hi)} ({at_hi:g}) only"
        return f"{_num(lo)} ({at_lo:g}) to {_num(hi)} ({at_hi:g}), range {hi - lo:.3f}"
    rows = []
    for param, pts in points.items():
        done = sum(run.finished for _, run, _ in pts)
        rows.append([FIG3_PARAMS.get(param, param), FIG3_PAPER_READING.get(param, "-"), f"{done} of {len(pts)}",
                     spread(pts, "best_test_epoch"), spread(pts, "last_epoch")])
    header = ["parameter", "the paper's reading (its text after Figure 3)", "points finished",
              "ours: best-TEST* H@1, lowest (value) to highest (value)", "ours: last H@1, lowest to highest"]
    return (["The paper's reading beside ours (the default point counts as one of each sweep; docs/accuracy.md "
             "has the curves, per-modality figures and a reading per sweep):", ""] + _md_table(header, rows) + [""])


def loss_rise_between_evaluations(metrics: list[dict], start: int = STABLE_FROM) -> float | None:
    """The largest ratio of one evaluation's training loss per pair to the previous one's, on the same pairs
    (pair_version), from epoch ``start`` on; None without two such evaluations."""
    rises, prev = [], None
    for m in metrics:
        if "loss" not in m or m["epoch"] < start:
            continue
        here = (m.get("pair_version", 0), m["loss"] / m.get("train_pairs", 1))
        if prev is not None and prev[0] == here[0] and prev[1] > 0:
            rises.append(here[1] / prev[1])
        prev = here
    return max(rises) if rises else None


def stability_section(runs: list[Run], earlier: dict[str, list[Run]] | None = None) -> list[str]:
    """Per finished run: the peak and the last epoch, the largest loss rise between evaluations, the largest
    from one epoch to the next (--spike_guard's loss_rise_max), the guard's rollbacks and the brake's events;
    beneath it, the earlier runs of the same line that it superseded (``earlier``, by name)."""
    earlier = earlier or {}
    rows = []
    listed = []
    for r in runs:
        if r.alias_of:
            continue
        if r.finished:
            listed.append((r, f"`{r.spec.name}`"))
        listed += [(o, f"`{o.spec.name}` (earlier run {i}, superseded)")
                   for i, o in enumerate(earlier.get(r.spec.name, []), 1)]
    for r, label in listed:
        res, metrics = r.results, r.metrics
        best, last = r.selection("best_test_epoch"), r.selection("last_epoch")
        rise = loss_rise_between_evaluations(metrics)
        per_epoch = [m["loss_rise_max"] for m in metrics if "loss_rise_max" in m and m["epoch"] >= STABLE_FROM]
        guard, brake = res.get("spike_guard"), res.get("table_brake")
        rows.append([label, f"{_num(best['avg']['hits@1'])} @{best['epoch']}" if best else "-",
                     _num(last["avg"]["hits@1"]) if last else "-",
                     f"x{rise:.3f}" if rise is not None else "not recorded",
                     f"x{max(per_epoch):.3f}" if per_epoch else "-",
                     str(len(guard["rollbacks"])) if guard else "(before the guard)",
                     str(len(brake["events"])) if brake else "(before the brake)"])
    if not rows:
        return []
    return ["## Stability", "",
            f"Every finished run, from epoch {STABLE_FROM} on: the largest rise of the training loss per pair from "
            "one evaluation to the next on the same pairs (a spike shows as x1.2 or more; a run without one stays "
            "near x1.0), the largest from one epoch to the next where the spike guard recorded it, and how often "
            "the guard rolled back (`--spike_guard`) and the brake slowed the entity table (`--table_brake`). "
            "Peak = best test epoch."
            + (" A run marked 'earlier run, superseded' is a previous run of the line above it, replaced by a "
               "fresh run of the same command; its record is kept in the records' `superseded/` folder."
               if any(earlier.values()) else ""), "",
            *_md_table(["run", "peak H@1", "last H@1", "loss rise between evaluations", "loss rise per epoch",
                        "rollbacks", "brakes"], rows), ""]


def runs_section(runs: list[Run]) -> list[str]:
    header = ["run", "table", "row", "paper H@1", "status", "dataset", "rate", "epochs", "train s", "protocol"]
    rows = []
    for r in runs:
        c = r.config or {}
        epochs = "-"
        if c:
            epochs = str(c["epochs"]) + (f" + {c.get('il_epochs')} il" if c.get("il") else "")
        secs = (r.results or {}).get("train_seconds")
        why = r.smoke_reasons()
        protocol = ("SMOKE: " + "; ".join(why)) if why else ("paper" if c else "-")
        rows.append([f"`{r.spec.name}`", r.spec.table, r.spec.row, r.spec.expected, r.status,
                     r.dataset_name if c else "-", str(c.get("rate", "-")), epochs,
                     f"{secs:.0f}" if secs is not None else "-", protocol])
    out = ["## Runs", "", "Every line of run_all.sh, its folder's state and its configuration (from config.json).", "",
           *_md_table(header, rows), "", "Commands (as run_all.sh recorded them in `command.txt`, otherwise the "
           "equivalent `train.py` flags from config.json):", "", "```"]
    out += [r.command_line() for r in runs]
    return out + ["```", ""]


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib imported lazily).
# ---------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_fig3(plt, points, path: Path, epochs: int = PAPER_EPOCHS) -> None:
    """One panel per swept flag: Hits@1 and MRR against its value (last epoch solid, best TEST
    epoch dashed); the planned values without a finished run are listed as missing."""
    params = list(points)
    ncols = 3
    nrows = math.ceil((len(params) + 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.5 * nrows), squeeze=False)
    flat = list(axes.flat)
    handles = None
    for ax, param in zip(flat, params):
        planned = [v for v, _, _ in points[param]]
        done = [(v, r) for v, r, _ in points[param] if r.finished]
        missing = [v for v, r, _ in points[param] if not r.finished]
        ax.set_title(FIG3_PARAMS.get(param, param))
        ax.set_xlabel(param)
        log_x = param != "n_exp" and planned and min(planned) > 0
        if log_x:
            ax.set_xscale("log")
        if planned:
            lo, hi = min(planned), max(planned)
            ax.set_xlim((lo / 1.6, hi * 1.6) if log_x else (lo - 0.5, hi + 0.5))
            ax.set_xticks(planned)
            ax.set_xticklabels([f"{x:g}" for x in planned])
            ax.minorticks_off()
        for v, _, default in points[param]:
            if default:
                ax.axvline(v, color="grey", linestyle=":", linewidth=1)
        if done:
            xs = [v for v, _ in done]
            for key, style, label in (("last_epoch", "-", "last epoch"), ("best_test_epoch", "--", "best TEST*")):
                for metric, marker, colour in (("hits@1", "o", "tab:blue"), ("mrr", "s", "tab:orange")):
                    ys = [r.selection(key)["avg"][metric] for _, r in done]
                    ax.plot(xs, ys, style, marker=marker, color=colour, alpha=1.0 if style == "-" else 0.45,
                            label=f"{'Hits@1' if metric == 'hits@1' else 'MRR'}, {label}")
            handles = ax.get_legend_handles_labels()
        if missing:
            ax.text(0.02, 0.02, "missing: " + ", ".join(f"{v:g}" for v in missing), transform=ax.transAxes,
                    fontsize=7, color="firebrick")
        if not done:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel("test score")
        ax.grid(alpha=0.3)
    legend_ax = flat[len(params)]
    legend_ax.axis("off")
    if handles:
        legend_ax.legend(*handles, loc="center", fontsize=9, title="dotted line: default (Table 1 run)",
                         title_fontsize=8)
    for ax in flat[len(params) + 1:]:
        ax.axis("off")
    smoke = any(r.smoke_reasons() for pts in points.values() for _, r, _ in pts if r.finished)
    fig.suptitle("Figure 3: hyper-parameter sensitivity, FB15K-DB15K 20%"
                 + (f", {epochs} epochs per point (paper: {PAPER_EPOCHS})" if epochs != PAPER_EPOCHS else "")
                 + ("  (SMOKE RUNS, not paper numbers)" if smoke else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short_name(name: str, width: int = 28) -> str:
    name = name.strip("<>")
    if "/" in name and not name.startswith("/m/"):
        name = name.rstrip("/").rsplit("/", 1)[-1]
    return name if len(name) <= width else name[:width - 1] + "…"


def _read_predictions(path: Path) -> list[dict]:
    lines = _lines(path)
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, l.split("\t"))) for l in lines[1:]]


def choose_entities(weights: np.ndarray, predictions: list[dict], n: int = 4) -> list[dict]:
    """A few test pairs whose router weights differ: for the modalities in order of decreasing
    spread, the correctly aligned test entity that weighs that modality most (deterministic)."""
    rows = [p for p in predictions if p.get("correct") == "1"] or predictions
    if not rows:
        return []
    ids = np.array([int(p["left_id"]) for p in rows])
    w = weights[ids]  # (C, M)
    order = np.argsort(-w.std(0), kind="stable")
    chosen: list[int] = []
    for j in range(len(order) * n):
        if len(chosen) >= min(n, len(rows)):
            break
        for idx in np.argsort(-w[:, order[j % len(order)]], kind="stable"):
            if idx not in chosen:
                chosen.append(int(idx))
                break
    return [rows[i] for i in chosen]


def gate_modality(gates, rows: np.ndarray) -> str | None:
    """The modality whose expert gates Figure 4 shows: the image MoE's, as in the paper, else (data
    without images) the one whose gates vary most between the entities ``rows`` (the mean over experts
    of each gate's standard deviation over the entities)."""
    names = [str(m) for m in gates["modalities"] if str(m) in gates.files]
    if "image" in names:
        return "image"
    spread = {m: float(np.asarray(gates[m])[rows].std(0).mean()) for m in names if np.asarray(gates[m]).ndim == 2}
    return max(spread, key=spread.get) if spread else None


def fig4_data(run: Run | None, n: int = 4):
    """(entity labels, modality names, (E, M) router weights, (E, K) gates of one modality or None, that
    modality) or a reason."""
    if run is None or not run.finished:
        return f"run `{BASE_RUN}` is missing"
    wpath, gpath = run.folder / "modality_weights.npy", run.folder / "expert_gates.npz"
    if not wpath.is_file() or not gpath.is_file():
        return f"`{run.spec.name}` has no modality_weights.npy / expert_gates.npz"
    weights = np.load(wpath)  # (N, M)
    gates = np.load(gpath)
    modalities = [str(m) for m in gates["modalities"]]
    preds = _read_predictions(run.folder / "predictions.tsv")
    chosen = choose_entities(weights, preds, n)
    if not chosen:
        return f"`{run.spec.name}` has no predictions.tsv rows to pick entities from"
    ids, labels = [], []
    for p in chosen:
        ids += [int(p["left_id"]), int(p["gold_right_id"])]
        labels += [f"{_short_name(p['left_name'])} (KG1)", f"{_short_name(p['gold_right_name'])} (KG2)"]
    test_rows = np.array([int(p["left_id"]) for p in preds] + [int(p["gold_right_id"]) for p in preds])
    shown = gate_modality(gates, test_rows)
    return labels, modalities, weights[ids], (gates[shown][ids] if shown else None), shown  # (E, M), (E, K)


def draw_fig4(plt, data, path: Path, smoke: bool) -> None:
    labels, modalities, w, img, shown = data
    ncols = 2 if img is not None else 1
    widths = [len(modalities), img.shape[1]] if img is not None else [len(modalities)]
    fig, axes = plt.subplots(1, ncols, figsize=(3.2 + 0.9 * sum(widths), 0.5 * len(labels) + 1.8),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    panels = [(w, modalities, "router weights per modality (Eq. 11)")]
    if img is not None:
        panels.append((img, [f"e{k + 1}" for k in range(img.shape[1])], f"{shown}-MoE expert gates (Eq. 7)"))
    for i, (ax, (mat, xt, title)) in enumerate(zip(axes[0], panels)):
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(float(mat.max()), 1e-9), aspect="auto")
        ax.set_xticks(range(len(xt)))
        ax.set_xticklabels(xt, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels if i == 0 else [])
        ax.set_title(title, fontsize=10)
        for (r, c), v in np.ndenumerate(mat):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 * mat.max() else "black")
    fig.suptitle("Figure 4: modality weights of test pairs" + ("  (SMOKE RUN, not paper numbers)" if smoke else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig4_section(data, figure: str | None, skipped: str | None) -> list[str]:
    out = ["## Figure 4: router weights and expert gates of a few test pairs", "",
           f"From `{BASE_RUN}` (modality_weights.npy, expert_gates.npz, names from predictions.tsv). The entities "
           "are correctly aligned test pairs that weigh different modalities most; darker = larger weight. The "
           "paper shows the image MoE's gates; on data without images the gates shown are those of the "
           "modality whose gates vary most between the test entities.", ""]
    if isinstance(data, str):
        return out + [f"*Figure 4 not drawn: {data}*", ""]
    if figure:
        out += [f"![Figure 4]({figure})", ""]
    elif skipped:
        out += [f"*Figure skipped: {skipped}*", ""]
    labels, modalities, w, img, shown = data
    short = "img" if shown == "image" else shown
    header = ["entity", *modalities] + ([f"{short} e{k + 1}" for k in range(img.shape[1])] if img is not None else [])
    rows = [[lab, *[f"{v:.3f}" for v in w[i]], *([f"{v:.3f}" for v in img[i]] if img is not None else [])]
            for i, lab in enumerate(labels)]
    return out + _md_table(header, rows) + [""]


# ---------------------------------------------------------------------------------------------
# The page.
# ---------------------------------------------------------------------------------------------


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def status_lines(runs: list[Run]) -> list[str]:
    """What is done, what is left and what a run costs here: the median training time per epoch of the finished
    runs of the same dataset and rate, times the epochs a run left will train (the iterative lines 1.5 times
    the paper's, Figure 3's points fig3_epochs)."""
    per_epoch: dict[tuple[str, float], list[float]] = {}
    for r in runs:
        secs = (r.results or {}).get("train_seconds")
        epochs = (r.config or {}).get("epochs")
        whole = bool(epochs) and ((r.results or {}).get("last_epoch") or {}).get("epoch") == epochs
        own = r.finished and not r.alias_of
        if own and secs and whole and not (r.config or {}).get("il") and not r.smoke_reasons():
            per_epoch.setdefault((r.spec.dataset, r.spec.rate), []).append(float(secs) / epochs)
    to_train = {"il": 1.5 * PAPER_EPOCHS, "fig3": fig3_epochs(runs)}
    rows = []
    for table in TABLES:
        mine = [r for r in runs if r.spec.table == table]
        left = [r for r in mine if not r.finished]
        estimate = []
        for r in left:
            seen = per_epoch.get((r.spec.dataset, r.spec.rate))
            if seen:
                estimate.append(float(np.median(seen)) * to_train.get(table, PAPER_EPOCHS))
        known = f"{_hours(sum(estimate))}" + (f" for {len(estimate)} of them" if len(estimate) < len(left) else "")
        rows.append([table, f"{len(mine) - len(left)} of {len(mine)}",
                     ", ".join(f"`{r.spec.name}`" for r in left) if len(left) <= 4 else f"{len(left)} runs",
                     known if estimate else ("-" if not left else "not measured yet")])
    per = "; ".join(f"{DATASET_LABEL[d]} {rate:.0%} {_hours(float(np.median(v)) * PAPER_EPOCHS)}"
                    for (d, rate), v in sorted(per_epoch.items()))
    return ["## Status", "", *_md_table(["table", "done", "left", "time left here (one run at a time)"], rows), "",
            f"A {PAPER_EPOCHS}-epoch run costs here (the median training time per epoch of the finished runs, one "
            f"thread beside another run on a 2-core CPU without a GPU): {per or 'nothing measured yet'}. "
            "`bash run_all.sh --list` shows each command with todo / done / done (record) / resume.", ""]


def preset_lines(finished: list[Run]) -> list[str]:
    """Which method the finished runs are (their config's --preset): the paper's or the official code's."""
    presets = sorted({(r.config or {}).get("preset", "paper") for r in finished})
    if not presets:
        return []
    what = {"paper": "the paper's method", "official": "the official code's variant, every departure of "
            "docs/departures.md switched on"}
    return ["Preset: " + "; ".join(f"`--preset {p}` ({what.get(p, p)})" for p in presets) +
            (". **The runs mix presets.**" if len(presets) > 1 else "."), ""]


def read_notes(path: Path) -> list[str]:
    """The Notes of a results page, kept in a Markdown file of their own (docs/results_notes.md) so that the
    page's command rebuilds it: each note is a ``- `` bullet, wrapped onto indented lines that join it with one
    space; ``#`` headings, blank lines and the text before the first note (what the file is) are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the notes file ({e.strerror})") from None
    notes: list[str] = []
    within = False  # the line above is a note's
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            within = False
        elif line.startswith("- "):
            notes.append(line[2:].strip())
            within = True
        elif line[0].isspace() and within:
            notes[-1] += " " + line.strip()
        elif notes:
            raise ValueError(f"{path} line {lineno}: expected a note ('- ' at the start of the line), an "
                             f"indented line continuing the note above it, a '#' heading or a blank line, got: "
                             f"{line.strip()[:60]!r}")
    return notes


def build_report(runs_dir: Path, out: Path, figures: Path | None = None, run_all: Path = RUN_ALL,
                 notes: list[str] = (), command: str | None = None, records_dir: Path | None = None,
                 save_records_to: Path | None = None, readme: Path | None = None) -> str:
    specs = load_run_list(run_all)
    runs = without_images_alias([Run.load(s, runs_dir, records_dir) for s in specs])
    if save_records_to is not None:
        save_records(runs, save_records_to)
    by_name = {r.spec.name: r for r in runs}
    finished = [r for r in runs if r.finished]
    smoke = [r for r in finished if r.smoke_reasons()]
    out = Path(out)

    plt = _pyplot() if figures is not None else None
    skipped = None
    if figures is None:
        skipped = "no --figures folder given"
    elif plt is None:
        skipped = "matplotlib is not installed (pip install matplotlib, or pip install -e \".[plot]\")"
    points = fig3_points(runs, by_name)
    f4 = fig4_data(by_name.get(BASE_RUN))
    fig3_rel = fig4_rel = None
    if plt is not None:
        figures = Path(figures)
        figures.mkdir(parents=True, exist_ok=True)
        rel = Path(_relpath(figures, out.parent))
        draw_fig3(plt, points, figures / "fig3_hyperparameters.png", fig3_epochs(runs))
        fig3_rel = (rel / "fig3_hyperparameters.png").as_posix()
        if not isinstance(f4, str):
            draw_fig4(plt, f4, figures / "fig4_modality_weights.png", bool(by_name[BASE_RUN].smoke_reasons()))
            fig4_rel = (rel / "fig4_modality_weights.png").as_posix()

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Results", "",
             f"Generated {stamp} by `{command or 'python -m data_process.report'}` from the run folders under "
             f"`{runs_dir}/`: every number of ours is read from a run's results.json (the paper's numbers are "
             "constants in data_process/report.py)"
             + (f", or, for a run whose folder is gone, from its record in `{records_dir}/` (status "
                "'finished (record)')" if records_dir is not None else "")
             + ". A run without either shows as **missing**.",
             f"{len(finished)} of {len(runs)} runs of run_all.sh are finished.", ""]
    lines += status_lines(runs)
    lines += preset_lines(finished)
    if smoke:
        datasets = sorted({r.dataset_name for r in smoke})
        epochs = sorted({r.total_epochs for r in smoke})
        lines += [f"> **SMOKE PASS: {len(smoke)} of the {len(finished)} finished runs do not follow the paper's "
                  f"protocol** (dataset {', '.join(datasets)}; {' or '.join(map(str, epochs))} epochs per run, "
                  "iterative ones included). "
                  "Their numbers, marked †, only show that the pipeline runs end to end; they are **not** "
                  "reproductions of the paper's numbers. See the Runs section for each run's dataset and epochs.",
                  ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    lines += [TEST_RULE_NOTE, ""]
    if not any(r.selection("best_valid_epoch") for r in finished):
        lines += ["No run holds out a validation split (`--val_ratio 0`, the paper's protocol), so there are no "
                  "validation-selected rows.", ""]
    if smoke:
        lines += ["† smoke run (dataset or epochs differ from the paper's protocol; see Runs).", ""]
    # The validation-selected rows appear only when some run held out a validation split.
    show_valid = any(r.selection("best_valid_epoch") for r in finished)
    lines += table1_section(runs, show_valid)
    lines += table2_section(runs, by_name)
    lines += seeds_section(runs, by_name, show_valid)
    lines += valid_section(runs)
    lines += iterative_section(runs, show_valid)
    lines += fig3_section(points, fig3_rel, skipped, fig3_epochs(runs))
    lines += fig4_section(f4, fig4_rel, skipped)
    lines += stability_section(runs, superseded_runs(specs, records_dir))
    lines += runs_section(runs)
    text = "\n".join(lines).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    if readme is not None:
        splice_readme(readme, readme_summary(runs))
    return text


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(Path(target).resolve(), Path(start).resolve())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Write the results page (Table 1, 2, iterative, Figure 3, 4) "
                                            "from run folders.")
    p.add_argument("--runs", default="runs", help="parent folder of the run folders (run_all.sh --out_dir)")
    p.add_argument("--out", default="docs/results.md", help="markdown file to write")
    p.add_argument("--figures", default=None, help="folder for the PNG figures (needs matplotlib); "
                                                   "without it the figures are skipped")
    p.add_argument("--run_all", default=str(RUN_ALL), help="run_all.sh whose RUN_TABLE lists the runs")
    p.add_argument("--notes", default=None, help="a Markdown file of the page's notes, one '- ' bullet each "
                                                 "(docs/results_notes.md for docs/results.md)")
    p.add_argument("--note", action="append", default=[], help="one more note, after those of --notes "
                                                               "(repeatable)")
    p.add_argument("--records", default=None, help="folder of run records (docs/records; docs/records/official for "
                                                   "the official preset): a run whose folder has no results.json "
                                                   "is read from <records>/<name>.json")
    p.add_argument("--readme", default=None, help="also rewrite this README's results table (the block between "
                                                  f"'{README_BEGIN}' and '{README_END}')")
    p.add_argument("--save_records", action="store_true", help="first write <records>/<name>.json for every "
                                                               "finished run folder (needs --records)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    shown, skip = [], False
    for a in argv:  # the notes are printed in the page itself
        if skip:
            shown.append("'...'")
        elif a != "--note":
            shown.append(shlex.quote(a))
        else:
            shown.append(a)
        skip = a == "--note"
    command = "python -m data_process.report " + " ".join(shown)
    if args.save_records and not args.records:
        print("error: --save_records needs --records DIR", file=sys.stderr)
        return 2
    records = Path(args.records) if args.records else None
    try:
        notes = (read_notes(Path(args.notes)) if args.notes else []) + args.note
        text = build_report(Path(args.runs), Path(args.out), Path(args.figures) if args.figures else None,
                            Path(args.run_all), notes, command, records, records if args.save_records else None,
                            Path(args.readme) if args.readme else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = re.search(r"(\d+ of \d+ runs) of run_all.sh are finished", text)
    print(f"wrote {args.out} ({counts.group(1)} finished"
          + (f"; figures in {args.figures})" if args.figures else "; no figures)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
