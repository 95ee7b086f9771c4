"""data_process.dataset.load_dataset on a hand-written folder, and every bad input it must reject (DataError)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import TOY_IMAGE, TOY_REL_TEXT, write_folder

from data_process.dataset import (
    BOW_TOP,
    attribute_bow,
    load_dataset,
    normalise_features,
    read_pair_file,
    relation_bow,
    split_links,
)
from utils import Config, DataError, Switches, parse_without


def _unit_rows(m) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    n = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(n > 0, n, 1.0)


# ---------------------------------------------------------------------------------------------
# Round trip.
# ---------------------------------------------------------------------------------------------


def test_round_trip_ids_names_kg_links_triples(toy_dir):
    data = load_dataset(toy_dir, seed=0)
    assert data.num_entities == 6
    assert data.names == ["a0", "a1", "a2", "b0", "b1", "b2"]
    np.testing.assert_array_equal(data.kg, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(data.links, [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(data.triples, [[0, 0, 1], [0, 0, 2], [1, 1, 2],
                                                 [3, 0, 4], [3, 2, 5], [4, 2, 5], [5, 3, 3]])


def test_ids_need_not_be_listed_in_order(make_toy):
    root = make_toy(ent_ids_1="2\ta2\n0\ta0\n1\ta1\n", ent_ids_2="5\tb2\n3\tb0\n4\tb1\n")
    data = load_dataset(root, seed=0)
    assert data.names == ["a0", "a1", "a2", "b0", "b1", "b2"]
    np.testing.assert_array_equal(data.kg, [0, 0, 0, 1, 1, 1])


def test_relation_bow_counts_head_and_tail_in_frequency_order(toy_dir):
    data = load_dataset(toy_dir, seed=0)
    # Columns r0 (6 ends), r2 (4), r1 (2), r3 (2; tie with r1 broken by the lower id).
    counts = [[2, 0, 0, 0],
              [1, 0, 1, 0],
              [1, 0, 1, 0],
              [1, 1, 0, 1],
              [1, 1, 0, 0],
              [0, 2, 0, 1]]
    np.testing.assert_array_equal(data.features["rel_bow"], counts)  # raw: scaled by --feature_norm later
    assert data.features["rel_bow"].dtype == np.float32
    assert data.coverage["rel_bow"] == 1.0


def test_relation_bow_keeps_only_the_most_frequent_relations(toy_dir):
    data = load_dataset(toy_dir, seed=0)
    top2 = relation_bow(data.triples, data.num_entities, top=2)  # r0 and r2 only
    counts = [[2, 0], [1, 0], [1, 0], [1, 1], [1, 1], [0, 2]]
    np.testing.assert_array_equal(top2, counts)
    # An entity whose relations are all cut off gets a zero row, not NaN.
    iso = relation_bow(np.array([[0, 0, 1], [0, 0, 1], [2, 1, 3]]), 4, top=1)
    np.testing.assert_array_equal(iso, [[2], [2], [0], [0]])


def test_attribute_bow_is_binary_over_frequent_names(toy_dir):
    data = load_dataset(toy_dir, seed=0)
    # Vocabulary by entity frequency: name (5 entities), birth (2), height (1).
    ind = [[1, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 0, 1], [1, 0, 0]]
    np.testing.assert_array_equal(data.features["attr_bow"], ind)
    assert data.coverage["attr_bow"] == pytest.approx(5 / 6)
    np.testing.assert_array_equal(data.present["attr_bow"], [1, 1, 0, 1, 1, 1])  # a2 has no attribute
    top1 = attribute_bow([(0, ["x", "y"]), (1, ["y"]), (2, ["y", "y"])], 3, top=1)
    np.testing.assert_array_equal(top1, [[1], [1], [1]])
    assert BOW_TOP == 1000


@pytest.mark.parametrize("scheme, scaled", [("l2", {"rel_bow", "attr_bow", "image", "rel_text"}),
                                            ("official", {"image", "rel_text"}),
                                            ("bow_l2", {"rel_bow", "attr_bow"})])
def test_feature_norm_schemes_scale_the_named_rows_only(toy_dir, scheme, scaled):
    data = load_dataset(toy_dir, seed=0)
    out = normalise_features(data.features, scheme)
    for m, x in data.features.items():
        expected = _unit_rows(x) if m in scaled else x
        np.testing.assert_allclose(out[m], expected, rtol=1e-6, err_msg=m)
    assert not out["attr_bow"][2].any()  # a zero row (a2: no attribute) stays zero, not NaN
    assert data.features["rel_bow"].max() == 2.0  # the loaded features are not changed


def test_feature_pickles_sizes_from_files_and_partial_coverage(toy_dir):
    data = load_dataset(toy_dir, seed=0)
    img, rel = data.features["image"], data.features["rel_text"]
    assert img.shape == (6, 5) and rel.shape == (6, 3)  # sizes read from the vectors
    assert img.dtype == np.float32 and rel.dtype == np.float32
    for i, v in TOY_IMAGE.items():
        np.testing.assert_array_equal(img[i], v)
    for i, v in TOY_REL_TEXT.items():
        np.testing.assert_array_equal(rel[i], v)
    assert data.coverage["image"] == pytest.approx(4 / 6)
    assert data.coverage["rel_text"] == 1.0
    np.testing.assert_array_equal(data.present["image"], [1, 1, 0, 1, 1, 0])  # the filled rows are marked
    assert np.isfinite(img).all()
    assert any("image" in note and "66.7%" in note for note in data.notes), data.notes


def test_partial_coverage_fill_is_deterministic_per_seed(toy_dir):
    a = load_dataset(toy_dir, seed=7).features["image"]
    b = load_dataset(toy_dir, seed=7).features["image"]
    c = load_dataset(toy_dir, seed=8).features["image"]
    np.testing.assert_array_equal(a, b)
    missing = [2, 5]
    assert not np.allclose(a[missing], c[missing])
    present = sorted(TOY_IMAGE)
    np.testing.assert_array_equal(a[present], c[present])


def test_missing_pickle_disables_modality_with_a_note(toy_dir):
    data = load_dataset(toy_dir, seed=0)  # the toy folder has no attribute_feature_dict.pkl
    assert "attr_text" not in data.features and "attr_text" not in data.coverage
    assert any(n.startswith("attr_text") and "attribute_feature_dict.pkl" in n and "disabled" in n
               for n in data.notes), data.notes
    assert set(data.features) == {"rel_bow", "attr_bow", "image", "rel_text"}


def test_missing_image_pickle_and_attrs_disable_those(make_toy):
    root = make_toy(**{"toy_id_img_feature_dict.pkl": None})
    (root / "training_attrs_1").unlink()
    (root / "training_attrs_2").unlink()
    data = load_dataset(root, seed=0)
    assert "image" not in data.features and "attr_bow" not in data.features
    assert any(n.startswith("image") and "disabled" in n for n in data.notes)
    assert any(n.startswith("attr_bow") and "disabled" in n for n in data.notes)


def test_disabled_modalities_are_not_loaded(toy_dir):
    data = load_dataset(toy_dir, {"image", "rel_bow"}, seed=0)
    assert set(data.features) == {"attr_bow", "rel_text"}


def test_image_pickle_with_another_prefix_is_found(make_toy):
    img = {k: np.asarray(v, np.float32) for k, v in TOY_IMAGE.items()}
    root = make_toy(**{"toy_id_img_feature_dict.pkl": None, "OTHER_id_img_feature_dict.pkl": img})
    assert load_dataset(root, seed=0).features["image"].shape == (6, 5)


def test_split_links_is_a_seeded_partition(toy_dir):
    links = np.stack([np.arange(10), np.arange(10, 20)], 1)
    s = split_links(links, 0.3, seed=1)
    assert len(s.train) == 3 and len(s.test) == 7 and len(s.valid) == 0
    both = np.concatenate([s.train, s.test])
    assert sorted(map(tuple, both)) == sorted(map(tuple, links))
    np.testing.assert_array_equal(split_links(links, 0.3, seed=1).train, s.train)
    v = split_links(links, 0.5, seed=1, val_ratio=0.4)
    assert len(v.train) == 3 and len(v.valid) == 2
    np.testing.assert_array_equal(v.test, split_links(links, 0.5, seed=1).test)


# ---------------------------------------------------------------------------------------------
# Bad inputs: DataError naming the file, the line and what was expected.
# ---------------------------------------------------------------------------------------------


def _raises(root, *patterns):
    with pytest.raises(DataError) as info:
        load_dataset(root, seed=0)
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("name", ["ent_ids_1", "ent_ids_2", "ill_ent_ids", "triples_1", "triples_2"])
def test_missing_required_file(make_toy, name):
    root = make_toy(**{name: None})
    _raises(root, re.escape(str(root / name)), "required file is missing")


def test_missing_folder(tmp_path):
    _raises(tmp_path / "nowhere", "nowhere", "does not exist", "ent_ids_1")


@pytest.mark.parametrize("name", ["ent_ids_2", "ill_ent_ids", "triples_1"])
def test_empty_file(make_toy, name):
    root = make_toy(**{name: ""})
    _raises(root, re.escape(str(root / name)), "empty", "expected at least one line")


@pytest.mark.parametrize("name, text, line, expected", [
    ("triples_1", "0\t0\t1\n0\t2\n1\t1\t2\n", 2, "head<TAB>relation<TAB>tail"),
    ("triples_2", "3\t0\t4\n3\t2\t5\t1\n", 2, "head<TAB>relation<TAB>tail"),
    ("ill_ent_ids", "0\t3\n1 4\n", 2, "id1<TAB>id2"),
    ("ill_ent_ids", "0\t3\n\n1\t4\n", 2, "id1<TAB>id2"),
    ("ent_ids_1", "0\ta0\n1\n2\ta2\n", 2, "id<TAB>name"),
])
def test_malformed_line(make_toy, name, text, line, expected):
    root = make_toy(**{name: text})
    _raises(root, re.escape(str(root / name)), rf"line {line}\b", re.escape(expected))


@pytest.mark.parametrize("name, text, line, token", [
    ("ill_ent_ids", "0\t3\n1\tx4\n", 2, "x4"),
    ("triples_2", "3\t0\t4\n3\t2.5\t5\n", 2, "2.5"),
    ("ent_ids_2", "3\tb0\nfour\tb1\n5\tb2\n", 2, "four"),
])
def test_non_integer_id(make_toy, name, text, line, token):
    root = make_toy(**{name: text})
    _raises(root, re.escape(str(root / name)), rf"line {line}\b", "expected an integer", re.escape(token))


@pytest.mark.parametrize("name, text, line, bad", [
    ("ill_ent_ids", "0\t3\n1\t4\n2\t9\n", 3, "9"),
    ("triples_1", "0\t0\t1\n-1\t0\t2\n", 2, "-1"),
    ("ent_ids_2", "3\tb0\n4\tb1\n6\tb2\n", 3, "6"),
])
def test_id_out_of_range(make_toy, name, text, line, bad):
    root = make_toy(**{name: text})
    _raises(root, re.escape(str(root / name)), rf"line {line}\b", rf"id {bad}\b", "out of range", "0..5")


@pytest.mark.parametrize("name, text", [("ill_ent_ids", "0\t3\n1\t99999999999999999999\n"),
                                        ("triples_1", "0\t0\t1\n1\t99999999999999999999\t2\n")])
def test_id_too_large_for_int64(make_toy, name, text):
    root = make_toy(**{name: text})
    _raises(root, re.escape(str(root / name)), r"line 2\b", "99999999999999999999")


def test_pair_linking_two_kg1_entities(make_toy):
    root = make_toy(ill_ent_ids="0\t3\n1\t2\n")
    _raises(root, re.escape(str(root / "ill_ent_ids")), r"line 2\b", r"id 2\b", "not an entity of KG2")


def test_pair_in_the_wrong_order(make_toy):
    root = make_toy(ill_ent_ids="0\t3\n4\t1\n")
    _raises(root, re.escape(str(root / "ill_ent_ids")), r"line 2\b", r"id 4\b", "not an entity of KG1")


def test_triple_of_kg1_using_a_kg2_entity(make_toy):
    root = make_toy(triples_1="0\t0\t1\n1\t1\t2\n2\t0\t4\n")
    _raises(root, re.escape(str(root / "triples_1")), r"line 3\b", r"id 4\b", "not an entity of KG1")


def test_duplicated_entity_id(make_toy):
    root = make_toy(ent_ids_2="3\tb0\n2\tb1\n5\tb2\n")
    msg = _raises(root, re.escape(str(root / "ent_ids_2")), r"line 2\b", r"duplicated entity id 2\b")
    assert "ent_ids_1 line 3" in msg  # where it was first defined


def test_unknown_entity_in_training_attrs(make_toy):
    root = make_toy(training_attrs_2="b0\tname\nzz\theight\n")
    _raises(root, re.escape(str(root / "training_attrs_2")), r"line 2\b", "zz", "ent_ids_2")


def test_feature_vectors_of_inconsistent_sizes(make_toy):
    bad = {0: np.zeros(3, np.float32), 1: np.zeros(3, np.float32), 2: np.zeros(4, np.float32)}
    root = make_toy(**{"triples_feature_dict.pkl": bad})
    _raises(root, re.escape(str(root / "triples_feature_dict.pkl")), r"entity 2\b", r"size 4\b", r"expected 3\b")


def test_pickle_that_is_not_a_dict(make_toy):
    root = make_toy(**{"triples_feature_dict.pkl": [[0.0, 1.0]]})
    _raises(root, re.escape(str(root / "triples_feature_dict.pkl")), "expected a pickled dict", "list")


def test_pickle_that_cannot_be_read(make_toy):
    root = make_toy()
    (root / "triples_feature_dict.pkl").write_bytes(b"not a pickle")
    _raises(root, re.escape(str(root / "triples_feature_dict.pkl")), "cannot unpickle")


@pytest.mark.parametrize("key, pattern", [(6, r"key 6\b.*out of range"), (-1, r"key -1\b.*out of range"),
                                          ("x", r"key 'x'.*not an integer")])
def test_pickle_key_out_of_range(make_toy, key, pattern):
    root = make_toy(**{"toy_id_img_feature_dict.pkl": {0: np.zeros(2, np.float32), key: np.ones(2, np.float32)}})
    _raises(root, re.escape(str(root / "toy_id_img_feature_dict.pkl")), pattern)


# ---------------------------------------------------------------------------------------------
# Config and pair files.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_config_rejects_rate_outside_unit_interval(rate):
    with pytest.raises(DataError, match="--rate must be in"):
        Config(rate=rate).validate()


def test_config_accepts_defaults_and_rejects_unknown_without():
    Config().validate()
    Config(rate=0.5, without="v,club").validate()
    with pytest.raises(DataError, match="unknown component 'imgae'"):
        Config(without="imgae").validate()


def test_parse_without_names_and_aliases():
    assert parse_without("image, rel_text") == ["image", "rel_text"]
    assert parse_without("g,v,r_b,r_t,a_b,a_t,img") == ["graph", "image", "rel_bow", "rel_text", "attr_bow",
                                                        "attr_text", "image"]
    assert parse_without("cl,al,club,hmoe") == ["cl", "al", "club", "hmoe"]
    assert parse_without("") == []
    with pytest.raises(DataError) as info:
        parse_without("graph,bogus")
    assert "'bogus'" in str(info.value) and "attr_text" in str(info.value)  # lists the valid names
    assert Config(without="v,club").switches.off == ("club", "image")
    assert Config(without="a_t, cl,hmoe").switches == Switches(frozenset({"attr_text"}), use_cl=False, use_hmoe=False)
    assert Config().switches == Switches() and Switches().off == ()


def test_read_pair_file_accepts_left_right_pairs(toy_dir, tmp_path):
    data = load_dataset(toy_dir, seed=0)
    path = write_folder(tmp_path / "pairs", {"p": "0\t4\n2\t3\n"}) / "p"
    np.testing.assert_array_equal(read_pair_file(path, data), [[0, 4], [2, 3]])


@pytest.mark.parametrize("text, line, pattern", [
    ("0\t4\n3\t0\n", 2, r"id 3\b.*KG1"),  # right-left
    ("0\t4\n1\t2\n", 2, r"id 2\b.*KG2"),  # left-left
    ("0\t4\n0\t7\n", 2, r"id 7\b.*out of range"),
    ("0\t4\n0\n", 2, r"id1<TAB>id2"),
])
def test_read_pair_file_rejects_pairs_not_left_right(toy_dir, tmp_path, text, line, pattern):
    data = load_dataset(toy_dir, seed=0)
    path = write_folder(tmp_path / "pairs", {"p": text}) / "p"
    with pytest.raises(DataError) as info:
        read_pair_file(path, data)
    msg = str(info.value)
    assert str(path) in msg and f"line {line}" in msg and re.search(pattern, msg), msg
