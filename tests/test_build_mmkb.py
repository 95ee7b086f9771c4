"""The MMKB builder: raw-file parsing, the id layout, statistics, bad inputs, and the real FB15K_DB15K and
FB15K_YAGO15K."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_process import build_mmkb, text_features
from data_process.build_mmkb import BuildConfig, BuildError, build
from data_process.dataset import load_dataset

REPO = Path(__file__).resolve().parents[1]
REAL_MMKB = REPO.parent / "shared" / "data" / "mmkb"

DB = "<http://dbpedia.org/resource/{}>"
DBO = "<http://dbpedia.org/ontology/{}>"
FBA = "<http://rdf.freebase.com/ns/{}>"
YG = "<http://yago-knowledge.org/resource/{}>"

FB_TRIPLES = [
    "/m/a /film/film/genre /m/b .",
    "/m/c /location/location/contains /m/a .",
    "/m/b /people/person/nationality /m/d .",
    "/m/a /film/film/genre /m/c .",
]
FB_ATTRS = [
    f"/m/a\t{FBA.format('film.film.initial_release_date')}\t1994.0",
    f"/m/c\t{FBA.format('location.geocode.longitude')}\t-9.5e-05",
    f"/m/zzz\t{FBA.format('location.geocode.latitude')}\t1.0",  # entity not in the dataset: dropped
    f"/m/iso\t{FBA.format('people.person.height_meters')}\t1.8",  # isolated linked entity: kept
    f"/m/c\t{FBA.format('location.geocode.latitude')}\t54.2",
]
DB_TRIPLES = [
    f"{DB.format('Apple_(film)')} {DBO.format('genre')} {DB.format('Banana')} .",
    f"{DB.format('Apple_(film)')} {DBO.format('genre')} {DB.format('Banana')} .",  # duplicate, kept
    f"{DB.format('Cherry')} {DBO.format('influencedBy')} {DB.format('Apple_(film)')} .",
]
DB_ATTRS = [
    f"{DB.format('Apple_(film)')}\tgross\t75500000.0",
    f"{DB.format('Cherry')}\tbirthDate\t1969-03-01",
    f"{DB.format('Apple_(film)')}\truntime\t6720.0",
    f"{DB.format('Apple_(film)')}\tgross\t75500000.0",  # duplicate attribute triple, kept
]
DB_LINKS = [
    f"/m/a <SameAs> {DB.format('Apple_(film)')} .",
    f"/m/c <SameAs> {DB.format('Cherry')} .",
    f"/m/iso <SameAs> {DB.format('Banana')} .",  # KG1 end in no triple: isolated node
    f"/m/b <SameAs> {DB.format('Banana')} .",  # Banana linked twice (as 4 DB15K entities are)
    f"/m/a <SameAs> {DB.format('Apple_(film)')} .",  # exact duplicate link, kept
    f"/m/iso2 <SameAs> {DB.format('Durian')} .",  # both ends isolated
]


def write_raw(root: Path, kg2: str, files: dict[str, list[str]]) -> Path:
    """Write raw MMKB files: keys are 'FB15K_EntityTriples.txt', '<KG2>_SameAsLink.txt', ..."""
    for name, lines in files.items():
        kg = name.split("_")[0]
        (root / kg).mkdir(parents=True, exist_ok=True)
        (root / kg / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root


def fb_db_raw(root: Path, **overrides) -> Path:
    files = {
        "FB15K_EntityTriples.txt": FB_TRIPLES,
        "FB15K_NumericalTriples.txt": FB_ATTRS,
        "DB15K_EntityTriples.txt": DB_TRIPLES,
        "DB15K_NumericalTriples.txt": DB_ATTRS,
        "DB15K_SameAsLink.txt": DB_LINKS,
    }
    files.update({k.replace("__", "."): v for k, v in overrides.items()})
    return write_raw(root, "DB15K", files)


def read_rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def cfg(tmp_path, dataset="FB15K_DB15K", **kw) -> BuildConfig:
    return BuildConfig(mmkb=tmp_path / "mmkb", dataset=dataset, out=tmp_path / "out", no_text=True, **kw)


def test_fb_db_layout(tmp_path):
    fb_db_raw(tmp_path / "mmkb")
    stats = build(cfg(tmp_path))
    d = tmp_path / "out" / "FB15K_DB15K"
    # KG1: first appearance (head then tail, line by line), then linked entities in no triple
    assert read_rows(d / "ent_ids_1") == [
        ["0", "/m/a"],
        ["1", "/m/b"],
        ["2", "/m/c"],
        ["3", "/m/d"],
        ["4", "/m/iso"],
        ["5", "/m/iso2"],
    ]
    assert read_rows(d / "ent_ids_2") == [
        ["6", DB.format("Apple_(film)")],
        ["7", DB.format("Banana")],
        ["8", DB.format("Cherry")],
        ["9", DB.format("Durian")],
    ]
    assert read_rows(d / "triples_1") == [["0", "0", "1"], ["2", "1", "0"], ["1", "2", "3"], ["0", "0", "2"]]
    assert read_rows(d / "triples_2") == [["6", "3", "7"], ["6", "3", "7"], ["8", "4", "6"]]
    assert read_rows(d / "rel_names") == [
        ["0", "/film/film/genre"],
        ["1", "/location/location/contains"],
        ["2", "/people/person/nationality"],
        ["3", DBO.format("genre")],
        ["4", DBO.format("influencedBy")],
    ]
    assert read_rows(d / "ill_ent_ids") == [
        ["0", "6"],
        ["2", "8"],
        ["4", "7"],
        ["1", "7"],
        ["0", "6"],
        ["5", "9"],
    ]
    assert read_rows(d / "attr_triples_1") == [
        ["0", FBA.format("film.film.initial_release_date"), "1994.0"],
        ["2", FBA.format("location.geocode.longitude"), "-9.5e-05"],
        ["4", FBA.format("people.person.height_meters"), "1.8"],
        ["2", FBA.format("location.geocode.latitude"), "54.2"],
    ]
    assert read_rows(d / "training_attrs_1") == [
        ["/m/a", FBA.format("film.film.initial_release_date")],
        ["/m/c", FBA.format("location.geocode.longitude"), FBA.format("location.geocode.latitude")],
        ["/m/iso", FBA.format("people.person.height_meters")],
    ]
    assert read_rows(d / "training_attrs_2") == [
        [DB.format("Apple_(film)"), "gross", "runtime"],
        [DB.format("Cherry"), "birthDate"],
    ]
    assert read_rows(d / "attr_triples_2")[1] == ["8", "birthDate", "1969-03-01"]

    assert json.loads((d / "stats.json").read_text()) == json.loads(json.dumps(stats))
    k1, k2 = stats["kgs"]
    assert (k1["entities"], k1["entities_in_triples"], k1["isolated_linked_entities"]) == (6, 4, 2)
    assert (k2["entities"], k2["entities_in_triples"], k2["isolated_linked_entities"]) == (4, 3, 1)
    assert (k1["relations"], k2["relations"]) == (3, 2)
    assert (k2["triples"], k2["unique_triples"], k2["duplicate_triples"]) == (3, 2, 1)
    assert (k1["attribute_triples"], k1["attribute_triples_dropped"], k1["distinct_attributes"]) == (4, 1, 4)
    assert (k2["attribute_triples"], k2["duplicate_attribute_triples"]) == (4, 1)
    assert (k2["numeric_values"], k2["text_values"]) == (3, 1)  # a date is text
    assert stats["links"] == {
        "links": 6,
        "unique_links": 5,
        "duplicate_links": 1,
        "links_both_ends_in_triples": 4,
        "kg1_entities_linked_more_than_once": 1,
        "kg2_entities_linked_more_than_once": 2,
    }
    assert stats["coverage"] == {"relation_text": None, "attribute_text": None, "image": None}
    assert set(stats["seconds"]) >= {"parse", "index", "write_layout", "total"}
    assert not list(d.glob("*.pkl"))
    assert "links_both_ends_in_triples" in build_mmkb.format_stats(stats)


def test_yago_format(tmp_path):
    write_raw(
        tmp_path / "mmkb",
        "YAGO15K",
        {
            "FB15K_EntityTriples.txt": ["/m/x /film/film/genre /m/y ."],
            "FB15K_NumericalTriples.txt": [f"/m/x\t{FBA.format('people.person.date_of_birth')}\t1969.0"],
            "YAGO15K_EntityTriples.txt": [
                f"{YG.format('X_Person')}\t{YG.format('isLocatedIn')}  {YG.format('Y_Place')}\t."
            ],
            "YAGO15K_NumericalTriples.txt": [
                f"{YG.format('X_Person')}\t<wasBornOnDate>\t1969-03-01",
                f"{YG.format('Y_Place')}\t<wasCreatedOnDate>\t1950.0000",
                f'{YG.format("Y_Place")}\t<hasLatitude>\t"41.9"^^<degrees>',
            ],
            "YAGO15K_SameAsLink.txt": [
                f"/m/x <SameAs> {YG.format('X_Person')} .",
                f"/m/y <SameAs> {YG.format('Y_Place')} .",
            ],
        },
    )
    stats = build(cfg(tmp_path, dataset="FB15K_YAGO15K"))
    d = tmp_path / "out" / "FB15K_YAGO15K"
    assert read_rows(d / "ent_ids_2") == [["2", YG.format("X_Person")], ["3", YG.format("Y_Place")]]
    assert read_rows(d / "triples_2") == [["2", "1", "3"]]
    assert read_rows(d / "ill_ent_ids") == [["0", "2"], ["1", "3"]]
    assert read_rows(d / "attr_triples_2") == [
        ["2", "<wasBornOnDate>", "1969-03-01"],
        ["3", "<wasCreatedOnDate>", "1950.0000"],
        ["3", "<hasLatitude>", '"41.9"^^<degrees>'],
    ]
    k2 = stats["kgs"][1]
    assert (k2["name"], k2["numeric_values"], k2["text_values"]) == ("YAGO15K", 1, 2)
    assert stats["links"]["links_both_ends_in_triples"] == 2


# MMKB's complete YAGO15K files in miniature: triples not sorted (the partial file in ../shared is
# sorted by relation, MMKB's is not), every linked entity in some triple, dates with unknown parts
# (`1861-##-##`), coordinates, and repeated attribute lines as MMKB's file has.
YG_COMPLETE_TRIPLES = [
    ("Javier_Bardem", "wasBornIn", "Las_Palmas"),
    ("Javier_Bardem", "isMarriedTo", "Penélope_Cruz"),
    ("Javier_Bardem", "actedIn", "No_Country_for_Old_Men"),
    ("Penélope_Cruz", "actedIn", "Vicky_Cristina_Barcelona"),
    ("Ahmedabad", "isLocatedIn", "India"),
    ("Kansas", "hasCapital", "Topeka,_Kansas"),
    ("Las_Palmas", "isLocatedIn", "Spain"),
]
YG_COMPLETE_ATTRS = [
    ("Ahmedabad", "hasLatitude", "23.03"),
    ("Javier_Bardem", "wasBornOnDate", "1969-03-01"),
    ("Ahmedabad", "hasLongitude", "72.58"),
    ("Kansas", "wasCreatedOnDate", "1861-##-##"),
    ("Javier_Bardem", "wasBornOnDate", "1969-03-01"),  # repeated line, as in MMKB's file
    ("Spain", "hasLatitude", "40.0"),  # an entity in triples but in no link: kept
    ("Ahmedabad", "hasLatitude", "23.03"),  # repeated line
    ("Topeka,_Kansas", "wasCreatedOnDate", "1854.0000"),  # YYYY.MMDD spelling of a date
]
YG_COMPLETE_LINKS = [
    ("/m/bardem", "Javier_Bardem"),
    ("/m/cruz", "Penélope_Cruz"),
    ("/m/ahmedabad", "Ahmedabad"),
    ("/m/kansas", "Kansas"),
    ("/m/nocountry", "No_Country_for_Old_Men"),
]


def test_yago_complete_format_builds_every_entity_and_triple(tmp_path):
    """Nothing in the builder relies on the partial YAGO15K file (sorted, 747 linked entities in no
    triple): a file in MMKB's complete form gives every entity and triple, no isolated node, ids in
    the file's order, repeated attribute lines kept and counted, dates and coordinates verbatim."""
    fb_triples = [
        "/m/bardem /people/person/spouse_s /m/cruz .",
        "/m/bardem /film/actor/film /m/nocountry .",
        "/m/ahmedabad /location/location/containedby /m/india .",
        "/m/kansas /location/location/contains /m/topeka .",
    ]
    write_raw(
        tmp_path / "mmkb",
        "YAGO15K",
        {
            "FB15K_EntityTriples.txt": fb_triples,
            "FB15K_NumericalTriples.txt": [f"/m/ahmedabad\t{FBA.format('location.geocode.latitude')}\t23.03"],
            "YAGO15K_EntityTriples.txt": [
                f"{YG.format(h)} {YG.format(r)} {YG.format(t)} ." for h, r, t in YG_COMPLETE_TRIPLES
            ],
            "YAGO15K_NumericalTriples.txt": [f"{YG.format(e)}\t{YG.format(a)}\t{v}" for e, a, v in YG_COMPLETE_ATTRS],
            "YAGO15K_SameAsLink.txt": [f"{fb} <SameAs> {YG.format(yg)} ." for fb, yg in YG_COMPLETE_LINKS],
        },
    )
    stats = build(cfg(tmp_path, dataset="FB15K_YAGO15K"))
    d = tmp_path / "out" / "FB15K_YAGO15K"

    order = list(dict.fromkeys(e for h, _, t in YG_COMPLETE_TRIPLES for e in (h, t)))  # first appearance
    assert order != sorted(order)  # the fixture is not in sorted order, so the ids below test the file's order
    n1 = 7  # /m/bardem /m/cruz /m/nocountry /m/ahmedabad /m/india /m/kansas /m/topeka
    assert read_rows(d / "ent_ids_2") == [[str(n1 + i), YG.format(e)] for i, e in enumerate(order)]
    yid = {e: n1 + i for i, e in enumerate(order)}
    rels = list(dict.fromkeys(r for _, r, _ in YG_COMPLETE_TRIPLES))
    n_rel1 = 4
    assert read_rows(d / "triples_2") == [
        [str(yid[h]), str(n_rel1 + rels.index(r)), str(yid[t])] for h, r, t in YG_COMPLETE_TRIPLES
    ]
    assert [row[1] for row in read_rows(d / "ill_ent_ids")] == [str(yid[yg]) for _, yg in YG_COMPLETE_LINKS]

    k1, k2 = stats["kgs"]
    assert (k2["entities"], k2["entities_in_triples"], k2["isolated_linked_entities"]) == (len(order), len(order), 0)
    assert (k1["entities"], k1["isolated_linked_entities"]) == (n1, 0)
    assert (k2["relations"], k2["triples"], k2["unique_triples"]) == (len(rels), 7, 7)
    assert stats["links"]["links"] == stats["links"]["links_both_ends_in_triples"] == 5
    assert (k2["attribute_triples"], k2["duplicate_attribute_triples"], k2["attribute_triples_dropped"]) == (8, 2, 0)
    assert (k2["distinct_attributes"], k2["entities_with_attributes"]) == (4, 5)
    # coordinates and the YYYY.MMDD date read as numbers; ISO dates and `##` dates as text
    assert (k2["numeric_values"], k2["text_values"]) == (5, 3)

    # values exactly as in the raw file, repeated lines kept in raw-file order
    assert read_rows(d / "attr_triples_2") == [[str(yid[e]), YG.format(a), v] for e, a, v in YG_COMPLETE_ATTRS]
    # training_attrs: each attribute once per entity, entities in id order
    assert read_rows(d / "training_attrs_2") == [
        [YG.format("Javier_Bardem"), YG.format("wasBornOnDate")],
        [YG.format("Ahmedabad"), YG.format("hasLatitude"), YG.format("hasLongitude")],
        [YG.format("Kansas"), YG.format("wasCreatedOnDate")],
        [YG.format("Topeka,_Kansas"), YG.format("wasCreatedOnDate")],
        [YG.format("Spain"), YG.format("hasLatitude")],
    ]
    # the attribute text these files give: values verbatim, repeats once, no entity name
    pairs: dict[int, list[tuple[str, str]]] = {}
    for e, a, v in read_rows(d / "attr_triples_2"):
        pairs.setdefault(int(e), []).append((a, v))
    sentences = text_features.attribute_sentences(pairs)
    assert sentences[yid["Kansas"]] == "was created on date is 1861-##-##"
    assert sentences[yid["Javier_Bardem"]] == "was born on date is 1969-03-01"
    assert sentences[yid["Ahmedabad"]] == "has latitude is 23.03, has longitude is 72.58"
    # the loader's attribute bag-of-words: one binary column per distinct attribute name of both KGs
    # (5 here: FB15K's latitude and YAGO's 4), not padded to 1,000
    data = load_dataset(d)
    bow = data.features["attr_bow"]
    assert bow.shape == (n1 + len(order), 5) and set(np.unique(bow)) == {0.0, 1.0}
    assert bow[yid["Ahmedabad"]].sum() == 2 and bow[yid["Javier_Bardem"]].sum() == 1


