"""Tests of the synthetic KG-pair generator (data_process/synthetic.py): CPU, a few seconds."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from data_process import synthetic

SMALL = dict(n1=300, n2=280, n_links=240, n_relations1=30, n_relations2=12, n_attributes1=15,
             n_attributes2=20, avg_degree1=10.0, avg_degree2=6.0, img_dim=32, text_dim=16,
             image_coverage=0.7, seed=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return synthetic.generate_pair(tmp_path_factory.mktemp("small") / "toy", **SMALL)


def _rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def _load(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def test_same_arguments_give_identical_bytes(small, tmp_path):
    again = synthetic.generate_pair(tmp_path / "toy", **SMALL)
    names = sorted(p.name for p in small.iterdir())
    assert names == sorted(synthetic.expected_files(small))
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (small / name).read_bytes() == (again / name).read_bytes(), name
    other = synthetic.generate_pair(tmp_path / "other" / "toy", **{**SMALL, "seed": 4})
    assert (other / "triples_1").read_bytes() != (small / "triples_1").read_bytes()


def test_layout_is_valid(small):
    n1, n2 = SMALL["n1"], SMALL["n2"]
    r1, r2 = SMALL["n_relations1"], SMALL["n_relations2"]
    ents = [_rows(small / f"ent_ids_{i}") for i in (1, 2)]
    ids = [np.array([int(r[0]) for r in e]) for e in ents]
    assert ids[0].tolist() == list(range(n1)) and ids[1].tolist() == list(range(n1, n1 + n2))
    names = [[r[1] for r in e] for e in ents]
    assert len(set(names[0])) == n1 and len(set(names[1])) == n2 and not set(names[0]) & set(names[1])

    ill = np.array(_rows(small / "ill_ent_ids"), dtype=np.int64)
    assert ill.shape == (SMALL["n_links"], 2)
    assert (ill[:, 0] < n1).all() and (ill[:, 1] >= n1).all() and (ill[:, 1] < n1 + n2).all()
    assert len(set(ill[:, 0])) == len(ill) and len(set(ill[:, 1])) == len(ill)  # one-to-one
    assert not (np.diff(ill[:, 0]) > 0).all()  # shuffled
    # names do not leak the alignment: a linked pair's name numbers agree only by chance
    num = [{int(i): int(nm.rsplit("_", 1)[1]) for i, nm in zip(ids[k], names[k])} for k in (0, 1)]
    assert np.mean([num[0][a] == num[1][b] for a, b in ill]) < 0.05

    for i, (lo, hi, rlo, rhi, deg) in enumerate(((0, n1, 0, r1, SMALL["avg_degree1"]),
                                                 (n1, n1 + n2, r1, r1 + r2, SMALL["avg_degree2"])), 1):
        tr = np.array(_rows(small / f"triples_{i}"), dtype=np.int64)
        assert ((tr[:, [0, 2]] >= lo) & (tr[:, [0, 2]] < hi)).all()
        assert ((tr[:, 1] >= rlo) & (tr[:, 1] < rhi)).all()
        assert (tr[:, 0] != tr[:, 2]).all() and len(np.unique(tr, axis=0)) == len(tr)
        assert abs(2 * len(tr) / (hi - lo) - deg) < 0.1 * deg
        assert set(np.unique(tr[:, [0, 2]])) == set(range(lo, hi))  # no isolated entity

        attr_tr = _rows(small / f"attr_triples_{i}")
        assert all(lo <= int(e) < hi and a.startswith(f"kg{i}:attr_") and float(v) == float(v)
                   for e, a, v in attr_tr)
        train = _rows(small / f"training_attrs_{i}")
        assert {r[0] for r in train} <= set(names[i - 1]) and all(len(r) >= 2 for r in train)
        n_attr = SMALL[f"n_attributes{i}"]
        assert {a for r in train for a in r[1:]} <= {f"kg{i}:attr_{k}" for k in range(n_attr)}

    rel = _rows(small / "rel_names")
    assert [int(r[0]) for r in rel] == list(range(r1 + r2))

    for fname, dim in (("triples_feature_dict.pkl", SMALL["text_dim"]),
                       ("attribute_feature_dict.pkl", SMALL["text_dim"]),
                       (synthetic.image_pickle_name(small), SMALL["img_dim"])):
        feats = _load(small / fname)
        assert all(type(k) is int and 0 <= k < n1 + n2 for k in feats)
        vec = next(iter(feats.values()))
        assert vec.dtype == np.float32 and vec.shape == (dim,)
        if fname != synthetic.image_pickle_name(small):
            assert len(feats) == n1 + n2  # text features are complete


def test_image_coverage_matches_request(small):
    feats = _load(small / synthetic.image_pickle_name(small))
    ids = np.array(sorted(feats))
    for lo, hi in ((0, SMALL["n1"]), (SMALL["n1"], SMALL["n1"] + SMALL["n2"])):
        frac = ((ids >= lo) & (ids < hi)).sum() / (hi - lo)
        assert abs(frac - SMALL["image_coverage"]) < 0.01


def test_raw_hits1_rule_on_a_hand_made_folder(tmp_path):
    folder = tmp_path / "hand"
    folder.mkdir()
    (folder / "ill_ent_ids").write_text("0\t3\n1\t4\n2\t5\n")
    eye = np.eye(3, dtype=np.float32)
    same = {**{i: eye[i] for i in range(3)}, **{3 + i: 2 * eye[i] for i in range(3)}}  # exact partners
    tied = {**{i: eye[0] for i in range(3)}, **{3 + i: eye[0] for i in range(3)}}  # all tied: no hit
    image = {0: eye[0], 1: eye[1], 3: eye[0], 5: eye[2]}  # 1's partner and 2 itself have no image
    for name, feats in ((synthetic.image_pickle_name(folder), image),
                        ("triples_feature_dict.pkl", same), ("attribute_feature_dict.pkl", tied)):
        with open(folder / name, "wb") as f:
            pickle.dump(feats, f, protocol=4)
    hits = synthetic.raw_feature_hits1(folder)
    expected = {"image": 1 / 3, "relation_text": 1.0, "attribute_text": 0.0, "chance": 1 / 3}
    assert hits == pytest.approx(expected)


def test_default_dataset_is_calibrated(tmp_path):
    folder = synthetic.default_dataset(tmp_path / "embedded_default")
    assert synthetic.is_complete(folder)
    assert len(_rows(folder / "ent_ids_1")) == synthetic.DEFAULT_KWARGS["n1"]
    hits = synthetic.raw_feature_hits1(folder)
    for modality in ("image", "relation_text", "attribute_text"):
        assert hits["chance"] < 0.02 < hits[modality] < 0.6, (modality, hits)
    # an existing complete folder is returned untouched
    stamp = (folder / "triples_1").stat().st_mtime_ns
    assert synthetic.default_dataset(tmp_path / "embedded_default") == folder
    assert (folder / "triples_1").stat().st_mtime_ns == stamp


def test_failed_generation_leaves_no_folder(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write_pickle", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.generate_pair(tmp_path / "toy", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling


def test_refuses_to_overwrite(small, tmp_path):
    out = synthetic.generate_pair(tmp_path / "toy", **SMALL)
    with pytest.raises(FileExistsError, match=str(out)):
        synthetic.generate_pair(out, **SMALL)
    (out / "marker").write_text("x")
    synthetic.generate_pair(out, **{**SMALL, "seed": 5}, overwrite=True)
    assert not (out / "marker").exists() and synthetic.is_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no temporary leftovers


def test_fb15k_db15k_shape_scales_counts_not_dims(tmp_path):
    out = synthetic.fb15k_db15k_shape(tmp_path / "fb_db", scale=0.02)
    n1, n2 = round(14951 * 0.02), round(12842 * 0.02)
    assert len(_rows(out / "ent_ids_1")) == n1 and len(_rows(out / "ent_ids_2")) == n2
    assert len(_rows(out / "ill_ent_ids")) == n2  # one-to-one: min(12846 * scale, n2)
    assert len(_rows(out / "rel_names")) == round(1345 * 0.02) + round(279 * 0.02)
    img = _load(out / synthetic.image_pickle_name(out))
    assert next(iter(img.values())).shape == (4096,) and abs(len(img) / (n1 + n2) - 0.9) < 0.01
    assert next(iter(_load(out / "triples_feature_dict.pkl").values())).shape == (768,)


def test_cli_writes_a_dataset(tmp_path, capsys):
    synthetic.main(synthetic.parse_args(["--out", str(tmp_path / "cli"), "--default", "--seed", "1"]))
    assert synthetic.is_complete(tmp_path / "cli")
    assert "seconds=" in capsys.readouterr().out
