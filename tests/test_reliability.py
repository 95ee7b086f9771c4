"""Reliability of train.py: a killed run resumes to the same numbers, runs are deterministic,
NaN/inf losses stop cleanly, finished runs are never redone, and --train_ill_path leaks are reported.

All runs are on CPU with one intra-op thread (conftest sets it in-process; the subprocesses get
OMP_NUM_THREADS=1), on the tiny synthetic pair, a few seconds each.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import tree_state

import train
from data_process.dataset import load_dataset, split_links
from utils import release_free_heap

ROOT = Path(__file__).resolve().parents[1]
# One thread everywhere: the in-process reference and the subprocesses then run the same kernels
# with the same reduction order, which is what makes bit-identical results possible.
THREADS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SMALL = ["--hidden_units", "16,16,16", "--heads", "2,2", "--n_exp", "2", "--bsize", "16", "--club_bsize", "16",
         "--device", "cpu", "--eval_chunk", "64", "--check_point", "5"]
# 30 epochs + 20 of iterative training; pseudo pairs are added at epochs 15, 20, 25, ... so the
# checkpoint the run is killed after already holds some.
IL_RUN = ["--epochs", "30", "--il", "--il_start", "10", "--il_step", "5", "--il_epochs", "20", "--save_every", "2"]
KILL_AFTER = 20  # kill once a checkpoint of at least this epoch exists (of 50)


def _args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["--file_dir", str(data), "--out_dir", str(out), "--run_name", name, *SMALL, *extra]


@contextlib.contextmanager
def killed_at(epoch: int):
    """Inside the block, train_epoch raises KeyboardInterrupt when epoch ``epoch`` starts (what a kill
    leaves: the last checkpoint before it), and the block must end by it; train_epoch is restored after."""
    real = train.train_epoch

    def dying(*args, **kwargs):
        if args[-1] == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    train.train_epoch = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        train.train_epoch = real


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock seconds, which no two runs share."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _results(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text())
    return {k: res[k] for k in ("last_epoch", "best_test_epoch", "pairs")}


def _checkpoint_epoch(path: Path) -> int | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["epoch"]
    except (FileNotFoundError, EOFError, RuntimeError, pickle.UnpicklingError):
        return None


def test_killed_run_resumes_to_the_same_final_metrics(tiny_synthetic, tmp_path, capsys):
    """SIGKILL a subprocess run after its epoch-20 checkpoint, resume it, compare with an
    uninterrupted run of the same seed.

    Tolerance: none (exact equality). The checkpoint restores the parameters, both AdamW states,
    the training generator, the torch/numpy/python RNG states, the epoch and the pseudo pairs, so the
    resumed run performs the same float operations in the same order as the uninterrupted one; with
    one thread on CPU that is bit for bit. (A different thread count or a GPU would change reduction
    orders and call for ~1e-6 on the metrics instead.)"""
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "reference", *IL_RUN)) == 0
    reference = out / "reference"

    run = out / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *_args(tiny_synthetic, out, "killed", *IL_RUN)],
                            cwd=ROOT, env=THREADS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    killed_at = None
    while proc.poll() is None and time.monotonic() < deadline:
        epoch = _checkpoint_epoch(run / "checkpoint.pt")
        if epoch is not None and epoch >= KILL_AFTER:
            proc.send_signal(signal.SIGKILL)
            killed_at = epoch
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert killed_at is not None, f"the run ended (rc={proc.returncode}) before it could be killed: " \
                                  f"{proc.stderr.read().decode()[-2000:]}"
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "results.json").exists()  # killed part-way: unfinished
    saved = _checkpoint_epoch(run / "checkpoint.pt")
    assert KILL_AFTER <= saved < 50
    assert len(torch.load(run / "checkpoint.pt", weights_only=False)["pseudo_pairs"]) > 0

    leftover = run / ".checkpoint.pt.x1y2z3"  # what a kill during an atomic write leaves behind
    leftover.write_bytes(b"partial")
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run)], cwd=ROOT,
                          env=THREADS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed_from={run} epoch={saved}" in (run / "log.txt").read_text()
    assert not leftover.exists()

    assert _metrics(run) == _metrics(reference)  # every evaluation, before and after the kill
    assert _results(run) == _results(reference)
    for name in ("train_ill_final.tsv", "predictions.tsv"):
        assert (run / name).read_text() == (reference / name).read_text(), name
    np.testing.assert_array_equal(np.load(run / "entity_embeddings.npy"), np.load(reference / "entity_embeddings.npy"))
    seconds = [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert seconds == sorted(seconds) and seconds[0] > 0  # the checkpoint carried the time so far
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 50

    # Resuming the finished run redoes nothing and touches no file; it reports the results.
    before = tree_state(run)
    capsys.readouterr()
    assert train.cli(["--resume", str(run)]) == 0
    assert "last epoch (50)" in capsys.readouterr().out
    assert tree_state(run) == before


def test_extending_a_finished_run_equals_a_longer_run(tiny_synthetic, tmp_path):
    """--resume RUN --extend_to 20 on a finished 10-epoch run gives, bit for bit, the metrics of a
    20-epoch run of the same seed; the 10-epoch results and outputs are kept in RUN/epoch10/."""
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "long", "--epochs", "20")) == 0
    assert train.cli(_args(tiny_synthetic, out, "short", "--epochs", "10")) == 0
    short = out / "short"
    first = (short / "results.json").read_text()
    embeddings = np.load(short / "entity_embeddings.npy")
    assert train.cli(["--resume", str(short), "--extend_to", "20"]) == 0
    assert _metrics(short) == _metrics(out / "long")
    assert _results(short) == _results(out / "long")
    assert (short / "epoch10" / "results.json").read_text() == first
    np.testing.assert_array_equal(np.load(short / "epoch10" / "entity_embeddings.npy"), embeddings)
    assert json.loads((short / "config.json").read_text())["epochs"] == 20
    assert "extended_from=10 extended_to=20" in (short / "log.txt").read_text()


def test_kept_checkpoints_continue_the_run_they_were_taken_from(tiny_synthetic, tmp_path, capsys):
    """--keep_checkpoints 10 keeps the epoch-10 checkpoint beside the one that moves on; a copy of it as a
    run folder's checkpoint.pt resumes to the same metrics as the whole run. An epoch that is no multiple
    of --save_every is refused before anything is written."""
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "whole", "--epochs", "20", "--save_every", "5",
                           "--keep_checkpoints", "10")) == 0
    whole = out / "whole"
    assert sorted(p.name for p in whole.glob("checkpoint*.pt")) == ["checkpoint.pt", "checkpoint_e10.pt"]
    kept = torch.load(whole / "checkpoint_e10.pt", weights_only=False)
    assert kept["epoch"] == 10 and torch.load(whole / "checkpoint.pt", weights_only=False)["epoch"] == 20
    copy = out / "from10"
    copy.mkdir()
    (copy / "checkpoint.pt").write_bytes((whole / "checkpoint_e10.pt").read_bytes())
    (copy / "metrics.jsonl").write_text("")
    assert train.cli(["--resume", str(copy)]) == 0
    assert _metrics(copy) == _metrics(whole)
    assert train.cli(_args(tiny_synthetic, out, "bad", "--save_every", "5", "--keep_checkpoints", "12")) == 2
    assert "must be a multiple of --save_every (5)" in capsys.readouterr().err
    assert not (out / "bad").exists()


def test_extend_to_refuses_what_it_cannot_do(tiny_synthetic, tmp_path, capsys):
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "r", "--epochs", "5")) == 0
    run = out / "r"
    (run / "epoch5").mkdir()  # an earlier archive in the way: refuse, change nothing
    before = tree_state(run)
    for extra, message in ((["--extend_to", "5"], "already trained 5 epochs"),
                           (["--extend_to", "10"], "epoch5 already exists"),
                           (["--extend_to", "10", "--eval_only"], "exclude each other")):
        assert train.cli(["--resume", str(run), *extra]) == 2
        assert message in capsys.readouterr().err
        assert tree_state(run) == before
    assert train.cli(["--extend_to", "10"]) == 2
    assert "needs --resume" in capsys.readouterr().err


def test_same_seed_gives_identical_runs(tiny_synthetic, tmp_path):
    out = tmp_path / "runs"
    for name in ("a", "b"):
        assert train.cli(_args(tiny_synthetic, out, name, "--epochs", "15", "--save_every", "0")) == 0
    assert _metrics(out / "a") == _metrics(out / "b")
    assert _results(out / "a") == _results(out / "b")
    emb = [np.load(out / name / "entity_embeddings.npy") for name in ("a", "b")]
    np.testing.assert_array_equal(emb[0], emb[1])
    # results.json is the last output written (its presence marks a finished run).
    others = [(out / "a" / f).stat().st_mtime_ns for f in train.OUTPUT_FILES if (out / "a" / f).exists()]
    assert max(others) == (out / "a" / "results.json").stat().st_mtime_ns
    # ... and another seed gives another run (the comparison above is not vacuous).
    assert train.cli(_args(tiny_synthetic, out, "c", "--epochs", "15", "--save_every", "0", "--seed", "7")) == 0
    assert _metrics(out / "c") != _metrics(out / "a")


def _assert_clean_stop(run: Path, err: str, term: str, epoch: int, kept_epoch: int):
    assert f"loss term '{term}'" in err and f"at epoch {epoch}" in err, err
    assert f"last good checkpoint, {run / 'checkpoint.pt'} (epoch {kept_epoch})" in err, err
    assert "Traceback" not in err
    assert not (run / "results.json").exists()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)  # intact and loadable
    assert ckpt["epoch"] == kept_epoch
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert f"loss term '{term}'" in (run / "log.txt").read_text()


def test_nan_loss_term_stops_with_its_name_and_epoch(tiny_synthetic, tmp_path, monkeypatch, capsys):
    """A distillation loss that turns NaN at epoch 5: exit code 3, a message naming the term and
    the epoch, the epoch-4 checkpoint intact; the run then resumes from it once the fault is gone."""
    real_epoch, real_batch = train.train_epoch, train.batch_alignment_losses
    now = {}

    def spy_epoch(*args, **kwargs):
        now["epoch"] = args[-1]
        return real_epoch(*args, **kwargs)

    def faulty_batch(*args, **kwargs):
        fused_cl, uni_cl, distill = real_batch(*args, **kwargs)
        if now["epoch"] >= 5:
            distill = {m: value * float("nan") for m, value in distill.items()}
        return fused_cl, uni_cl, distill

    monkeypatch.setattr(train, "train_epoch", spy_epoch)
    monkeypatch.setattr(train, "batch_alignment_losses", faulty_batch)
    out = tmp_path / "runs"
    rc = train.cli(_args(tiny_synthetic, out, "nan", "--epochs", "10", "--save_every", "2"))
    assert rc == 3
    run = out / "nan"
    _assert_clean_stop(run, capsys.readouterr().err, "distill", 5, 4)

    monkeypatch.setattr(train, "batch_alignment_losses", real_batch)
    assert train.cli(["--resume", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["last_epoch"]["epoch"] == 10


def test_diverging_learning_rate_stops_cleanly(tiny_synthetic, tmp_path, capsys):
    """A real divergence (--lr 1e30): the parameters blow up after the first step and the second
    epoch's loss is not finite."""
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "lr", "--epochs", "10", "--save_every", "1", "--lr", "1e30")) == 3
    _assert_clean_stop(out / "lr", capsys.readouterr().err, "fused_cl", 2, 1)


