"""Probe a run's checkpoint: how well each modality aligns on its own, on the test pairs and on the
training pairs, and what fixed modality weights would give instead of the learned ones.

    python docs/analysis/modality_probe.py runs/t1_db_20 [more run folders]

Prints, per run, test and training Hits@1 of every unimodal embedding h'_m and of the fused
embedding (all test pairs; all training pairs), then test Hits@1 of the fused embedding rebuilt
with fixed weights: h^f = [w_1 h'_1; ...; w_M h'_M], each entity's weights renormalised over the
modalities it has. A modality whose training Hits@1 is far above its test Hits@1 memorises the
seed pairs; a fixed weighting that beats the learned one shows that the router has followed it.
Run from the repository root (it imports train.py); it reads the checkpoint and writes nothing.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train  # noqa: E402
from utils import Config  # noqa: E402

# Fixed weightings to compare, by modality (missing ones count 0; the rest 1).
WEIGHTINGS = {
    "uniform": {},
    "graph x2": {"graph": 2},
    "graph x3": {"graph": 3},
    "graph + texts": {"rel_bow": 0, "attr_bow": 0},
    "graph + bag-of-words": {"rel_text": 0, "attr_text": 0},
    "graph only": {"rel_bow": 0, "attr_bow": 0, "rel_text": 0, "attr_text": 0, "image": 0},
}


def hits1(emb: torch.Tensor, pairs: np.ndarray, ids: np.ndarray, cfg: Config) -> float:
    return round(train.alignment_metrics(emb, pairs, cfg, ids=ids)["avg"]["hits@1"], 3)


def probe(run: Path) -> None:
    ckpt = train.load_checkpoint(run)
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k != "provenance"})
    logging.disable(logging.INFO)  # set_up's log lines (data sizes, the resumed epoch) are not needed here
    s = train.set_up(cfg, run, ckpt)
    logging.disable(logging.NOTSET)
    mods = s.model.modalities
    print(f"{run} at epoch {ckpt['epoch']}")
    print("  " + " ".join(f"{m:>10}" for m in (*mods, "fused")) + "   (Hits@1)")
    for name, pairs in (("test", s.split.test), ("train", s.train_pairs)):
        ids = np.unique(pairs)
        emb = s.model.embed(ids, s.inputs)
        row = [hits1(emb.unimodal[m], pairs, ids, cfg) for m in mods] + [hits1(emb.fused, pairs, ids, cfg)]
        print(f"  {name:>5} " + " ".join(f"{v:>10.3f}" for v in row))
        if name == "test":
            test_emb, test_ids = emb, ids
    present = (test_emb.present.float() if test_emb.present is not None
               else torch.ones(len(test_ids), len(mods)))
    print("  learned weights (mean over test entities): " +
          " ".join(f"{m}={w:.3f}" for m, w in zip(mods, test_emb.weights.mean(0).tolist())))
    for label, scale in WEIGHTINGS.items():
        w = present * torch.tensor([float(scale.get(m, 1)) for m in mods])
        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
        fused = torch.cat([w[:, j:j + 1] * test_emb.unimodal[m] for j, m in enumerate(mods)], dim=1)
        print(f"  fixed weights, {label}: test Hits@1 {hits1(fused, s.split.test, test_ids, cfg):.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for arg in sys.argv[1:]:
        probe(Path(arg))