@pytest.mark.parametrize(
    "file, line, expected, got",
    [
        (
            "FB15K_EntityTriples.txt",
            "/m/a /film/film/genre /m/b",
            "expected 'head relation tail .'",
            "got 3 fields",
        ),
        (
            "FB15K_EntityTriples.txt",
            "/m/a /film/film/genre /m/b ;",
            "expected 'head relation tail .'",
            "got ';'",
        ),
        ("DB15K_EntityTriples.txt", "<a> <r> <b> <c> .", "4 whitespace-separated fields", "got 5 fields"),
        (
            "DB15K_SameAsLink.txt",
            "/m/a <http://x/y> <b> .",
            "expected 'fb_entity <SameAs> kg2_entity .'",
            "predicate",
        ),
        ("DB15K_SameAsLink.txt", "/m/a <SameAs> <b>", "expected 'fb_entity <SameAs> kg2_entity .'", "got 3 fields"),
        (
            "DB15K_NumericalTriples.txt",
            "<a>\tgross",
            "expected 'entity<TAB>attribute<TAB>value'",
            "got 2 fields",
        ),
        ("FB15K_NumericalTriples.txt", "/m/a\tx\t1\t2", "3 tab-separated", "got 4 fields"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, file, line, expected, got):
    raw = {
        "FB15K_EntityTriples.txt": FB_TRIPLES,
        "FB15K_NumericalTriples.txt": FB_ATTRS,
        "DB15K_EntityTriples.txt": DB_TRIPLES,
        "DB15K_NumericalTriples.txt": DB_ATTRS,
        "DB15K_SameAsLink.txt": DB_LINKS,
    }
    lines = list(raw[file])
    lines.insert(2, line)
    fb_db_raw(tmp_path / "mmkb", **{file.replace(".", "__"): lines})
    with pytest.raises(BuildError) as err:
        build(cfg(tmp_path))
    msg = str(err.value)
    assert f"{file} line 3:" in msg and expected in msg and got in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_file_names_what_and_where(tmp_path):
    root = fb_db_raw(tmp_path / "mmkb")
    (root / "DB15K" / "DB15K_SameAsLink.txt").unlink()
    with pytest.raises(
        BuildError,
        match=r"missing input: expected the FB15K-DB15K SameAs links at .*"
        r"DB15K[/\\]DB15K_SameAsLink\.txt",
    ):
        build(cfg(tmp_path))


def test_existing_output_untouched_without_force(tmp_path):
    fb_db_raw(tmp_path / "mmkb")
    old = tmp_path / "out" / "FB15K_DB15K"
    old.mkdir(parents=True)
    (old / "ent_ids_1").write_text("old\n")
    with pytest.raises(BuildError, match="already exists; pass --force"):
        build(cfg(tmp_path))
    assert (old / "ent_ids_1").read_text() == "old\n" and len(list(old.iterdir())) == 1
    build(cfg(tmp_path, force=True))
    assert (old / "ent_ids_1").read_text().startswith("0\t/m/a\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["FB15K_DB15K"]  # no leftovers


@pytest.mark.parametrize("force", [False, True])
def test_failure_half_way_leaves_no_dataset(tmp_path, monkeypatch, force):
    fb_db_raw(tmp_path / "mmkb")
    out = tmp_path / "out"
    if force:  # an old complete dataset must survive a failed --force rebuild
        (out / "FB15K_DB15K").mkdir(parents=True)
        (out / "FB15K_DB15K" / "ent_ids_1").write_text("old\n")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash after the layout was written")

    monkeypatch.setattr(build_mmkb, "coverage", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(cfg(tmp_path, force=force))
    left = sorted(p.name for p in out.iterdir())
    if force:
        assert left == ["FB15K_DB15K"] and (out / "FB15K_DB15K" / "ent_ids_1").read_text() == "old\n"
    else:
        assert left == []


def test_cli_user_error_exits_nonzero_without_traceback(tmp_path):
    fb_db_raw(tmp_path / "mmkb", FB15K_EntityTriples__txt=["/m/a /r /m/b ."] * 16 + ["/m/a /r /m/b"])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_process.build_mmkb",
            "--mmkb",
            str(tmp_path / "mmkb"),
            "--dataset",
            "FB15K_DB15K",
            "--out",
            str(tmp_path / "out"),
            "--no_text",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert (
        "FB15K_EntityTriples.txt line 17: expected 'head relation tail .' (4 whitespace-separated fields), "
        "got 3 fields" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_parse_args_defaults_and_help():
    c = build_mmkb.parse_args(["--mmkb", "m", "--dataset", "FB15K_YAGO15K"])
    assert (c.out, c.pooling, c.no_text, c.force, c.image_h5) == (
        Path("data/mmkb-datasets"),
        "cls",
        False,
        False,
        [],
    )
    with pytest.raises(SystemExit):
        build_mmkb.parse_args(["--mmkb", "m", "--dataset", "FB15K_WIKI"])


def assert_line_counts(folder: Path, counts: dict[str, int]) -> None:
    """Each built file of ``folder`` has the expected number of lines."""
    for name, n in counts.items():
        with open(folder / name, encoding="utf-8") as f:
            assert sum(1 for _ in f) == n, name


@pytest.mark.skipif(not REAL_MMKB.is_dir(), reason=f"raw MMKB files not found at {REAL_MMKB}")
def test_real_fb15k_db15k(tmp_path):
    """The raw FB15K/DB15K: the complete FB15k graph (592,213 triples; about 5 s with --no_text)."""
    stats = build(BuildConfig(mmkb=REAL_MMKB, dataset="FB15K_DB15K", out=tmp_path, no_text=True))
    k1, k2 = stats["kgs"]
    assert (k1["entities"], k1["entities_in_triples"], k1["isolated_linked_entities"]) == (14_951, 14_951, 0)
    assert (k2["entities"], k2["entities_in_triples"], k2["isolated_linked_entities"]) == (12_842, 12_842, 0)
    assert (k1["triples"], k2["triples"]) == (592_213, 99_028)
    assert (k1["unique_triples"], k2["unique_triples"]) == (592_213, 89_197)
    assert (k1["relations"], k2["relations"]) == (1_345, 279)
    assert stats["links"]["links"] == 12_846
    assert stats["links"]["links_both_ends_in_triples"] == 12_846
    assert stats["links"]["kg2_entities_linked_more_than_once"] == 4
    assert_line_counts(tmp_path / "FB15K_DB15K", {"ent_ids_1": 14_951, "ent_ids_2": 12_842, "triples_1": 592_213,
                                                   "triples_2": 99_028, "ill_ent_ids": 12_846, "rel_names": 1_624})


@pytest.mark.skipif(not (REAL_MMKB / "YAGO15K").is_dir(), reason=f"raw YAGO15K files not found at {REAL_MMKB}")
def test_real_fb15k_yago15k(tmp_path):
    """The raw FB15K/YAGO15K (about 5 s with --no_text). The YAGO15K entity-triple file in ../shared is
    PARTIAL: 70,414 of MMKB's 122,886 triples (57%), hence 747 linked YAGO entities in no triple and 29
    attribute triples whose entity is in neither a triple nor a link; links and attributes are complete."""
    stats = build(BuildConfig(mmkb=REAL_MMKB, dataset="FB15K_YAGO15K", out=tmp_path, no_text=True))
    k1, k2 = stats["kgs"]
    assert (k1["entities"], k1["entities_in_triples"], k1["isolated_linked_entities"]) == (14_951, 14_951, 0)
    assert (k2["entities"], k2["entities_in_triples"], k2["isolated_linked_entities"]) == (15_371, 14_624, 747)
    assert (k1["triples"], k2["triples"]) == (592_213, 70_414)  # YAGO15K: 57% of MMKB's 122,886
    assert (k1["unique_triples"], k2["unique_triples"]) == (592_213, 70_414)
    assert (k1["relations"], k2["relations"]) == (1_345, 32)
    assert (k1["attribute_triples"], k2["attribute_triples"]) == (29_395, 23_503)
    assert (k1["attribute_triples_dropped"], k2["attribute_triples_dropped"]) == (0, 29)
    assert (k1["distinct_attributes"], k2["distinct_attributes"]) == (116, 7)
    assert (k1["entities_with_attributes"], k2["entities_with_attributes"]) == (12_493, 15_057)
    # YAGO dates are partly YYYY.MMDD decimals (`1997.1012`), counted as numbers with the coordinates
    assert (k2["numeric_values"], k2["text_values"]) == (13_685, 9_818)
    assert stats["links"] == {
        "links": 11_199,
        "unique_links": 11_199,
        "duplicate_links": 0,
        "links_both_ends_in_triples": 10_452,
        "kg1_entities_linked_more_than_once": 0,
        "kg2_entities_linked_more_than_once": 0,
    }
    assert_line_counts(tmp_path / "FB15K_YAGO15K", {"ent_ids_1": 14_951, "ent_ids_2": 15_371, "triples_1": 592_213,
                                                     "triples_2": 70_414, "ill_ent_ids": 11_199, "rel_names": 1_377,
                                                     "training_attrs_2": 15_057, "attr_triples_2": 23_503})
