"""Which of the official code's departures carry its numbers: short runs of both presets, the
official preset with one choice switched back to the paper's (o_*), and the paper preset with one of
the official choices switched on (p_*).

    python docs/analysis/departures.py list                      # the variants and their commands
    python docs/analysis/departures.py run official o_ffn --epochs 100
    python docs/analysis/departures.py run --epochs 300          # every variant, one after the other
    python docs/analysis/departures.py table --also paper=runs/t1_db_20

Every run is FB15K-DB15K 20%, seed 42, no images (the dataset's own modalities), evaluated every 10
epochs, into runs/departures/<variant>. ``run`` skips a variant that has reached ``--epochs``,
resumes an interrupted one from its checkpoint (to its own number of epochs) and extends a
finished shorter one (train.py --resume --extend_to); there is no learning-rate schedule, so a
run's first N epochs are the same whatever its total. ``table`` prints test Hits@1 / MRR at
epochs 10, 20, 50, 100 and 300 from each folder's metrics.jsonl, the change in Hits@1 from the
variant's reference preset at the last of those epochs both have (and at epoch 100 beside it when
that one is later), and the mean learned modality
weights (health sample) at the variant's last one; ``--also NAME=FOLDER`` reads a variant from
another run folder (e.g. paper=runs/t1_db_20, the paper preset's 1000-epoch run, which has this
configuration).
Run from the repository root.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--file_dir", "data/mmkb-datasets/FB15K_DB15K", "--rate", "0.2", "--fusion_weight_dim", "512",
        "--seed", "42", "--check_point", "10"]
EPOCHS = (10, 20, 50, 100, 300)
OFFICIAL_LOG = {10: 0.184, 20: 0.325, 50: 0.438, 100: 0.492, 300: 0.510}  # WITH images, Hits@1 only

# name: (reference preset, what changes, flags). The paper's choice for each official one is
# the paper preset's value of the same fields (utils.PRESETS, docs/departures.md).
VARIANTS = {
    "official": (None, "official preset", ["--preset", "official"]),
    "o_ffn": ("official", "paper's FFN experts with Graph-MoE (residual, LayerNorm input, dropout 0.5)",
              ["--preset", "official", "--expert", "ffn", "--graph_moe", "--graph_residual",
               "--moe_input_norm", "layernorm", "--expert_dropout", "0.5"]),
    "o_entity": ("official", "paper's per-entity router (with its balance term)",
                 ["--preset", "official", "--router", "entity", "--router_balance", "10"]),
    "o_no_curriculum": ("official", "no curriculum", ["--preset", "official", "--no-curriculum"]),
    "o_paper_distill": ("official", "paper's distillation (unimodal teacher, weight al_loss once)",
                        ["--preset", "official", "--distill_direction", "paper"]),
    "o_sum": ("official", "plain sum of the unimodal losses", ["--preset", "official", "--loss_weighting", "sum"]),
    "o_all_pairs": ("official", "CLUB on all expert pairs", ["--preset", "official", "--club", "all_pairs"]),
    "o_l2": ("official", "every feature row L2-normalised", ["--preset", "official", "--feature_norm", "l2"]),
    "o_mask": ("official", "missing modalities masked", ["--preset", "official", "--missing", "mask"]),
    "paper": (None, "paper preset", []),
    "p_random_pair": ("paper", "CLUB on one random expert pair", ["--club", "random_pair"]),
    "p_joint_teacher": ("paper", "fused teacher, weight al_loss squared", ["--distill_direction", "joint_teacher"]),
    "p_uncertainty": ("paper", "learned uncertainty weights", ["--loss_weighting", "uncertainty"]),
    "p_curriculum": ("paper", "curriculum", ["--curriculum"]),
    "p_global": ("paper", "official global weights over 7 combinations",
                 ["--router", "global", "--router_balance", "0"]),
    "p_linear": ("paper", "official linear noisy experts, no Graph-MoE",
                 ["--expert", "linear", "--no-graph_moe", "--no-graph_residual", "--moe_input_norm", "none",
                  "--expert_dropout", "0"]),
    "p_raw_bow": ("paper", "bag-of-words rows raw (text L2)", ["--feature_norm", "official"]),
    "p_fill": ("paper", "missing modalities filled (random text, zero BOW)", ["--missing", "fill"]),
}


def train_flags(name: str, epochs, out_dir: Path) -> list[str]:
    """train.py's flags for a fresh run of variant ``name`` in out_dir/name."""
    return [*BASE, *VARIANTS[name][2], "--epochs", str(epochs), "--out_dir", str(out_dir), "--run_name", name]


def command(name: str, epochs: int, out_dir: Path) -> list[str]:
    """The train.py command that brings variant ``name`` to ``epochs`` epochs in out_dir/name: extend a
    finished run, resume an interrupted one (to its own number of epochs), or start one."""
    run = out_dir / name
    if (run / "results.json").is_file():
        return [sys.executable, "train.py", "--resume", str(run), "--extend_to", str(epochs)]
    if (run / "checkpoint.pt").is_file():
        return [sys.executable, "train.py", *train_flags(name, config_epochs(run) or epochs, out_dir),
                "--resume", str(run)]
    return [sys.executable, "train.py", *train_flags(name, epochs, out_dir)]


