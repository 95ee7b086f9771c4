"""Untrusted inputs (issue 28): a dataset folder or a checkpoint from elsewhere runs no code, and bad
feature dicts are refused with an error naming the file, the key and what was expected.

- feature pickles load through data_process.safe_load: every form the official data and this
  repository's writers use loads (protocols 0-5, numpy 1.x and 2.x names, Python 2), and a pickle
  naming any other global is refused before anything it names is called;
- checkpoints load with torch's weights_only loader (numpy arrays through the same stand-ins) and
  are refused when they name anything else, fail their records' CRC-32 or lack train.py's fields;
- feature dicts are validated (1-d finite numeric vectors of one size, entity-id keys, coverage).

That a resumed run ends bit for bit where an uninterrupted one does, through read_checkpoint, is
pinned by tests/test_reliability.py (a SIGKILLed subprocess; --extend_to).
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import tree_state

import train
from data_process import build_mmkb, synthetic
from data_process.dataset import load_dataset
from data_process.safe_load import ForbiddenGlobal, load_pickle
from utils import Config, DataError

ROOT = Path(__file__).resolve().parents[1]
MARKER = "untrusted_code_ran"  # created in the cwd by every code-running payload below
SMALL = ["--hidden_units", "8,8,8", "--heads", "1,1", "--n_exp", "2", "--bsize", "16", "--club_bsize", "16",
         "--device", "cpu", "--eval_chunk", "64", "--check_point", "2", "--no-save_outputs"]


class RunsCode:
    """A value whose unpickling runs a shell command (the issue's malicious pickle)."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """The cwd, where a payload that ran would leave MARKER."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def same(a, b) -> bool:
    """Equal values of equal types; arrays and tensors with equal dtypes."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b or (a != a and b != b)


def dump(path: Path, obj, protocol: int = 4) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


# ---------------------------------------------------------------------------------------------
# Every benign form loads, as pickle.load would load it.
# ---------------------------------------------------------------------------------------------

OFFICIAL_FORMS = {
    "float32 arrays": {i: np.arange(4, dtype=np.float32) + i for i in range(5)},
    "float64 arrays": {i: np.linspace(0, 1, 4) * i for i in range(5)},
    "lists of floats": {i: [0.5 * i, -1.0, 2.0] for i in range(5)},
    "lists of numpy scalars": {i: list(np.arange(3, dtype=np.float32) * i) for i in range(5)},
    "tuples": {i: (1.0, float(i)) for i in range(5)},
    "numpy int keys": {np.int64(i): np.ones(3, np.float32) for i in range(5)},
    "digit string keys": {str(i): np.ones(3, np.float32) for i in range(5)},
    "big-endian, strided, int and bool arrays": {0: np.arange(3, dtype=">f8"), 1: np.arange(6.0)[::2],
                                                 2: np.arange(3), 3: np.ones(3, bool), 4: np.zeros(3, np.float16)},
    "empty array among others": {"meta": np.zeros(0), 1: np.ones(2)},
}


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("form", list(OFFICIAL_FORMS))
def test_every_official_form_loads_as_pickle_would(form, protocol, tmp_path):
    path = dump(tmp_path / "f.pkl", OFFICIAL_FORMS[form], protocol)
    with open(path, "rb") as f:
        expected = pickle.load(f)
    assert same(load_pickle(path), expected)


def test_the_files_this_repository_writes_load(tiny_synthetic, tmp_path):
    """build_mmkb (protocol 5, float32) and synthetic (protocol 4) pickles, and a whole generated folder."""
    feats = {3: np.arange(5, dtype=np.float64), 7: np.ones(5)}
    build_mmkb.write_pickle(tmp_path / "built.pkl", feats)
    synthetic._write_pickle(tmp_path / "synthetic.pkl", [(np.array([1, 2]), np.eye(2, 3, dtype=np.float32))])
    pickles = [tmp_path / "built.pkl", tmp_path / "synthetic.pkl", *sorted(tiny_synthetic.glob("*.pkl"))]
    assert len(pickles) == 5
    for path in pickles:
        with open(path, "rb") as f:
            assert same(load_pickle(path), pickle.load(f)), path.name


@pytest.mark.parametrize("protocol, old, new", [
    (2, b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"),  # GLOBAL: a text line
    (5, b"\x8c\x13numpy._core.numeric", b"\x8c\x12numpy.core.numeric"),  # SHORT_BINUNICODE: length first
    (4, b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray"),
])
def test_numpy_1x_module_names_load(protocol, old, new, tmp_path):
    feats = {0: np.arange(3, dtype=np.float32), 1: np.ones(3, np.float32)}
    raw = pickle.dumps(feats, protocol=protocol)
    assert old in raw
    (tmp_path / "old.pkl").write_bytes(pickletools.optimize(raw.replace(old, new)))  # re-framed
    assert same(load_pickle(tmp_path / "old.pkl"), feats)


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 did: str opcodes, which a Python 3 reader must decode as latin-1."""

    def save_bytes(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def test_python2_numpy_pickle_loads(tmp_path):
    feats = {0: np.array([1.0, -2.5, 1e-3], np.float32), 1: np.arange(100, dtype=np.float64)}  # short and long data
    buf = io.BytesIO()
    Python2Pickler(buf, protocol=2).dump(feats)
    raw = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert pickle.SHORT_BINSTRING in raw and pickle.BINSTRING in raw
    (tmp_path / "py2.pkl").write_bytes(raw)
    assert same(load_pickle(tmp_path / "py2.pkl"), feats)


# ---------------------------------------------------------------------------------------------
# Nothing else loads, and nothing it names runs.
# ---------------------------------------------------------------------------------------------

HOSTILE = {  # name -> (pickle bytes, what the error must name)
    **{f"os.system, protocol {p}": (pickle.dumps({0: RunsCode()}, protocol=p), "posix.system") for p in range(6)},
    "builtins.eval by INST": (b"(dp0\nI0\n(S'__import__(\"os\").system(\"touch " + MARKER.encode() + b"\")'\n"
                              b"ibuiltins\neval\ns.", "builtins.eval"),
    "subprocess.Popen": (b"\x80\x02csubprocess\nPopen\n]X\x05\x00\x00\x00touch" + b"\x85R.", "subprocess.Popen"),
    "another numpy function": (b"\x80\x02cnumpy\nload\nX\x01\x00\x00\x00x\x85R.", "numpy.load"),
    "torch tensors": (pickle.dumps({0: torch.zeros(3)}, protocol=4), "torch._utils._rebuild_tensor_v2"),
}
MALFORMED = {  # admitted names used other than numpy uses them -> refused as damaged
    "numpy.ndarray called": b"\x80\x02cnumpy\nndarray\nK\x05\x85\x85R.",
    "bytes of a size": b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.",
    "another codec": b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.",
    "an object dtype": pickle.dumps({0: np.array([1, "a"], dtype=object)}, protocol=2),
    "a structured dtype": pickle.dumps({0: np.zeros(2, [("a", "f4"), ("b", "i4")])}, protocol=4),
    "state set on an admitted global": b"\x80\x02cnumpy\ndtype\n}X\x01\x00\x00\x00aK\x01sb.",
    "array bytes that do not fit the shape": pickle.dumps(np.zeros(4), protocol=2).replace(b"K\x04\x85", b"K\x05\x85"),
    "an extension code": b"\x80\x02\x82\x07.",
    "a persistent id": b"\x80\x02X\x01\x00\x00\x00xQ.",
    "nested 10,000 deep": b"\x80\x02" + b"]" * 10_000 + b"a" * 9_999 + b".",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_code_running_pickles_are_refused_unrun(name, scratch, make_toy):
    raw, global_name = HOSTILE[name]
    (scratch / "direct.pkl").write_bytes(raw)
    with pytest.raises(ForbiddenGlobal) as e:
        load_pickle(scratch / "direct.pkl")
    assert e.value.global_name == global_name
    root = make_toy()
    (root / "triples_feature_dict.pkl").write_bytes(raw)
    with pytest.raises(DataError) as e:
        load_dataset(root, seed=0)
    msg = str(e.value)
    assert str(root / "triples_feature_dict.pkl") in msg and f"would call {global_name}" in msg, msg
    assert "nothing in it was run" in msg
    assert not (scratch / MARKER).exists()


@pytest.mark.parametrize("name", list(MALFORMED))
def test_admitted_names_used_otherwise_are_refused(name, scratch, make_toy):
    root = make_toy()
    (root / "triples_feature_dict.pkl").write_bytes(MALFORMED[name])
    with pytest.raises(DataError, match="cannot unpickle") as e:
        load_dataset(root, seed=0)
    assert str(root / "triples_feature_dict.pkl") in str(e.value)


def test_the_issue_s_malicious_pickle_exits_2_unrun(tiny_synthetic, tmp_path):
    """As the issue tried it: a dataset folder whose triples_feature_dict.pkl runs a command, given to
    train.py in a subprocess."""
    folder = shutil.copytree(tiny_synthetic, tmp_path / "downloaded")
    dump(folder / "triples_feature_dict.pkl", {0: RunsCode()})
    out = tmp_path / "runs"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--file_dir", str(folder), "--epochs", "1",
                           "--out_dir", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {folder / 'triples_feature_dict.pkl'}: refused: the pickle would call "
                                  "posix.system"), done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / MARKER).exists()  # the command did not run
    assert not out.exists()  # nothing written


# ---------------------------------------------------------------------------------------------
# Feature dicts are validated.
# ---------------------------------------------------------------------------------------------

BAD_DICTS = {  # name -> (dict, phrases of the message)
    "a scalar value (the issue's {0: 0})": ({0: 0}, ["key 0", "got a single int (0)", "expected a 1-d vector"]),
    "a 2-d value": ({0: np.zeros(3), 1: np.zeros((1, 3))}, ["key 1", "shape (1, 3)", "expected a 1-d vector"]),
    "an empty vector": ({0: np.zeros(0)}, ["key 0", "an empty vector"]),
    "a string": ({0: np.zeros(3), 2: "abc"}, ["key 2", "a single str ('abc')", "expected a 1-d vector"]),
    "text arrays": ({0: np.array(["1.0", "2.0"])}, ["key 0", "not a numeric vector"]),
    "None": ({0: np.zeros(3), 2: None}, ["key 2", "NoneType"]),
    "complex numbers": ({0: np.zeros(3, complex)}, ["key 0", "not a numeric vector"]),
    "a list with a string": ({0: [1.0, "x"]}, ["key 0", "not a numeric vector"]),
    "NaN": ({0: np.zeros(3), 1: np.array([0.0, np.nan, 1.0])}, ["key 1", "NaN/inf", "expected finite numbers"]),
    "beyond float32": ({0: np.zeros(3), 1: np.full(3, 1e39)}, ["key 1", "float32"]),
    "a norm that overflows": ({0: np.zeros(3), 1: np.full(3, 3e38)}, ["key 1", "L2 norm overflows"]),
    "sizes differ": ({0: np.zeros(3), 4: np.zeros(5)}, ["key 4", "has size 5, expected 3", "key 0"]),
    "a float key": ({0: np.zeros(3), 1.0: np.zeros(3)}, ["key 1.0", "not an integer entity id"]),
    "a bool key": ({True: np.zeros(3)}, ["key True", "not an integer entity id"]),
    "a key that is no entity": ({0: np.zeros(3), 6: np.zeros(3)}, ["key 6", "out of range", "0..5"]),
    "int and str key of one entity": ({0: np.zeros(3), "0": np.zeros(3)}, ["entity 0", "two keys"]),
}


@pytest.mark.parametrize("name", list(BAD_DICTS))
def test_bad_feature_dicts_are_refused_naming_file_key_and_expectation(name, make_toy):
    obj, phrases = BAD_DICTS[name]
    root = make_toy(**{"triples_feature_dict.pkl": obj})
    with pytest.raises(DataError) as e:
        load_dataset(root, seed=0)
    msg = str(e.value)
    assert msg.startswith(f"{root / 'triples_feature_dict.pkl'}: "), msg
    for phrase in phrases:
        assert phrase in msg, (phrase, msg)


def test_the_issue_s_scalar_dict_exits_2_and_writes_nothing(tiny_synthetic, tmp_path, capsys):
    folder = shutil.copytree(tiny_synthetic, tmp_path / "downloaded")
    dump(folder / "triples_feature_dict.pkl", {0: 0})
    out = tmp_path / "runs"
    capsys.readouterr()
    assert train.cli(["--file_dir", str(folder), "--epochs", "1", "--out_dir", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder / 'triples_feature_dict.pkl'}: the value of key 0 is not a numeric "
                          "vector: got a single int (0); expected a 1-d vector of numbers"), err
    assert not out.exists()


def test_a_modality_covering_almost_no_entity_is_refused_unless_allowed(tiny_synthetic, tmp_path, capsys):
    folder = shutil.copytree(tiny_synthetic, tmp_path / "sparse")
    dump(folder / "triples_feature_dict.pkl", {0: np.ones(8, np.float32)})  # 1 of 110 entities: 0.91%
    with pytest.raises(DataError) as e:
        load_dataset(folder, seed=0)
    msg = str(e.value)
    assert msg.startswith(f"{folder / 'triples_feature_dict.pkl'}: covers 1 of 110 entities (0.91%)"), msg
    assert "--min_feature_coverage 0.01" in msg and "pass --min_feature_coverage 0" in msg
    assert load_dataset(folder, seed=0, min_coverage=0.005).coverage["rel_text"] == pytest.approx(1 / 110)
    out = tmp_path / "runs"
    assert train.cli(["--file_dir", str(folder), "--out_dir", str(out), "--epochs", "1", *SMALL]) == 2
    assert not out.exists()
    assert train.cli(["--file_dir", str(folder), "--out_dir", str(out), "--epochs", "1", *SMALL,
                      "--min_feature_coverage", "0"]) == 0
    assert "modality=rel_text dim=8 coverage=0.0091" in (out / "sparse_r0.2_s42" / "log.txt").read_text()


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_min_feature_coverage_outside_0_1_is_refused(value):
    with pytest.raises(DataError, match=r"--min_feature_coverage must be in \[0, 1\]"):
        Config(min_feature_coverage=value).validate()


def test_the_datasets_this_repository_makes_pass_the_coverage_floor(tiny_data):
    assert min(tiny_data.coverage.values()) >= 0.8  # the embedded default's generator: 85-100%


# ---------------------------------------------------------------------------------------------
# Text files.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text, phrases", [
    ("triples_1", b"0\t0\t1\n0\t0\xff\t2\n", ["line 2", "byte 9 is not UTF-8"]),
    ("training_attrs_2", b"b0\tname\n\xe9\n", ["line 2", "not UTF-8"]),
    ("ill_ent_ids", b"0\t3\n1\t4\n0\t3\n", ["line 3", "the pair 0<TAB>3 repeats line 1"]),
    ("ent_ids_1", b"0\ta0\n1\ta1\tx\n2\ta2\n", ["line 2", "got 3 field(s)"]),
    ("triples_2", b"3\t0\t4\n3\t-2\t5\n", ["line 2", "relation id -2 is negative"]),
])
def test_bad_text_files_name_file_and_line(name, text, phrases, make_toy):
    root = make_toy()
    (root / name).write_bytes(text)
    with pytest.raises(DataError) as e:
        load_dataset(root, seed=0)
    msg = str(e.value)
    assert msg.startswith(str(root / name)), msg
    for phrase in phrases:
        assert phrase in msg, (phrase, msg)