def test_train_ill_path_of_gold_test_pairs_is_reported_loudly(tiny_synthetic, tmp_path):
    data = load_dataset(tiny_synthetic, seed=42)
    split = split_links(data.links, 0.2, seed=42)
    out = tmp_path / "runs"
    leaky = tmp_path / "leaky.tsv"
    leaky.write_text("".join(f"{a}\t{b}\n" for a, b in np.concatenate([split.train, split.test[:5]])))
    clean = tmp_path / "clean.tsv"
    clean.write_text("".join(f"{a}\t{b}\n" for a, b in split.train))
    short = ["--epochs", "2", "--save_every", "0", "--rate", "0.2", "--seed", "42"]
    assert train.cli(_args(tiny_synthetic, out, "leaky", *short, "--train_ill_path", str(leaky))) == 0
    assert train.cli(_args(tiny_synthetic, out, "clean", *short, "--train_ill_path", str(clean))) == 0

    n = len(split.train) + 5
    info = json.loads((out / "leaky" / "results.json").read_text())["train_ill"]
    assert info["pairs"] == n and info["gold_test_pairs"] == 5
    assert info["warning"].startswith(f"5 of the {n} training pairs are gold TEST pairs")
    log = (out / "leaky" / "log.txt").read_text()
    assert "gold_test_pairs=5" in log and f"WARNING: 5 of the {n} training pairs are gold TEST pairs" in log

    info = json.loads((out / "clean" / "results.json").read_text())["train_ill"]
    assert info["gold_test_pairs"] == 0 and "warning" not in info
    assert "WARNING" not in (out / "clean" / "log.txt").read_text()


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line in /proc/self/status")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").exists(),
                    reason="needs glibc and /proc (Linux)")
