"""Text and image features: a tiny random BERT (no download), tiny h5 files, ResNet when torchvision works."""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_process import build_mmkb, image_features, text_features
from data_process.build_mmkb import BuildConfig, build
from data_process.text_features import TextEncoder, attribute_sentences, name_to_words

DB = "<http://dbpedia.org/resource/{}>"
DBO = "<http://dbpedia.org/ontology/{}>"
FBA = "<http://rdf.freebase.com/ns/{}>"

# Entity names chosen so that any leak is easy to spot in a text: their words occur nowhere else.
RAW = {
    "FB15K/FB15K_EntityTriples.txt": [
        "/m/0zqx /film/film/genre /m/0wvk .",
        "/m/0pxj /location/location/contains /m/0zqx .",
        "/m/0zqx /film/film/genre /m/0zqx .",  # self-loop
    ],
    "FB15K/FB15K_NumericalTriples.txt": [
        f"/m/0zqx\t{FBA.format('film.film.initial_release_date')}\t1994.0",
        f"/m/0pxj\t{FBA.format('location.geocode.longitude')}\t-9.5e-05",
        f"/m/0pxj\t{FBA.format('location.geocode.latitude')}\t54.2",
    ],
    "DB15K/DB15K_EntityTriples.txt": [
        f"{DB.format('Zanzibar_Quokka')} {DBO.format('genre')} {DB.format('Xylophone_Waltz')} .",
        f"{DB.format('Yodel_Kazoo')} {DBO.format('influencedBy')} {DB.format('Zanzibar_Quokka')} .",
    ],
    "DB15K/DB15K_NumericalTriples.txt": [
        f"{DB.format('Zanzibar_Quokka')}\tgross\t75500000.0",
        f"{DB.format('Yodel_Kazoo')}\tbirthDate\t1969-03-01",
        f"{DB.format('Yodel_Kazoo')}\tinfluencer\t{DB.format('Xylophone_Waltz')}",  # a value naming an entity
    ],
    "DB15K/DB15K_SameAsLink.txt": [
        f"/m/0zqx <SameAs> {DB.format('Zanzibar_Quokka')} .",
        f"/m/0wvk <SameAs> {DB.format('Xylophone_Waltz')} .",
        f"/m/0iso <SameAs> {DB.format('Yodel_Kazoo')} .",  # isolated in KG1: no relation-text vector
    ],
}
ENTITY_WORDS = ["zanzibar", "quokka", "xylophone", "waltz", "yodel", "kazoo", "0zqx", "0wvk", "0pxj", "0iso"]

