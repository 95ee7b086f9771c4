"""Fuzzing every file the loader reads: seeded corruptions of each (truncation, bit flips, wrong column
counts, wrong types, empty files, duplicated keys, ...) must each end in a clean error (DataError:
`error: ...` and exit 2 on the command line) or in a documented acceptance (docs/reliability.md,
"Untrusted inputs"), never in another exception, a hang or code execution.

An accepted corruption must still give a dataset that keeps the loader's promises (``dataset_kept_promises``)
or, for the checkpoint, exactly the original checkpoint (its records carry CRC-32s, so a corruption that
loads can only have hit bytes outside them). About 3,000 cases in all, a few seconds on one CPU thread.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import signal
import time
import traceback
import zipfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOY_FILES, TOY_IMAGE, TOY_REL_TEXT, write_folder
from test_untrusted_inputs import same

import train
from data_process.dataset import load_dataset, normalise_features
from utils import MIN_FEATURE_COVERAGE, DataError

SEED = 28
BYTE_CASES = 200  # byte-level corruptions per file; the structured ones come on top
CASE_SECONDS = 5  # a case that takes longer counts as a hang
MARKER = "fuzz_code_ran"  # what a corruption that ran code would create

TEXT_FILES = tuple(TOY_FILES)
# Each feature pickle in another of the forms the official data and this repository's writers use.
ATTR_TEXT = {i: [0.5 * i, -1.0, 2.0, 0.25] for i in (0, 1, 3, 4, 5)}  # lists of floats
PICKLES = {  # file -> (dict, pickle protocol)
    "toy_id_img_feature_dict.pkl": ({k: np.asarray(v, np.float32) for k, v in TOY_IMAGE.items()}, 5),
    "triples_feature_dict.pkl": ({k: np.asarray(v, np.float64) for k, v in TOY_REL_TEXT.items()}, 4),
    "attribute_feature_dict.pkl": (ATTR_TEXT, 2),
}
SMALL_RUN = ["--hidden_units", "4,4,4", "--heads", "1,1", "--n_exp", "1", "--bsize", "8", "--club_bsize", "8",
             "--device", "cpu", "--eval_chunk", "64", "--check_point", "1", "--epochs", "2", "--no-save_outputs",
             "--il", "--il_start", "0", "--il_step", "1", "--il_epochs", "1"]


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------
# Corruptions.
# ---------------------------------------------------------------------------------------------


def byte_corruptions(raw: bytes, rng: random.Random, n: int):
    """(kind, bytes): n seeded byte-level corruptions of ``raw``."""
    kinds = ("truncate", "bit flips", "byte overwrite", "bytes inserted", "bytes deleted", "chunk repeated")
    for i in range(n):
        kind, b = kinds[i % len(kinds)], bytearray(raw)
        pos = rng.randrange(len(b))
        if kind == "truncate":
            b = b[:pos]
        elif kind == "bit flips":
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == "byte overwrite":
            b[pos] = rng.randrange(256)
        elif kind == "bytes inserted":
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif kind == "bytes deleted":
            del b[pos:pos + rng.randint(1, 8)]
        else:
            b[pos:pos] = b[pos:pos + rng.randint(1, 64)]
        yield kind, bytes(b)


WRONG_TOKENS = ("x", "1.5", "-1", "", " ", "nan", "1e3", "99999999999999999999999", "\u0663", "0x10", "\x00", "3 ")


def text_corruptions(text: str, rng: random.Random):
    """(kind, bytes): structured corruptions of a tab-separated text file."""
    lines = text.splitlines()
    yield "empty file", b""
    yield "only a newline", b"\n"
    yield "not UTF-8", text.encode() + b"\xff\xfe\n"
    yield "CRLF line ends", text.replace("\n", "\r\n").encode()
    for _ in range(8):
        i = rng.randrange(len(lines))
        fields = lines[i].split("\t")
        j = rng.randrange(len(fields))
        variants = {
            "wrong column count (a field more)": fields + [rng.choice(fields)],
            "wrong column count (a field less)": fields[:-1] or [""],
            "field replaced": fields[:j] + [rng.choice(WRONG_TOKENS)] + fields[j + 1:],
            "separator swapped": [" ".join(fields)],
        }
        for kind, new in variants.items():
            yield kind, "\n".join(lines[:i] + ["\t".join(new)] + lines[i + 1:]).encode() + b"\n"
        yield "duplicated line (key)", "\n".join(lines[:i + 1] + [lines[i]] + lines[i + 1:]).encode() + b"\n"
        yield "line deleted", "\n".join(lines[:i] + lines[i + 1:]).encode() + b"\n"


class _RepeatFirstKey(pickle._Pickler):
    """Writes a dict whose first key is set twice in the stream (pickle keeps the last value)."""

    def _batch_setitems(self, items, *rest):
        items = list(items)
        super()._batch_setitems(iter(items + [(items[0][0], items[-1][1])]), *rest)


class _RunsCode:
    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def pickled(obj, protocol: int) -> bytes:
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=protocol)
    return buf.getvalue()


def pickle_corruptions(feats: dict, protocol: int, rng: random.Random):
    """(kind, bytes): structured corruptions of a feature pickle: wrong types, keys, shapes, values."""
    keys = list(feats)
    size = len(np.asarray(feats[keys[0]]))
    yield "empty file", b""
    for obj in ([1.0, 2.0], (1, 2), 7, None, "text", np.zeros((3, size))):
        yield "not a dict", pickled(obj, protocol)
    bad_values = (0, 1.5, True, "abc", None, [], [[1.0] * size], np.zeros((1, size)), np.zeros(size + 1),
                  np.zeros(size, complex), np.array(["a"] * size), [1.0] * (size - 1) + ["x"], {"a": 1.0},
                  np.full(size, np.nan), np.full(size, np.inf), [1e39] * size, np.zeros(0),
                  np.array([1.0] * size, object), np.zeros(size, [("a", "f4")]))
    for value in bad_values:
        yield "wrong value type", pickled({**feats, rng.choice(keys): value}, protocol)
    for value in (np.ones(size, bool), np.ones(size, ">f8"), np.zeros(size, np.int8), np.arange(2 * size)[::2],
                  tuple(range(size)), [np.float32(1.0)] * size):
        yield "other numeric form", pickled({**feats, rng.choice(keys): value}, protocol)
    for key in (3.0, True, -1, 99, "x", (1, 2), None, b"1", "+-1"):
        k = rng.choice([kk for kk in keys if kk != key])  # a dict would merge 3.0 or True into an equal int key
        yield "wrong key", pickled({(key if kk == k else kk): v for kk, v in feats.items() if kk != key}, protocol)
    yield "key as a digit string", pickled({str(k): v for k, v in feats.items()}, protocol)
    yield "duplicated key (int and str)", pickled({**feats, str(keys[0]): feats[keys[0]]}, protocol)
    buf = io.BytesIO()
    _RepeatFirstKey(buf, protocol).dump(feats)
    yield "duplicated key (set twice in the stream)", buf.getvalue()
    yield "code-running value", pickled({**feats, keys[0]: _RunsCode()}, protocol)


def checkpoint_corruptions(path: Path, rng: random.Random):
    """(kind, bytes): structured corruptions of a checkpoint, each of which must be refused."""
    ckpt = torch.load(path, weights_only=False)

    def saved(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    yield "empty file", b""
    yield "not a dict", saved([ckpt["epoch"]])
    for key, (types, _) in train.CHECKPOINT_FIELDS.items():
        yield "key missing", saved({k: v for k, v in ckpt.items() if k != key})
        wrong = [v for v in ("x", 1.5, [1], {"a": 1}, True, None) if not isinstance(v, types) or v is True]
        yield "wrong type", saved({**ckpt, key: rng.choice(wrong)})
    yield "wrong type", saved({**ckpt, "model": {**ckpt["model"], next(iter(ckpt["model"])): "x"}})
    yield "wrong type", saved({**ckpt, "pseudo_pairs": np.zeros(4, np.int64)})
    yield "wrong type", saved({**ckpt, "pseudo_pairs": np.zeros((2, 2), np.float32)})
    yield "wrong type", saved({**ckpt, "epoch": -1})
    yield "wrong type", saved({**ckpt, "numpy_rng": (ckpt["numpy_rng"][0], np.array(["a"], object))})
    yield "code-running value", saved({**ckpt, "history": [*ckpt["history"], _RunsCode()]})
    buf = io.BytesIO(path.read_bytes())
    with zipfile.ZipFile(buf, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        first = z.namelist()[0]
        z.writestr(first, z.read(first))
    yield "duplicated record (key)", buf.getvalue()


# ---------------------------------------------------------------------------------------------
# What an accepted corruption must still give.
# ---------------------------------------------------------------------------------------------


def dataset_kept_promises(data) -> None:
    n = data.num_entities
    assert len(data.names) == len(data.kg) == n and set(np.unique(data.kg)) <= {0, 1}
    assert data.links.ndim == 2 and data.links.shape[1] == 2 and len(data.links)
    assert (data.kg[data.links[:, 0]] == 0).all() and (data.kg[data.links[:, 1]] == 1).all()
    assert len(np.unique(data.links, axis=0)) == len(data.links)
    t = data.triples
    assert t.ndim == 2 and t.shape[1] == 3 and ((t[:, [0, 2]] >= 0) & (t[:, [0, 2]] < n)).all()
    assert (data.kg[t[:, 0]] == data.kg[t[:, 2]]).all()
    for m, x in data.features.items():
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[0] == n and x.shape[1] > 0, m
        assert np.isfinite(x).all() and np.isfinite(normalise_features({m: x}, "l2")[m]).all(), m
        assert data.present[m].shape == (n,) and data.coverage[m] >= MIN_FEATURE_COVERAGE, m


# ---------------------------------------------------------------------------------------------
# The fuzz runs.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fuzz_dir(tmp_path, monkeypatch) -> Path:
    """The toy folder with all three feature pickles, in three protocols; the cwd is a scratch folder
    where a corruption that ran code would leave MARKER."""
    monkeypatch.chdir(tmp_path)
    root = write_folder(tmp_path / "toy", dict(TOY_FILES))
    for name, (feats, protocol) in PICKLES.items():
        (root / name).write_bytes(pickled(feats, protocol))
    load_dataset(root, seed=0)  # the uncorrupted folder loads
    return root


def run_cases(path: Path, cases, load, check) -> Counter:
    """Write each case over ``path``, load, and classify: 'refused' (DataError) or 'accepted' (after
    ``check`` of the result). Anything else fails the test with the case."""
    original = path.read_bytes()
    outcomes: Counter = Counter()
    try:
        for i, (kind, data) in enumerate(cases):
            path.write_bytes(data)
            try:
                with time_limit(CASE_SECONDS):
                    result = load()
            except DataError as e:
                assert str(path.parent) in str(e), f"{path.name} {kind} #{i}: the error names no file: {e}"
                outcomes[(kind, "refused")] += 1
                continue
            except Exception:  # noqa: BLE001 - the point of the test
                pytest.fail(f"{path.name}, case #{i} ({kind}): not a clean error:\n{traceback.format_exc()}")
            check(kind, result)
            outcomes[(kind, "accepted")] += 1
    finally:
        path.write_bytes(original)
    assert not Path(MARKER).exists(), "a corruption ran code"
    return outcomes


def summary(name: str, outcomes: Counter) -> str:
    total = sum(outcomes.values())
    accepted = sum(v for (_, how), v in outcomes.items() if how == "accepted")
    return f"{name}: {total} cases, {total - accepted} refused, {accepted} accepted"


# Corruptions that no file may accept.
ALWAYS_REFUSED = {"empty file", "only a newline", "not UTF-8", "not a dict", "wrong value type", "wrong key",
                  "duplicated key (int and str)", "code-running value", "key missing", "wrong type",
                  "duplicated record (key)"}
# Text files where a duplicated line must be refused: a repeated entity id, a repeated aligned pair.
DUPLICATES_REFUSED = {"ent_ids_1", "ent_ids_2", "ill_ent_ids"}
# The attribute files are optional and may be empty (a KG without attributes; build_mmkb writes one so).
OPTIONAL = {"training_attrs_1", "training_attrs_2"}


@pytest.mark.parametrize("name", TEXT_FILES)
def test_fuzz_text_file(name, fuzz_dir):
    path = fuzz_dir / name
    rng = random.Random(f"{SEED}-{name}")
    raw = path.read_bytes()
    cases = [*byte_corruptions(raw, rng, BYTE_CASES), *text_corruptions(raw.decode(), rng)]
    out = run_cases(path, cases, lambda: load_dataset(fuzz_dir, seed=0), lambda kind, data: dataset_kept_promises(data))
    print(summary(name, out))
    assert sum(out.values()) >= BYTE_CASES + 40
    for (kind, how), _ in out.items():
        if name not in OPTIONAL or kind != "empty file":
            assert not (how == "accepted" and kind in ALWAYS_REFUSED), (name, kind)
        if name in DUPLICATES_REFUSED and kind == "duplicated line (key)":
            assert how == "refused", (name, kind)
    if name not in OPTIONAL:  # a cut attribute line is still one (documented)
        assert out[("truncate", "refused")] > 0


@pytest.mark.parametrize("name", list(PICKLES))
def test_fuzz_feature_pickle(name, fuzz_dir):
    path = fuzz_dir / name
    feats, protocol = PICKLES[name]
    rng = random.Random(f"{SEED}-{name}")
    cases = [*byte_corruptions(path.read_bytes(), rng, BYTE_CASES), *pickle_corruptions(feats, protocol, rng)]

    def check(kind, data):
        dataset_kept_promises(data)
        if kind == "duplicated key (set twice in the stream)":  # documented: the last value wins
            m = {"toy_id_img_feature_dict.pkl": "image", "triples_feature_dict.pkl": "rel_text",
                 "attribute_feature_dict.pkl": "attr_text"}[name]
            first, last = list(feats)[0], list(feats)[-1]
            np.testing.assert_array_equal(data.features[m][first], np.asarray(feats[last], np.float32))

    out = run_cases(path, cases, lambda: load_dataset(fuzz_dir, seed=0), check)
    print(summary(name, out))
    assert sum(out.values()) >= BYTE_CASES + 40
    for (kind, how), _ in out.items():
        assert not (how == "accepted" and kind in ALWAYS_REFUSED), (name, kind)
    assert out[("code-running value", "refused")] == 1


@pytest.fixture(scope="module")
def small_checkpoint(tiny_synthetic, tmp_path_factory) -> Path:
    """A real checkpoint of a tiny run (iterative training: pseudo pairs inside), 46 kB."""
    out = tmp_path_factory.mktemp("fuzz_ckpt")
    assert train.cli(["--file_dir", str(tiny_synthetic), "--out_dir", str(out), "--run_name", "g", *SMALL_RUN,
                      "--without", "image,rel_bow,rel_text,attr_bow,attr_text,club"]) == 0
    return out / "g" / "checkpoint.pt"


def test_fuzz_checkpoint(small_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pt"
    shutil.copy(small_checkpoint, path)
    original = train.read_checkpoint(path)
    assert len(original["pseudo_pairs"]) and original["numpy_rng"][1].dtype == np.uint32
    rng = random.Random(f"{SEED}-checkpoint")
    cases = [*byte_corruptions(path.read_bytes(), rng, BYTE_CASES), *checkpoint_corruptions(path, rng)]

    def check(kind, ckpt):  # CRC-32 on every record: what loads is what was written
        assert same(ckpt, original), kind

    tic = time.perf_counter()
    out = run_cases(path, cases, lambda: train.read_checkpoint(path), check)
    print(summary("checkpoint.pt", out), f"{time.perf_counter() - tic:.1f} s")
    assert sum(out.values()) >= BYTE_CASES + 30
    for (kind, how), _ in out.items():
        assert not (how == "accepted" and kind in ALWAYS_REFUSED), kind
