"""train.py's command line on bad input: a clear 'error: ...' on stderr, a non-zero exit, no
traceback, and no file created or touched, neither a new run folder nor any file of earlier runs.

tests/test_loader.py pins the loader's messages; here the whole CLI path is checked, mostly
in-process through train.cli (fast), once through a real subprocess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden_units", "16,16,16", "--heads", "2,2", "--n_exp", "2", "--bsize", "16", "--club_bsize", "16",
         "--device", "cpu", "--eval_chunk", "64", "--check_point", "2"]


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` (hidden ones included) -> (mtime in ns, sha256)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier(tiny_synthetic, tmp_path_factory) -> Path:
    """An out_dir holding a finished run 'done' and a killed one 'partial' (checkpoint, no results)."""
    out = tmp_path_factory.mktemp("cli") / "runs"
    assert train.cli(["--file_dir", str(tiny_synthetic), "--out_dir", str(out), "--run_name", "done", *SMALL,
                      "--epochs", "4", "--save_every", "2"]) == 0
    shutil.copytree(out / "done", out / "partial")
    (out / "partial" / "results.json").unlink()
    return out


def _fails(argv: list[str], out: Path, capsys, *patterns: str, code: int = 2) -> str:
    """Run the CLI, expect exit ``code`` with every pattern on stderr, and nothing changed in ``out``."""
    before = tree_state(out)
    entries = sorted(os.listdir(out))
    capsys.readouterr()
    rc = train.cli(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
    for p in patterns:
        assert p in err, f"{p!r} not in {err!r}"
    assert sorted(os.listdir(out)) == entries  # no new (empty) run folder
    assert tree_state(out) == before  # no earlier file touched
    return err


def _pickle_bytes(obj) -> bytes:
    buf = io.BytesIO()
    pickle.dump(obj, buf)
    return buf.getvalue()


# name -> (file overrides for the toy folder, the file named in the message, a phrase of the message)
BAD_FOLDERS = {
    "truncated triples": ({"triples_1": "0\t0\t1\n0\t0\t2\n1\t1"}, "triples_1", "line 3"),
    "empty links": ({"ill_ent_ids": ""}, "ill_ent_ids", "file is empty"),
    "wrong column count": ({"triples_2": "3\t0\t4\n3\t2\t5\t1\n"}, "triples_2", "got 4 field(s)"),
    "non-integer id": ({"ill_ent_ids": "0\t3\n1\tx4\n"}, "ill_ent_ids", "expected an integer id, got 'x4'"),
    "id out of range": ({"ill_ent_ids": "0\t3\n1\t9\n"}, "ill_ent_ids", "id 9 is out of range"),
    "link inside one KG": ({"ill_ent_ids": "0\t3\n1\t2\n"}, "ill_ent_ids", "id 2 is not an entity of KG2"),
    "duplicated entity id": ({"ent_ids_2": "3\tb0\n2\tb1\n5\tb2\n"}, "ent_ids_2", "duplicated entity id 2"),
    "missing file": ({"triples_2": None}, "triples_2", "required file is missing"),
    "mixed vector sizes": ({"triples_feature_dict.pkl": {0: np.zeros(3), 1: np.zeros(4)}},
                           "triples_feature_dict.pkl", "has size 4, expected 3"),
    "pickle not a dict": ({"triples_feature_dict.pkl": [[0.0, 1.0]]}, "triples_feature_dict.pkl",
                          "expected a pickled dict"),
    "NaN vector": ({"triples_feature_dict.pkl": {0: np.zeros(3), 1: np.array([0.0, np.nan, 1.0])}},
                   "triples_feature_dict.pkl", "NaN/inf"),
    "non-numeric vector": ({"triples_feature_dict.pkl": {0: np.zeros(3), 1: "abc"}}, "triples_feature_dict.pkl",
                           "not a numeric vector"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_dataset_files(case, earlier, make_toy, capsys):
    overrides, fname, phrase = BAD_FOLDERS[case]
    root = make_toy(**overrides)
    _fails(["--file_dir", str(root), "--out_dir", str(earlier), "--rate", "0.5", *SMALL], earlier, capsys,
           str(root / fname), phrase)


def test_truncated_pickle(earlier, make_toy, capsys):
    root = make_toy()
    whole = _pickle_bytes({i: np.arange(3, dtype=np.float32) for i in range(6)})
    (root / "triples_feature_dict.pkl").write_bytes(whole[:len(whole) // 2])
    _fails(["--file_dir", str(root), "--out_dir", str(earlier), "--rate", "0.5", *SMALL], earlier, capsys,
           str(root / "triples_feature_dict.pkl"), "cannot unpickle")


@pytest.mark.parametrize("text, phrase", [
    ("0\t4\n3\t0\n", "line 2: id 3 is not an entity of KG1"),  # a (right, left) pair
    ("0\t4\n1\t2\n", "line 2: id 2 is not an entity of KG2"),  # a (left, left) pair
    ("0\t4\n1\n", "line 2: expected 'id1<TAB>id2'"),
    ("", "file is empty"),
])
def test_train_ill_path_that_is_not_left_right_pairs(text, phrase, earlier, toy_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text(text)
    _fails(["--file_dir", str(toy_dir), "--out_dir", str(earlier), "--rate", "0.5", "--train_ill_path", str(pairs),
            *SMALL], earlier, capsys, str(pairs), phrase)


@pytest.mark.parametrize("flags, phrase", [
    (["--rate", "1.5"], "--rate must be in (0, 1), got 1.5"),
    (["--rate", "0"], "--rate must be in (0, 1), got 0.0"),
    (["--rate", "nan"], "--rate must be in (0, 1)"),
    (["--without", "imgae"], "unknown component 'imgae'"),
    (["--hidden_units", "16,x,16"], "--hidden_units must be comma-separated positive integers"),
    (["--heads", "2,0"], "--heads must be comma-separated positive integers"),
    (["--save_every", "-1"], "--save_every must be >= 0"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--device", "tpu9"], "--device"),
    (["--eval_only"], "--eval_only needs --resume"),
    (["--rate", "0.2"], "leaves 0 training and 3 test pairs"),  # 3 toy links
    (["--without", "graph,image,rel_bow,rel_text,attr_bow,attr_text"], "every modality is switched off"),
])
def test_bad_flags(flags, phrase, earlier, toy_dir, capsys):
    _fails(["--file_dir", str(toy_dir), "--out_dir", str(earlier), "--rate", "0.5", *SMALL, *flags], earlier, capsys,
           phrase)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(earlier, toy_dir, capsys):
    _fails(["--file_dir", str(toy_dir), "--out_dir", str(earlier), "--rate", "0.5", *SMALL, "--device", "cuda"],
           earlier, capsys, "CUDA is not available")


@pytest.mark.parametrize("name", ["done", "partial"])
def test_new_run_into_a_folder_with_a_run_refuses(name, earlier, tiny_synthetic, capsys):
    _fails(["--file_dir", str(tiny_synthetic), "--out_dir", str(earlier), "--run_name", name, *SMALL, "--epochs", "4"],
           earlier, capsys, f"{earlier / name} already holds a run", f"--resume {earlier / name}")


def test_resume_errors(earlier, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    _fails(["--resume", str(empty)], earlier, capsys, "no checkpoint.pt in that folder")
    _fails(["--resume", str(earlier / "partial"), "--epochs", "8"], earlier, capsys,
           "--epochs 8 differs from the resumed run's 4")
    broken = tmp_path / "broken_run"
    broken.mkdir()
    (broken / "checkpoint.pt").write_bytes((earlier / "done" / "checkpoint.pt").read_bytes()[:1000])
    _fails(["--resume", str(broken)], earlier, capsys, "cannot read the checkpoint")


def test_eval_only_reads_the_checkpoint_and_writes_nothing(earlier, capsys):
    before = tree_state(earlier)
    assert train.cli(["--resume", str(earlier / "done"), "--eval_only"]) == 0
    assert "test (checkpoint, epoch 4)" in capsys.readouterr().out
    assert tree_state(earlier) == before


def test_real_command_line(earlier, make_toy):
    """The same through a real process: exit status, stderr, no traceback, nothing written."""
    root = make_toy(ill_ent_ids="0\t3\n1\t2\n")
    before = tree_state(earlier)
    cmd = [sys.executable, str(ROOT / "train.py"), "--file_dir", str(root), "--out_dir", str(earlier), *SMALL]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith(f"error: {root / 'ill_ent_ids'} line 2: id 2 is not an entity of KG2"), p.stderr
    assert tree_state(earlier) == before


@pytest.mark.parametrize("flags, phrase", [(["--rate", "abc"], "invalid float value: 'abc'"),
                                           (["--amp", "fp8"], "invalid choice: 'fp8'")])
def test_unparsable_flag_value_is_a_usage_error(flags, phrase, earlier, capsys):
    before = tree_state(earlier)
    with pytest.raises(SystemExit) as info:
        train.cli(["--out_dir", str(earlier), *flags])
    assert info.value.code == 2 and phrase in capsys.readouterr().err
    assert tree_state(earlier) == before


# ---------------------------------------------------------------------------------------------
# What a run shows and records: progress lines, provenance, rounded results, --no-save_outputs.
# ---------------------------------------------------------------------------------------------


def _run(tiny_synthetic, out: Path, name: str, *flags: str) -> Path:
    assert train.cli(["--file_dir", str(tiny_synthetic), "--out_dir", str(out), "--run_name", name, *SMALL,
                      *flags]) == 0
    return out / name


def test_progress_lines_without_a_terminal(tiny_synthetic, tmp_path, capsys):
    """stderr is not a terminal here (pytest captures it): no tqdm bar, but a line after the first
    epoch, every 10 epochs and at the end, with the loss, seconds per epoch and time left."""
    run = _run(tiny_synthetic, tmp_path, "p", "--epochs", "12", "--check_point", "4")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if " progress epoch=" in line]
    assert [int(re.search(r"epoch=(\d+)/12 ", line).group(1)) for line in lines] == [1, 10, 12]
    for line in lines:
        assert re.search(r" loss=\d+\.\d{4} sec_per_epoch=\d+\.\d{4} eta=\d+:\d\d:\d\d test_hits1=", line), line
    assert lines[-1].split("eta=")[1].startswith("0:00:00 ")
    assert " progress epoch=" not in (run / "log.txt").read_text()  # the record holds the evaluations


def test_config_and_results_record_provenance_and_results_are_rounded(tiny_synthetic, tmp_path):
    run = _run(tiny_synthetic, tmp_path, "prov", "--epochs", "4")
    config = json.loads((run / "config.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert "eval_only" not in config and results["config"] == {k: v for k, v in config.items() if k != "provenance"}
    for prov in (config["provenance"], results["provenance"]):
        assert set(prov) >= {"git_commit", "git_dirty", "torch", "numpy", "transformers", "device", "dataset",
                             "started"}
        assert prov["torch"] == torch.__version__ and prov["numpy"] == np.__version__ and prov["device"] == "cpu"
        assert prov["dataset"] == str(tiny_synthetic.resolve())
    assert results["provenance"]["finished"] >= results["provenance"]["started"] == config["provenance"]["started"]
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    full, shown = history[-1]["test"]["avg"], results["last_epoch"]["test"]["avg"]
    assert shown == {k: round(v, 6) for k, v in full.items()}
    assert any(round(v, 6) != v for v in full.values())  # metrics.jsonl keeps the full precision
    assert train.Config(**{k: v for k, v in config.items() if k != "provenance"}) == train.Config(
        **results["config"])


def test_no_save_outputs_skips_the_arrays_and_keeps_the_results(tiny_synthetic, tmp_path):
    full = _run(tiny_synthetic, tmp_path, "full", "--epochs", "4")
    lean = _run(tiny_synthetic, tmp_path, "lean", "--epochs", "4", "--no-save_outputs")
    arrays = ("entity_embeddings.npy", "modality_weights.npy", "expert_gates.npz", "predictions.tsv")
    assert all((full / f).is_file() for f in arrays) and not any((lean / f).exists() for f in arrays)
    res = [json.loads((r / "results.json").read_text()) for r in (full, lean)]
    assert res[0]["last_epoch"] == res[1]["last_epoch"] and res[1]["config"]["save_outputs"] is False
    # A resumed run may change it (it changes no training): the finished run writes its arrays.
    (lean / "results.json").unlink()
    assert train.cli(["--resume", str(lean), "--save_outputs"]) == 0
    assert all((lean / f).is_file() for f in arrays)


def test_eval_only_is_an_option_not_a_config_field(earlier):
    inv = train.parse_args(["--resume", str(earlier / "done"), "--eval_only"])
    assert inv.eval_only and not hasattr(inv.cfg, "eval_only")
    assert "eval_only" not in {f.name for f in dataclasses.fields(train.Config)}


def test_device_help_states_its_default_once(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    device = text[text.index("--device DEVICE torch"):text.index("--out_dir OUT_DIR parent")]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.count("default") == 1 and f"else cpu (on this machine: {expected})" in device, device