def history(run: Path) -> dict[int, dict]:
    """epoch -> metrics.jsonl record of a run folder ({} when there is none)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["epoch"]: r for r in records}


def last_epoch(run: Path) -> int:
    return max(history(run), default=0)


def config_epochs(run: Path) -> int | None:
    try:
        return json.loads((run / "config.json").read_text(encoding="utf-8"))["epochs"]
    except (OSError, ValueError, KeyError):
        return None


def cell(record: dict | None) -> str:
    if record is None:
        return "-"
    avg = record["test"]["avg"]
    return f"{avg['hits@1']:.3f} / {avg['mrr']:.3f}"


def weights(h: dict[int, dict]) -> str:
    """The mean learned modality weights over the health sample at the last evaluation in EPOCHS.
    With --router global a modality's weight is the sum over the combinations that contain it, so
    the weights do not sum to 1 (layers.GlobalModalityWeights)."""
    shown = [e for e in EPOCHS if e in h and "health" in h[e]]
    if not shown:
        return "-"
    w = h[shown[-1]]["health"]["weight"]
    return " ".join(f"{m} {v:.2f}" for m, v in w.items()) + f" (epoch {shown[-1]})"


def change(h: dict[int, dict], ref: dict[int, dict], epoch: int) -> str:
    """The difference in test Hits@1 from the reference at EPOCH, as the table shows it: three
    decimals, signed, and 0.000 (not -0.000) for a difference that rounds to nothing."""
    d = h[epoch]["test"]["avg"]["hits@1"] - ref[epoch]["test"]["avg"]["hits@1"]
    return ("0.000" if abs(d) < 0.0005 else f"{d:+.3f}") + f" at {epoch}"


def table(folders: dict[str, Path]) -> list[str]:
    """Markdown rows: the official log, then every variant with a folder, and the change in Hits@1
    from its reference preset at the last epoch of EPOCHS that both have (and at epoch 100 beside a
    later one: the short comparison can disagree with the long one)."""
    hist = {name: history(folder) for name, folder in folders.items()}
    out = ["| variant | change | " + " | ".join(f"epoch {e}" for e in EPOCHS)
           + " | Hits@1 vs preset | modality weights | flags |",
           "|---|---|" + "---|" * len(EPOCHS) + "---|---|---|",
           "| - | official log, WITH images (Hits@1 only) | "
           + " | ".join(f"{OFFICIAL_LOG[e]:.3f}" for e in EPOCHS) + " | | | |"]
    for name, (ref, what, flags) in VARIANTS.items():
        h = hist.get(name) or {}
        if not any(e in h for e in EPOCHS):  # not run, or not evaluated past epoch 0 yet
            continue
        delta = ""
        if ref is not None and hist.get(ref):
            common = [e for e in EPOCHS if e in h and e in hist[ref]]
            if common:
                delta = change(h, hist[ref], common[-1])
                if common[-1] > 100 and 100 in common:
                    delta += f" ({change(h, hist[ref], 100)})"
        shown = " ".join(flags).replace("--preset official", "").strip() or "-"  # the reference says the preset
        out.append(f"| `{name}` | {what} | " + " | ".join(cell(h.get(e)) for e in EPOCHS)
                   + f" | {delta} | {weights(h)} | `{shown}` |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("list", help="print the variants and their commands")
    r = sub.add_parser("run", help="run (or resume, or extend) variants one after the other")
    r.add_argument("names", nargs="*", help="variants (default: all)")
    r.add_argument("--epochs", type=int, default=100)
    t = sub.add_parser("table", help="print the markdown table from the run folders")
    t.add_argument("--also", action="append", default=[], metavar="NAME=FOLDER",
                   help="read variant NAME from FOLDER instead of runs/departures/NAME")
    for s in (r, t, sub.choices["list"]):
        s.add_argument("--out_dir", default="runs/departures", help="parent of the variants' run folders")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.what == "list":
        for name, (_, what, _) in VARIANTS.items():
            print(f"{name:16} {what}\n{'':16} python train.py {' '.join(train_flags(name, 'N', out_dir))}")
        return 0
    if args.what == "run":
        unknown = [n for n in args.names if n not in VARIANTS]
        if unknown:
            p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
        for name in args.names or list(VARIANTS):
            if (done := last_epoch(out_dir / name)) >= args.epochs:
                print(f"skip {name}: at epoch {done}")
                continue
            while (before := last_epoch(out_dir / name)) < args.epochs:  # resume, then extend if short
                cmd = command(name, args.epochs, out_dir)
                print("+ " + " ".join(cmd), flush=True)
                subprocess.run(cmd, cwd=ROOT, check=True)
                if last_epoch(out_dir / name) <= before:
                    raise SystemExit(f"{name}: no progress past epoch {before}; see {out_dir / name}/log.txt")
        return 0
    folders = {name: out_dir / name for name in VARIANTS}
    for item in args.also:
        name, _, folder = item.partition("=")
        if name not in VARIANTS or not folder:
            p.error(f"--also expects NAME=FOLDER with NAME one of {', '.join(VARIANTS)}, got {item!r}")
        folders[name] = Path(folder)
    print("\n".join(table(folders)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