WORDS = (
    "film genre location contains geocode longitude latitude initial release date gross birth influenced "
    "by is relation the a"
).split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) with a tiny WordPiece vocabulary, saved locally."""
    pytest.importorskip("transformers", reason="the optional extra 'text' (pip install -e '.[text]')")
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert")
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + list('.,-:^<>/"') + WORDS + ["##" + c for c in chars]
    )
    (d / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(d)
    return d


def write_raw(root: Path) -> Path:
    for rel, lines in RAW.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return root


def load(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


# ----------------------------------------------------------------------------- text recipe


@pytest.mark.parametrize(
    "name, words",
    [
        ("/film/film/genre", "film film genre"),
        ("<http://dbpedia.org/ontology/influencedBy>", "influenced by"),
        ("<http://rdf.freebase.com/ns/location.geocode.longitude>", "location geocode longitude"),
        (
            "/award/award_winner/awards_won./award/award_honor/award_winner",
            "award award winner awards won award award honor award winner",
        ),
        ("<http://www.w3.org/2000/01/rdf-schema#seeAlso>", "see also"),
        ("<http://yago-knowledge.org/resource/isLocatedIn>", "is located in"),
        ("<wasBornOnDate>", "was born on date"),
        ("wgs84_pos#long", "wgs84 pos long"),
        ("imdbId", "imdb id"),
        ("ns:film.film.genre", "film film genre"),
    ],
)
def test_name_to_words(name, words):
    assert name_to_words(name) == words


def test_attribute_sentence():
    s = attribute_sentences(
        {
            3: [
                ("gross", "75500000.0"),
                ("<wasBornOnDate>", '"1969-03-01"^^xsd:date'),
                ("gross", "75500000.0"),
            ],
            4: [],
        }
    )
    assert s == {3: "gross is 75500000.0, was born on date is 1969-03-01"}


# ----------------------------------------------------------------------------- encoder


def test_encoder_shapes_order_and_padding(tiny_bert):
    texts = ["film genre", "location contains the a relation is film genre location", "gross", "film genre"]
    for pooling in text_features.POOLINGS:
        enc = TextEncoder(str(tiny_bert), pooling=pooling, device="cpu", batch_size=3, max_length=128)
        assert enc.dim == 32 and enc.max_length == 64  # width from the model, length capped by its positions
        vecs, report = enc.encode(texts)
        assert vecs.shape == (4, 32) and vecs.dtype == np.float32
        alone = np.stack([enc.encode([t])[0][0] for t in texts])  # no padding at all
        np.testing.assert_allclose(vecs, alone, atol=1e-5)  # batching, sorting and masking change nothing
        np.testing.assert_array_equal(vecs[0], vecs[3])
        assert report.truncated == 0
    cls = TextEncoder(str(tiny_bert), pooling="cls", device="cpu").encode(texts[:1])[0]
    mean = TextEncoder(str(tiny_bert), pooling="mean", device="cpu").encode(texts[:1])[0]
    assert not np.allclose(cls, mean)


def test_encoder_truncates_long_text(tiny_bert):
    enc = TextEncoder(str(tiny_bert), device="cpu", max_length=8)
    long = " ".join(["film genre"] * 20)
    vecs, report = enc.encode([long, long + " gross"])
    assert report.truncated == 2 and report.max_tokens == 8
    np.testing.assert_allclose(vecs[0], vecs[1], atol=1e-6)  # identical first 7 tokens + [SEP]


def test_encoder_bad_model_dir(tmp_path):
    with pytest.raises(text_features.TextEncoderError, match="--text_model"):
        TextEncoder(str(tmp_path / "nothing_here"), device="cpu")


def test_missing_transformers_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(text_features.TextEncoderError, match=r"pip install humea\[text\]"):
        TextEncoder(str(tmp_path), device="cpu")


class FakeEncoder:
    """One fixed random vector per distinct text; records every text it is asked to encode."""

    name, dim, max_length, device = "fake", 4, 0, "cpu"

    def __init__(self):
        self.seen: list[str] = []
        self.table: dict[str, np.ndarray] = {}

    def encode(self, texts, desc=""):
        self.seen += list(texts)
        rng = np.random.default_rng(len(self.table))
        for t in texts:
            self.table.setdefault(t, rng.normal(size=self.dim).astype(np.float32))
        return np.stack([self.table[t] for t in texts]), text_features.EncodeReport(len(texts), len(texts))


def test_relation_text_is_count_weighted_mean():
    rel_names = [
        "/film/film/genre",
        "/location/location/contains",
        "/film/film_genre",
    ]  # 0 and 2: same phrase?
    triples = np.array([[0, 0, 1], [0, 0, 1], [0, 1, 2], [3, 0, 3], [2, 2, 1]])
    enc = FakeEncoder()
    feats, report = text_features.relation_text_features(triples, rel_names, enc)
    v = [enc.table[p] for p in text_features.relation_phrases(rel_names)]
    assert sorted(feats) == [0, 1, 2, 3] and report.texts == 3
    assert len(enc.seen) == 2  # "film film genre" encoded once for relations 0 and 2
    np.testing.assert_allclose(feats[0], (2 * v[0] + v[1]) / 3, rtol=1e-6)
    np.testing.assert_allclose(feats[1], (2 * v[0] + v[2]) / 3, rtol=1e-6)
    np.testing.assert_allclose(feats[2], (v[1] + v[2]) / 2, rtol=1e-6)
    np.testing.assert_allclose(feats[3], v[0], rtol=1e-6)  # a self-loop counts once
    assert all(x.dtype == np.float32 and x.shape == (4,) for x in feats.values())


def test_texts_never_contain_entity_names(tmp_path, monkeypatch):
    """The text builders see relation names and attribute pairs only, never an entity name or URI."""
    write_raw(tmp_path / "mmkb")
    fakes = []

    def fake_encoder(*args, **kwargs):
        fakes.append(FakeEncoder())
        return fakes[-1]

    monkeypatch.setattr(text_features, "TextEncoder", fake_encoder)
    stats = build(BuildConfig(mmkb=tmp_path / "mmkb", dataset="FB15K_DB15K", out=tmp_path / "out", text_model="unused"))
    seen = fakes[0].seen
    assert "film film genre" in seen and "gross is 75500000.0" in seen
    assert "birth date is 1969-03-01" in seen  # the value naming an entity was dropped
    text = " ".join(seen).lower()
    for word in ENTITY_WORDS + ["dbpedia", "resource", "http", "/m/"]:
        assert word not in text, word
    assert stats["text"]["attribute_values_dropped_naming_an_entity"] == 1


def test_build_with_tiny_bert(tmp_path, tiny_bert):
    write_raw(tmp_path / "mmkb")
    stats = build(
        BuildConfig(
            mmkb=tmp_path / "mmkb",
            dataset="FB15K_DB15K",
            out=tmp_path / "out",
            text_model=str(tiny_bert),
            device="cpu",
            pooling="mean",
        )
    )
    d = tmp_path / "out" / "FB15K_DB15K"
    rel, attr = load(d / "triples_feature_dict.pkl"), load(d / "attribute_feature_dict.pkl")
    # ids: /m/0zqx 0, /m/0wvk 1, /m/0pxj 2, /m/0iso 3 (isolated); Zanzibar 4, Xylophone 5, Yodel 6
    assert sorted(rel) == [0, 1, 2, 4, 5, 6]
    assert sorted(attr) == [0, 2, 4, 6]
    for feats in (rel, attr):
        assert all(type(k) is int and v.dtype == np.float32 and v.shape == (32,) for k, v in feats.items())
    assert stats["text"]["dim"] == 32 and stats["text"]["max_length"] == 64
    assert stats["coverage"]["relation_text"] == {"kg1": 0.75, "kg2": 1.0, "all": round(6 / 7, 4)}
    assert stats["coverage"]["attribute_text"]["all"] == round(4 / 7, 4)
    assert not list(d.glob("*_id_img_feature_dict.pkl"))


# ----------------------------------------------------------------------------- images

NAME_TO_IDS = {"/m/0zqx": [0], "/m/0wvk": [1], DB.format("Zanzibar_Quokka"): [4]}


def test_h5_per_key_datasets(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "FB15K_ImageData.h5", "w") as f:
        f["img_a1"] = np.array([1.0, 2.0, 3.0], dtype=np.float32)
        f["img_a2"] = np.array([3.0, 4.0, 5.0], dtype=np.float32)
        f["img_b"] = np.array([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]], dtype=np.float32)  # 2 images of one key
    (tmp_path / "FB15K_ImageIndex.txt").write_text(
        "/m/0zqx\timg_a1\n/m/0zqx\timg_a2\n/m/0wvk\timg_b\n/m/unknown\timg_b\n"
        "http://dbpedia.org/resource/Zanzibar_Quokka\timg_missing\n"
    )
    feats, rep = image_features.h5_image_features(tmp_path / "FB15K_ImageData.h5", None, NAME_TO_IDS)
    assert sorted(feats) == [0, 1]
    np.testing.assert_allclose(feats[0], [2.0, 3.0, 4.0])
    np.testing.assert_allclose(feats[1], [1.0, 1.0, 1.0])
    assert (rep.images, rep.entities, rep.unknown_entities, rep.missing_keys, rep.dim) == (4, 2, 1, 1, 3)


def test_h5_single_matrix(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "vgg.h5", "w") as f:
        f["features"] = np.arange(12, dtype=np.float32).reshape(4, 3)
    (tmp_path / "index.txt").write_text("/m/0zqx 1\n/m/0zqx 3\n<http://dbpedia.org/resource/Zanzibar_Quokka> 0\n")
    feats, rep = image_features.h5_image_features(tmp_path / "vgg.h5", tmp_path / "index.txt", NAME_TO_IDS)
    np.testing.assert_allclose(feats[0], [6.0, 7.0, 8.0])
    np.testing.assert_allclose(feats[4], [0.0, 1.0, 2.0])
    assert rep.entities == 2 and all(v.dtype == np.float32 for v in feats.values())


def test_build_with_h5_images(tmp_path):
    h5py = pytest.importorskip("h5py")
    write_raw(tmp_path / "mmkb")
    with h5py.File(tmp_path / "DB15K_ImageData.h5", "w") as f:
        f["k1"] = np.ones(5, dtype=np.float32)
        f["k2"] = np.zeros(5, dtype=np.float32)
    (tmp_path / "DB15K_ImageIndex.txt").write_text(
        f"{DB.format('Zanzibar_Quokka')}\tk1\n{DB.format('Yodel_Kazoo')}\tk2\n"
    )
    stats = build(
        BuildConfig(
            mmkb=tmp_path / "mmkb",
            dataset="FB15K_DB15K",
            out=tmp_path / "out",
            no_text=True,
            image_h5=[tmp_path / "DB15K_ImageData.h5"],
        )
    )
    img = load(tmp_path / "out" / "FB15K_DB15K" / "FB15K_DB15K_id_img_feature_dict.pkl")
    assert sorted(img) == [4, 6] and img[4].shape == (5,)
    assert stats["coverage"]["image"] == {"kg1": 0.0, "kg2": round(2 / 3, 4), "all": round(2 / 7, 4)}


def test_missing_h5py_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` raise ImportError
    with pytest.raises(image_features.ImageInputError, match=r"pip install humea\[h5\]"):
        image_features.h5_image_features(tmp_path / "x.h5", None, {})


def test_bad_index_line(tmp_path):
    (tmp_path / "idx.txt").write_text("/m/0zqx\tk\nlonely\n")
    with pytest.raises(image_features.ImageInputError, match="idx.txt line 2: expected 'entity<TAB>key'"):
        image_features.read_image_index(tmp_path / "idx.txt")


def test_list_entity_images(tmp_path):
    import urllib.parse

    (tmp_path / f"{urllib.parse.quote('/m/0zqx', safe='')}.jpg").write_bytes(b"")
    sub = tmp_path / urllib.parse.quote(DB.format("Zanzibar_Quokka"), safe="")
    sub.mkdir()
    (sub / "1.png").write_bytes(b"")
    (sub / "2.JPG").write_bytes(b"")
    (sub / "notes.txt").write_bytes(b"")
    (tmp_path / "stranger.jpg").write_bytes(b"")
    by_id, unknown = image_features.list_entity_images(tmp_path, NAME_TO_IDS)
    assert {k: [p.name for p in v] for k, v in by_id.items()} == {
        0: ["%2Fm%2F0zqx.jpg"],
        4: ["1.png", "2.JPG"],
    }
    assert unknown == 1
    (tmp_path / "map.txt").write_text("/m/0wvk\tstranger.jpg\n")
    by_id, _ = image_features.list_entity_images(tmp_path, NAME_TO_IDS, tmp_path / "map.txt")
    assert {k: [p.name for p in v] for k, v in by_id.items()} == {1: ["stranger.jpg"]}


def _torchvision_or_skip():
    try:
        import torchvision  # noqa: F401
        from PIL import Image
    except Exception as e:  # a torchvision wheel built for another torch raises RuntimeError on import
        pytest.skip(f"torchvision/pillow not usable with this torch: {type(e).__name__}: {e}")
    return torchvision, Image


def test_resnet_folder_features(tmp_path):
    torchvision, Image = _torchvision_or_skip()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pt")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ["%2Fm%2F0zqx.png", "%2Fm%2F0wvk.jpg"]:
        Image.fromarray(rng.integers(0, 255, size=(40, 60, 3), dtype=np.uint8)).save(images / name)
    feats, rep = image_features.folder_image_features(
        images, NAME_TO_IDS, tmp_path / "resnet18.pt", arch="resnet18", device="cpu"
    )
    assert sorted(feats) == [0, 1] and feats[0].shape == (512,) and rep.dim == 512


def test_missing_torchvision_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(image_features.ImageInputError, match=r"pip install humea\[vision\]"):
        image_features.load_resnet(tmp_path / "w.pt")


def test_image_dir_needs_weights(tmp_path):
    write_raw(tmp_path / "mmkb")
    with pytest.raises(build_mmkb.BuildError, match="--resnet_weights"):
        build(
            BuildConfig(
                mmkb=tmp_path / "mmkb",
                dataset="FB15K_DB15K",
                out=tmp_path / "out",
                no_text=True,
                image_dir=[tmp_path],
            )
        )
