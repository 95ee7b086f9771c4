"""Speed and peak memory of one HUMEA epoch, one evaluation and the data loading, at scale.

    python tests/bench_speed.py                          # FB15K-DB15K shape, scale 1.0, CPU
    python tests/bench_speed.py --scale 0.25 --epochs 5  # a quarter of every count
    python tests/bench_speed.py --dataset large --no-eval # 100k + 100k entities, 2M triples
    python tests/bench_speed.py --device cuda --amp bf16 # GPU, experts and router under bf16 autocast

The dataset is generated once by data_process.synthetic (``fb15k_db15k_shape(scale)``, or for
``--dataset large`` a 100k + 100k pair with 2M triples and 128-d features) into ``--cache`` and
reused; generation runs in a child process so that it does not count in the peak memory.

Each phase runs ``--warmup`` times untimed, then is timed ``--repeats`` times (training:
``--epochs`` epochs); the median is reported:
  load   data_process.dataset.load_dataset + model.ModelInputs.from_data (files in the OS cache after warm-up)
  epoch  train.train_epoch: one optimiser step on all training pairs, the paper preset
         (Config defaults, --rate 0.2), CLUB on
  eval   train.evaluate on the test pairs at a check point: model.embed of the test entities,
         then utils.evaluate_alignment (CSLS k = 3, both directions, every metric); "embed" and
         "align" are those two parts timed on their own
Peak memory is the resident set size (VmHWM, reset per phase through /proc/self/clear_refs on
Linux; the process peak ru_maxrss otherwise), or torch.cuda.max_memory_allocated on a GPU.

Prints a short table and, last, one JSON line. Not collected by pytest (bench_*).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Large synthetic pair beyond the paper (issue 4): 100k + 100k entities, 2M triples (avg degree
# 2 * 1M / 100k = 20 per KG), small feature sizes so that the features fit comfortably.
LARGE = dict(n1=100_000, n2=100_000, n_links=50_000, n_relations1=1000, n_relations2=500, n_attributes1=200,
             n_attributes2=300, avg_degree1=20.0, avg_degree2=20.0, img_dim=128, text_dim=128,
             image_coverage=0.9)
PRESETS = {
    "paper": {},  # Config defaults: D = 300, 2 x 2 GAT heads, K = 5 experts, batch 512, CLUB on
    "table1": {"fusion_weight_dim": 512},  # run.sh's Table 1 line (router with a 512-wide hidden layer)
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("fb15k_db15k", "large"), default="fb15k_db15k",
                   help="fb15k_db15k: FB15K-DB15K shape times --scale; large: 100k + 100k entities, 2M triples")
    p.add_argument("--scale", type=float, default=1.0, help="fb15k_db15k only: every count times this (unitless)")
    p.add_argument("--cache", default=str(ROOT / "data" / "bench"), help="folder of the generated datasets")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="paper", help="model configuration")
    p.add_argument("--rate", type=float, default=0.2, help="fraction of the aligned pairs used for training")
    p.add_argument("--epochs", type=int, default=5, help="timed training epochs (the median is reported)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the loading and of the evaluation")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each phase before timing")
    p.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="autocast dtype of the expert and router matmuls (model.HUMEA.amp_dtype); "
                        "losses and CSLS stay float32")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation phase")
    p.add_argument("--bf16-screen", action="store_true",
                   help="after the evaluation, measure whether a bf16 matmul could screen the ranking "
                        "exactly: its time, its error and the share of entries too close to call")
    p.add_argument("--profile", default="", help="write a torch.profiler table of one epoch to this file")
    p.add_argument("--seed", type=int, default=42, help="seed of the split and the model")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Dataset cache, memory and machine information.
# ---------------------------------------------------------------------------------------------


def dataset_folder(args) -> Path:
    """Generate the dataset in a child process if the cache lacks it; return its folder."""
    from data_process.synthetic import is_complete

    name = "large_100k" if args.dataset == "large" else f"fb15k_db15k_s{args.scale:g}"
    folder = Path(args.cache) / name
    if not is_complete(folder):
        if args.dataset == "large":
            call = f"generate_pair({str(folder)!r}, **{LARGE!r}, seed=0, overwrite=True)"
            imp = "from data_process.synthetic import generate_pair"
        else:
            call = f"fb15k_db15k_shape({str(folder)!r}, scale={args.scale!r}, seed=0, overwrite=True)"
            imp = "from data_process.synthetic import fb15k_db15k_shape"
        print(f"generating {folder} ...", file=sys.stderr, flush=True)
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"{imp}; {call}"], cwd=ROOT, check=True)
        print(f"generated in {time.perf_counter() - tic:.1f} s", file=sys.stderr, flush=True)
    return folder


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_1min() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


class Phase:
    """Times a callable: ``warmup`` untimed calls, then ``repeats`` timed ones; tracks peak memory."""

    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def run(self, fn, warmup: int, repeats: int):
        import torch

        cuda = self.device.type == "cuda"
        hwm_ok = reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        out = None
        for _ in range(warmup):
            out = None  # drop the previous result first: two live copies would inflate the peak
            out = fn()
            self.sync()
        times = []
        for _ in range(repeats):
            out = None
            self.sync()
            tic = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - tic)
        mem = {"peak_rss_gib": round(peak_rss_gib(), 3), "rss_reset": hwm_ok}
        if cuda:
            mem["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return out, times, mem


# ---------------------------------------------------------------------------------------------
# The benchmark.
# ---------------------------------------------------------------------------------------------


def main(args) -> dict:
    folder = dataset_folder(args)
    import numpy as np
    import torch

    import train
    from loss import CLUBDisentanglement
    from model import HUMEA, ModelInputs
    from utils import Config, evaluate_alignment, set_seed

    try:
        from data_process.dataset import load_dataset, split_links
    except ImportError:  # a checkout from before the loader left utils.py
        from utils import load_dataset, split_links

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    phase = Phase(device)
    load_before = load_1min()
    result = {"bench": "speed", "dataset": args.dataset, "scale": args.scale if args.dataset != "large" else None,
              "preset": args.preset, "rate": args.rate, "device": str(device), "amp": args.amp,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_model(),
              "cores": os.cpu_count()}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)

    def load():
        data = load_dataset(folder, seed=args.seed)
        return data, ModelInputs.from_data(data, device)

    (data, inputs), t_load, m_load = phase.run(load, args.warmup, args.repeats)
    cfg = Config(**{**PRESETS[args.preset], "rate": args.rate, "seed": args.seed, "device": str(device)})
    cfg.validate()
    split = split_links(data.links, cfg.rate, cfg.seed, cfg.val_ratio)
    result.update(entities=int(data.num_entities), triples=int(len(data.triples)), edges=inputs.graph.num_edges,
                  train_pairs=int(len(split.train)), test_pairs=int(len(split.test)),
                  features={m: int(v.shape[1]) for m, v in inputs.features.items()})

    set_seed(cfg.seed)
    if hasattr(train, "build_model"):
        model, club, opt, q_opt = train.build_model(cfg, inputs, device)
    else:  # a checkout from before train.build_model: the same objects, as its train.main built them
        model = HUMEA(cfg, inputs).to(device)
        club = CLUBDisentanglement(model.modalities, cfg.hidden, cfg.hidden).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        q_opt = torch.optim.AdamW(club.parameters(), lr=cfg.q_lr)
    if args.amp == "bf16":
        model.amp_dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(cfg.seed)
    epoch = [0]

    def one_epoch():
        epoch[0] += 1
        return train.train_epoch(model, club, inputs, split.train, cfg, gen, opt, q_opt, epoch[0])

    terms, t_epoch, m_epoch = phase.run(one_epoch, args.warmup, args.epochs)
    result["loss_last_epoch"] = round(terms["loss"], 5)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            one_epoch()
            phase.sync()
        key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        Path(args.profile).write_text(prof.key_averages().table(sort_by=key, row_limit=40))

    timings = {"load": t_load, "epoch": t_epoch}
    memory = {"load": m_load, "epoch": m_epoch}
    if not args.no_eval:
        test = split.test
        ids = np.unique(test)
        res, t_eval, m_eval = phase.run(lambda: train.evaluate(model, inputs, test, cfg), args.warmup,
                                        args.repeats)
        emb, t_embed, _ = phase.run(lambda: model.embed(ids, inputs).fused, 0, args.repeats)
        _, t_align, m_align = phase.run(
            lambda: evaluate_alignment(emb, test, ids=ids, csls_k=cfg.csls_k, use_csls=cfg.csls,
                                       chunk=cfg.eval_chunk), args.warmup, args.repeats)
        timings.update(eval=t_eval, embed=t_embed, align=t_align)
        if args.bf16_screen:
            result["bf16_screen"] = bf16_screen(phase, emb, test, ids, args.repeats)
        memory.update(eval=m_eval, align=m_align)
        result["test_metrics"] = {k: round(v, 5) for k, v in res["avg"].items()}
    result["seconds"] = {k: round(statistics.median(v), 4) for k, v in timings.items()}
    result["seconds_all"] = {k: [round(x, 4) for x in v] for k, v in timings.items()}
    result["memory"] = memory
    # Each phase resets the kernel's peak counter, so the process peak is the largest phase peak.
    result["peak_rss_gib"] = max(m["peak_rss_gib"] for m in memory.values())
    result["load_1min"] = {"before": round(load_before, 2), "after": round(load_1min(), 2)}
    return result


def bf16_screen(phase: Phase, emb, pairs, ids, repeats: int) -> dict:
    """Could a bf16 matmul screen the CSLS ranking, with float32 only for the candidates it cannot
    decide? The test cosines S (gold on the diagonal) in float32 and in bf16, timed; the largest
    error; and the share of entries within the provable margin of their row's gold cosine, i.e.
    the entries that would need float32 (with exact r terms: 2 x the per-entry error bound)."""
    import numpy as np
    import torch

    def rows(side):
        return torch.nn.functional.normalize(emb[torch.as_tensor(np.searchsorted(ids, pairs[:, side]))], dim=1)

    left, right = rows(0), rows(1)

    def timed(a, b):
        out, times, _ = phase.run(lambda: torch.cat([a[s:s + 2048] @ b.t() for s in range(0, a.shape[0], 2048)]),
                                  0, max(repeats, 1))
        return out, statistics.median(times)

    exact, t32 = timed(left, right)
    screen, t16 = timed(left.bfloat16(), right.bfloat16())
    err = (exact - screen.float()).abs()
    dim = left.shape[1]
    u = 2.0**-9  # unit roundoff of bf16
    # |bf16 result - exact| <= inputs rounded (2u + u^2) + float32 sums (dim 2^-24) + output rounded (u |S| <= u)
    bound = (2 * u + u * u) + dim * 2.0**-24 + u
    margin = 2 * bound
    gold = exact.diagonal()[:, None]
    close = ((exact - gold).abs() <= margin).double().mean()
    return {"fp32_matmul_s": round(t32, 3), "bf16_matmul_s": round(t16, 3), "max_abs_err": round(float(err.max()), 5),
            "mean_abs_err": round(float(err.mean()), 6), "margin": round(margin, 5),
            "share_to_recompute": round(float(close), 5)}


def table(r: dict) -> str:
    rows = [("data loading", "load"), ("training epoch", "epoch"), ("evaluation (total)", "eval"),
            ("  embed test entities", "embed"), ("  CSLS ranks, both dirs", "align")]
    size = (f"{r['entities']:,} entities, {r['triples']:,} triples, {r['edges']:,} edges, "
            f"{r['train_pairs']:,} train / {r['test_pairs']:,} test pairs")
    lines = [f"{r['dataset']} scale={r['scale']} preset={r['preset']} device={r['device']} amp={r['amp']} "
             f"threads={r['threads']} ({r['cpu']}, {r['cores']} cores; 1-min load {r['load_1min']['before']} "
             f"-> {r['load_1min']['after']})", size, f"{'phase':26s} {'median s':>9s}  {'peak GiB':>8s}  runs"]
    for name, key in rows:
        if key in r["seconds"]:
            mem = r["memory"].get(key, {})
            peak = mem.get("peak_cuda_gib", mem.get("peak_rss_gib"))
            lines.append(f"{name:26s} {r['seconds'][key]:9.3f}  {'' if peak is None else f'{peak:8.2f}'}  "
                         f"{len(r['seconds_all'][key])}")
    lines.append(f"process peak RSS: {r['peak_rss_gib']:.2f} GiB")
    if "bf16_screen" in r:
        lines.append("bf16 screen of the ranking: " + ", ".join(f"{k} {v}" for k, v in r["bf16_screen"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    out = main(parse_args())
    print(table(out))
    print(json.dumps(out))
