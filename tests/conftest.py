"""Shared tiny fixtures: a hand-written dataset folder writer and a small synthetic KG pair.

The repository root is put on sys.path so that the tests can ``import train, model, ...``
without an installed package.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The tensors here are tiny: intra-op threads only add overhead, and on a shared 2-core machine
# their spin-waiting makes a 30-epoch run 100x slower.
torch.set_num_threads(1)

from data_process.synthetic import generate_pair  # noqa: E402

# Sizes of the session-scoped synthetic pair: big enough for a GAT and in-batch negatives,
# small enough that 30 training epochs take about a second.
TINY_SYNTHETIC = dict(n1=60, n2=50, n_links=40, n_relations1=8, n_relations2=5, n_attributes1=6,
                      n_attributes2=7, avg_degree1=6.0, avg_degree2=4.0, img_dim=12, text_dim=8,
                      image_coverage=0.8, seed=1)


# A hand-written folder "toy": KG1 = ids 0..2 (a0 a1 a2), KG2 = ids 3..5 (b0 b1 b2).
# Relation frequencies are all different (head + tail counts): r0 -> 6, r2 -> 4, r1 -> 2,
# r3 -> 2 (r1 before r3 on the tie: lower id first), so the BOW column order is r0, r2, r1, r3.
TOY_FILES = {
    "ent_ids_1": "0\ta0\n1\ta1\n2\ta2\n",
    "ent_ids_2": "3\tb0\n4\tb1\n5\tb2\n",
    "ill_ent_ids": "0\t3\n1\t4\n2\t5\n",
    "triples_1": "0\t0\t1\n0\t0\t2\n1\t1\t2\n",
    "triples_2": "3\t0\t4\n3\t2\t5\n4\t2\t5\n5\t3\t3\n",
    # a1 lists 'birth' twice: the attribute BOW is binary. a2 has no attribute line.
    "training_attrs_1": "a0\tname\tbirth\na1\tname\tbirth\tbirth\n",
    "training_attrs_2": "b0\tname\nb1\theight\tname\nb2\tname\n",
}
TOY_IMAGE = {0: [1, 0, 0, 0, 0], 1: [0, 1, 0, 0, 0], 3: [0, 0, 1, 0, 0], 4: [0, 0, 0, 1, 2]}  # 4 of 6
TOY_REL_TEXT = {i: [float(i), 1.0, -float(i)] for i in range(6)}  # complete, size 3


def write_folder(root: Path, files: dict[str, object]) -> Path:
    """Write ``files`` (name -> text, or name -> object to pickle) into ``root``; None skips a name."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if content is None:
            continue
        if name.endswith(".pkl"):
            with open(root / name, "wb") as f:
                pickle.dump(content, f)
        else:
            (root / name).write_text(content, encoding="utf-8")
    return root


def toy_files(**overrides) -> dict[str, object]:
    """The toy folder's files with some replaced (value None = file absent)."""
    files: dict[str, object] = {**TOY_FILES,
                                "toy_id_img_feature_dict.pkl": {k: np.asarray(v, np.float32) for k, v in
                                                                TOY_IMAGE.items()},
                                "triples_feature_dict.pkl": {k: np.asarray(v, np.float32) for k, v in
                                                             TOY_REL_TEXT.items()}}
    files.update(overrides)
    return files


@pytest.fixture
def toy_dir(tmp_path) -> Path:
    """The hand-written toy folder (no attribute_feature_dict.pkl)."""
    return write_folder(tmp_path / "toy", toy_files())


@pytest.fixture
def make_toy(tmp_path):
    """Factory: make_toy(**overrides) writes a toy folder with some files replaced or removed."""
    count = [0]

    def make(**overrides) -> Path:
        count[0] += 1
        return write_folder(tmp_path / f"case{count[0]}" / "toy", toy_files(**overrides))

    return make


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A small synthetic KG pair (110 entities, 40 gold links) in the standard layout."""
    return generate_pair(tmp_path_factory.mktemp("synthetic") / "tiny", **TINY_SYNTHETIC)


@pytest.fixture(scope="session")
def tiny_data(tiny_synthetic):
    from data_process.dataset import load_dataset

    return load_dataset(tiny_synthetic, seed=0)