def test_sparse_and_huge_relation_ids_give_the_same_bag_of_words(make_toy, toy_dir):
    """Relation ids only name relations: 10**15 instead of 2 changes nothing (it used to allocate a
    count per possible id)."""
    root = make_toy(triples_2="3\t0\t4\n3\t1000000000000000\t5\n4\t1000000000000000\t5\n5\t3\t3\n")
    np.testing.assert_array_equal(load_dataset(root, seed=0).features["rel_bow"],
                                  load_dataset(toy_dir, seed=0).features["rel_bow"])


# ---------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tiny_synthetic, tmp_path_factory) -> Path:
    """A finished run with every kind of state: iterative training (pseudo pairs), the curriculum
    (its pairs), a validation split with --early_stop (the best weights)."""
    out = tmp_path_factory.mktemp("untrusted_ckpt")
    assert train.cli(["--file_dir", str(tiny_synthetic), "--out_dir", str(out), "--run_name", "il", *SMALL,
                      "--epochs", "4", "--il", "--il_start", "0", "--il_step", "2", "--il_epochs", "2"]) == 0
    assert train.cli(["--file_dir", str(tiny_synthetic), "--out_dir", str(out), "--run_name", "es", *SMALL,
                      "--epochs", "4", "--curriculum", "--val_ratio", "0.2", "--early_stop", "5"]) == 0
    return out