def test_release_free_heap_gives_freed_tensor_memory_back():
    """256 MiB of freed 1 MiB tensors below a live one stay resident (glibc keeps them for reuse)
    until release_free_heap, which train.evaluate calls before the evaluation's own peak."""
    for _ in range(3):
        big = torch.ones(2 << 20)  # 8 MiB, freed: raises glibc's dynamic mmap threshold above 1 MiB
        del big
    held = [torch.ones(1 << 18) for _ in range(256)]  # 256 x 1 MiB, now on the heap
    pin = torch.ones(1 << 18)  # a live block above them: free() alone cannot shrink the heap
    del held
    freed = _rss_mib()
    assert release_free_heap() is True
    assert _rss_mib() < freed - 200, (freed, _rss_mib())
    assert pin.sum() == 1 << 18


def test_early_stop_stops_and_writes_the_best_validation_model(tiny_synthetic, tmp_path, monkeypatch, capsys):
    """--early_stop 2: two evaluations without a better validation MRR stop the run, and what it writes
    is the best-validation epoch's model (its test metrics in both directions are that epoch's); the
    stopped run cannot be extended. The validation MRRs are scripted: 0.5 at epoch 10 is the best."""
    script = [0.1, 0.2, 0.5, 0.4, 0.3, 0.9, 0.9]  # validation MRR at epochs 0, 5, 10, 15, 20, ...
    scripted = iter(script)
    real = train.evaluate

    def evaluate(model, inputs, pairs, cfg, with_predictions=False, health_ids=None, distractors=None):
        res = real(model, inputs, pairs, cfg, with_predictions, health_ids, distractors)
        if health_ids is None and distractors is None:  # the validation call of checkpoint_record
            res["avg"]["mrr"] = next(scripted)
        return res

    monkeypatch.setattr(train, "evaluate", evaluate)
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "es", "--epochs", "40", "--val_ratio", "0.2",
                           "--early_stop", "2")) == 0
    run = out / "es"
    assert [r["epoch"] for r in _metrics(run)] == [0, 5, 10, 15, 20]
    res = json.loads((run / "results.json").read_text())
    assert res["early_stop"] == {"patience": 2, "stopped_at_epoch": 20, "outputs_from": "best_valid_epoch"}
    assert res["last_epoch"]["epoch"] == 20 and res["best_valid_epoch"]["epoch"] == 10
    best, written = res["best_valid_epoch"]["test"], res["best_valid_epoch"]["test_directions"]
    for direction in ("l2r", "r2l"):
        for metric in ("hits@1", "mrr"):
            assert written[direction][metric] == pytest.approx(best[direction][metric], abs=1e-5)
    assert res["last_epoch"]["test"]["avg"]["mrr"] != pytest.approx(best["avg"]["mrr"], abs=1e-4)
    assert _checkpoint_epoch(run / "checkpoint.pt") == 20
    assert "early_stop=20 best_valid_epoch=10 patience=2" in (run / "log.txt").read_text()

    before = tree_state(run)
    assert train.cli(["--resume", str(run), "--extend_to", "60"]) == 2
    assert "stopped early at epoch 20" in capsys.readouterr().err
    assert tree_state(run) == before
    assert train.cli(_args(tiny_synthetic, out, "no_valid", "--early_stop", "2")) == 2
    assert "needs a validation split" in capsys.readouterr().err

    # Interrupted at epoch 10 (a 10-epoch run extended): the best-validation weights travel in the
    # checkpoint, so the resumed run stops at epoch 20 too and writes the same model, bit for bit.
    scripted = iter(script)
    assert train.cli(_args(tiny_synthetic, out, "part", "--epochs", "10", "--val_ratio", "0.2",
                           "--early_stop", "2")) == 0
    assert train.cli(["--resume", str(out / "part"), "--extend_to", "40"]) == 0
    assert _metrics(out / "part") == _metrics(run)
    assert json.loads((out / "part" / "results.json").read_text())["early_stop"]["stopped_at_epoch"] == 20
    np.testing.assert_array_equal(np.load(out / "part" / "entity_embeddings.npy"),
                                  np.load(run / "entity_embeddings.npy"))


