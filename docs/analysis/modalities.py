"""What each modality does in a run, read from its evaluations: the router's mean weight and the health
monitor's Hits@1 of each modality alone on its 1,000 test and 1,000 training pairs (each ranked among the
sample's 1,000 candidates, so higher than on the full test set), beside the run's test Hits@1. Made for the
reading of Table 2 (docs/accuracy.md, "Table 2"): which modality carries over and which only fits the seeds.

    python docs/analysis/modalities.py t1_db_20 t2_db_20_wo_r_b t2_db_20_wo_r_t    # the last epoch of each
    python docs/analysis/modalities.py t1_db_20 t2_db_20_wo_r_t --epoch 300
    python docs/analysis/modalities.py t2_db_20_wo_r_t --curve 100,300,500,1000

A NAME is a run folder under --runs (finished or not) or, without one, the run's record under --records
(docs/records/NAME.json: the records keep these numbers); a path to a folder or to a record file works too.
Each cell is weight / test Hits@1 / training Hits@1 of the modality (- where the run has it switched off).
It reads and writes nothing else.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_process.report import read_record  # noqa: E402  (the repository root is on the path only now)
from utils import MODALITIES, DataError  # noqa: E402

NAN = float("nan")  # a number the evaluation lacks


def evaluations(name: str, runs: Path, records: Path) -> list[dict]:
    """The run's evaluations, each as {epoch, test_hits1, weight {m: w}, test {m: h}, train {m: h}}."""
    path = Path(name)
    folder = path if path.is_dir() else runs / name
    record = path if path.suffix == ".json" and path.is_file() else records / f"{name}.json"
    if (folder / "metrics.jsonl").is_file():
        lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        raw = [json.loads(line) for line in lines if line.strip()]
        health = lambda m: m.get("health") or {}  # noqa: E731
    elif record.is_file():
        raw = read_record(record)[2] or []
        health = lambda m: m  # noqa: E731  (a record keeps the health monitor's weight and hits1 at the top)
    else:
        raise DataError(f"{name}: neither {folder / 'metrics.jsonl'} nor {record} exists; expected a run folder "
                        "or a record (docs/records/<name>.json)")
    out = []
    for m in raw:
        h = health(m)
        if "test" not in m or not h.get("hits1"):
            continue
        test = m["test"].get("avg", m["test"])
        out.append({"epoch": m["epoch"], "test_hits1": test["hits@1"], "weight": h.get("weight") or {},
                    "test": h["hits1"].get("test", {}), "train": h["hits1"].get("train", {})})
    if not out:
        raise DataError(f"{name}: no evaluation with the health monitor's numbers")
    return out


def at_epoch(evals: list[dict], epoch: str, name: str) -> dict:
    if epoch == "last":
        return evals[-1]
    found = [e for e in evals if e["epoch"] == int(epoch)]
    if not found:
        raise DataError(f"{name}: no evaluation at epoch {epoch}; it has {evals[0]['epoch']} to {evals[-1]['epoch']}")
    return found[0]


def table(rows: list[tuple[str, dict]]) -> list[str]:
    """Markdown: one line per (label, evaluation); a column per modality present in any of them."""
    shown = [m for m in MODALITIES if any(m in e["test"] for _, e in rows)]
    header = ["run", "epoch", "test H@1", *shown, "fused (test / train)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, e in rows:
        cells = []
        for m in shown:
            if m not in e["test"]:
                cells.append("-")
                continue
            w = e["weight"].get(m)
            weight = "-" if w is None else f"{w:.2f}"
            cells.append(f"{weight} / {e['test'][m]:.3f} / {e['train'].get(m, NAN):.3f}")
        fused = f"{e['test'].get('fused', NAN):.3f} / {e['train'].get('fused', NAN):.3f}"
        lines.append("| " + " | ".join([label, str(e["epoch"]), f"{e['test_hits1']:.4f}", *cells, fused]) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", help="run names (a folder under --runs, else a record), or paths")
    p.add_argument("--epoch", default="last", help="the evaluation to show: 'last' or an epoch number")
    p.add_argument("--curve", default="", help="epochs, e.g. 100,300,1000: a line per epoch of one run")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="the run folders' parent")
    p.add_argument("--records", type=Path, default=Path("docs/records"), help="the records' folder")
    args = p.parse_args(argv)
    if args.epoch != "last" and not args.epoch.isdigit():
        p.error(f"--epoch {args.epoch}: expected 'last' or an epoch number")
    try:
        if args.curve:
            if len(args.names) != 1:
                raise DataError(f"--curve shows one run; got {len(args.names)}")
            epochs = [e.strip() for e in args.curve.split(",")]
            if not all(e.isdigit() for e in epochs):
                raise DataError(f"--curve {args.curve}: expected epoch numbers separated by commas")
            evals = evaluations(args.names[0], args.runs, args.records)
            rows = [(args.names[0], at_epoch(evals, e, args.names[0])) for e in epochs]
        else:
            rows = [(n, at_epoch(evaluations(n, args.runs, args.records), args.epoch, n)) for n in args.names]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(table(rows)))
    print("\neach modality: router weight / Hits@1 alone on the health monitor's 1,000 test / 1,000 training pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