@pytest.mark.parametrize("run", ["il", "es"])
def test_checkpoints_read_exactly_what_an_unrestricted_load_reads(finished, run):
    path = finished / run / "checkpoint.pt"
    safe, unrestricted = train.read_checkpoint(path), torch.load(path, map_location="cpu", weights_only=False)
    assert same(safe, unrestricted)
    arrays = [safe["pseudo_pairs"], safe["numpy_rng"][1]] + ([safe["curriculum"]] if run == "es" else [])
    assert all(a.flags.writeable for a in arrays)
    assert len(safe["pseudo_pairs"]) if run == "il" else safe["best_model"] is not None


def _resume_refused(run: Path, capsys, *phrases: str) -> None:
    before = tree_state(run.parent)
    capsys.readouterr()
    assert train.cli(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert tree_state(run.parent) == before


def _unfinished_copy(finished: Path, tmp_path: Path) -> Path:
    run = shutil.copytree(finished / "il", tmp_path / "runs" / "il")
    (run / "results.json").unlink()
    return run


def test_a_code_running_checkpoint_is_refused_unrun(finished, tmp_path, scratch, capsys):
    run = _unfinished_copy(finished, tmp_path)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    torch.save({**ckpt, "history": [*ckpt["history"], RunsCode()]}, run / "checkpoint.pt")
    with pytest.raises(DataError, match="refused: the checkpoint would call posix.system"):
        train.read_checkpoint(run / "checkpoint.pt")
    _resume_refused(run, capsys, str(run / "checkpoint.pt"), "would call posix.system", "nothing in it was run")
    assert not (scratch / MARKER).exists()


def test_a_checkpoint_with_a_flipped_bit_is_refused(finished, tmp_path, capsys):
    run = _unfinished_copy(finished, tmp_path)
    path = run / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # past the local header (torch pads its extra field)
    raw[start + 5] ^= 0x10  # one bit of a tensor
    path.write_bytes(bytes(raw))
    _resume_refused(run, capsys, f"record {info.filename} fails its CRC-32 check")


@pytest.mark.parametrize("change, phrase", [
    (lambda c: {k: v for k, v in c.items() if k != "numpy_rng"}, "key 'numpy_rng' (numpy's RNG state) is missing"),
    (lambda c: {**c, "epoch": "5"}, "key 'epoch' (the number of epochs done) is a str"),
    (lambda c: {**c, "pseudo_pairs": np.zeros(3, np.int64)}, "expected epochs >= 0 and (P, 2) integer pairs"),
    (lambda c: [c], "expected a checkpoint of train.py (a dict of states), got list"),
    (lambda c: {**c, "model": {k: v[:1] for k, v in c["model"].items()}}, "states do not fit the model"),
])
def test_checkpoints_not_of_train_py_are_refused(change, phrase, finished, tmp_path, capsys):
    run = _unfinished_copy(finished, tmp_path)
    torch.save(change(torch.load(run / "checkpoint.pt", weights_only=False)), run / "checkpoint.pt")
    _resume_refused(run, capsys, phrase)