def test_valid_pool_heldout_selects_on_the_ranking_with_the_test_entities(tiny_synthetic, tmp_path, monkeypatch):
    """Both validation rankings are recorded at every evaluation; --valid_pool heldout makes the one with
    the test entities as distractors pick the best-validation epoch and drive --early_stop. Its MRRs
    are scripted (0.5 at epoch 10 the best); the plain validation MRR is left as measured."""
    scripted = iter([0.1, 0.2, 0.5, 0.4, 0.3, 0.9])
    real = train.evaluate

    def evaluate(model, inputs, pairs, cfg, with_predictions=False, health_ids=None, distractors=None):
        res = real(model, inputs, pairs, cfg, with_predictions, health_ids, distractors)
        if distractors is not None:
            assert len(distractors) > len(pairs)  # the test pairs, beside the validation pairs
            res["avg"]["mrr"] = next(scripted)
        return res

    monkeypatch.setattr(train, "evaluate", evaluate)
    out = tmp_path / "runs"
    assert train.cli(_args(tiny_synthetic, out, "heldout", "--epochs", "40", "--val_ratio", "0.2",
                           "--early_stop", "2", "--valid_pool", "heldout")) == 0
    history = _metrics(out / "heldout")
    assert [r["epoch"] for r in history] == [0, 5, 10, 15, 20]
    assert all("valid" in r and "valid_heldout" in r for r in history)
    res = json.loads((out / "heldout" / "results.json").read_text())
    assert res["best_valid_epoch"]["epoch"] == 10
    assert res["best_valid_epoch"]["selected_by"] == "valid_heldout"
    assert "valid_heldout_mrr=0.5" in (out / "heldout" / "log.txt").read_text()
