"""run_all.sh and run.sh without training: the run list, --list, the skip/resume logic, the GPU
scheduling and run.sh's translation of the official integer codes, with a fake ``python`` (and a
fake ``nvidia-smi``) first on PATH that records its arguments instead of training."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import train
from data_process.report import (
    BASE_RUN,
    DATASETS,
    FIG3_DEFAULTS,
    FIG3_PARAMS,
    OFFICIAL_IL,
    PAPER_TABLE1,
    PAPER_TABLE2,
    RATES,
    TABLES,
    load_run_list,
)
from utils import COMPONENTS, MODALITY_TABLE, Config

ROOT = Path(__file__).resolve().parents[1]
SPECS = load_run_list(ROOT / "run_all.sh")
BY_NAME = {s.name: s for s in SPECS}
CODES = {"0": None, "1": "image", "2": "graph", "3": "rel_bow", "4": "rel_text", "5": "attr_bow",
         "6": "attr_text", "7": "cl", "8": "al"}
# Table 2's rows and the component each switches off.
TABLE2_ROWS = {"w/o g": "graph", "w/o v": "image", "w/o r_b": "rel_bow", "w/o r_t": "rel_text",
               "w/o a_b": "attr_bow", "w/o a_t": "attr_text", "w/o L_m^CL": "cl", "w/o L_m^AL": "al",
               "w/o L_CLUB": "club", "w/o HMoE": "hmoe"}

# Records "CUDA=<devices>\t<arg>\t<arg>..." and, like train.py, marks the run finished.
FAKE_PYTHON = r"""#!/usr/bin/env bash
out=runs; name=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --out_dir) out="${args[$((i + 1))]}" ;;
    --run_name) name="${args[$((i + 1))]}" ;;
  esac
done
(IFS=$'\t'; echo "CUDA=${CUDA_VISIBLE_DEVICES:-}"$'\t'"$*") >> "$FAKE_LOG"
echo "start $name $(date +%s.%N)" >> "$FAKE_LOG.times"
echo "$name OMP=${OMP_NUM_THREADS:-}" >> "$FAKE_LOG.omp"
[ -n "${FAKE_SLEEP:-}" ] && sleep "$FAKE_SLEEP"
echo "end $name $(date +%s.%N)" >> "$FAKE_LOG.times"
[ "${FAKE_RC:-0}" != 0 ] && { echo "fake failure" >&2; exit "$FAKE_RC"; }
[ -n "$name" ] && mkdir -p "$out/$name" && echo '{}' > "$out/$name/results.json"
exit 0
"""
FAKE_NVIDIA_SMI = r"""#!/usr/bin/env bash
for ((g = 0; g < ${FAKE_GPUS:-0}; g++)); do echo "GPU $g: Fake GPU (UUID: GPU-$g)"; done
"""


def _exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake(tmp_path):
    """Environment with the fakes first on PATH; .calls() parses what the fake python was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "python", FAKE_PYTHON)
    _exe(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "DATASET_OVERRIDE", "RUNS_DIR", "DATA_ROOT", "AL_LOSS",
                        "CL_LOSS", "TAU_AL", "TAU_CL")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log), DATA_ROOT=str(tmp_path / "data"))
    for d in DATASETS:  # run.sh checks that the dataset folder exists
        (tmp_path / "data" / d).mkdir(parents=True)

    class Fake:
        def __init__(self):
            self.env, self.log, self.out = env, log, tmp_path / "runs"

        def run(self, script, *args, extra_env=None, check=True):
            res = subprocess.run(["bash", str(ROOT / script), *map(str, args)], env={**self.env, **(extra_env or {})},
                                 capture_output=True, text=True, cwd=tmp_path, timeout=60)
            if check and res.returncode != 0:
                raise AssertionError(f"{script} {args} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
            return res

        def calls(self) -> list[tuple[str, list[str]]]:
            if not self.log.exists():
                return []
            out = []
            for line in self.log.read_text().splitlines():
                cuda, *argv = line.split("\t")
                out.append((cuda.removeprefix("CUDA="), argv))
            return out

    return Fake()


def _flag(argv: list[str], name: str) -> str | None:
    """Value of the last occurrence of --name (argparse's rule)."""
    idx = [i for i, a in enumerate(argv) if a == name]
    return argv[idx[-1] + 1] if idx else None


# ---------------------------------------------------------------------------------------------
# The run list.
# ---------------------------------------------------------------------------------------------


def test_every_line_parses_with_table_row_and_expected_annotation():
    assert len({s.name for s in SPECS}) == len(SPECS), "run names must be unique (they are folder names)"
    fields = {f.name: f for f in dataclasses.fields(Config)}
    base = next(b for b in SPECS if b.name == "t1_db_20")
    for s in SPECS:
        assert s.table in TABLES, s
        assert s.row and s.expected, s
        if s.table == "fig3":
            assert s.expected == "plot-only", s
        else:
            assert 0 < s.expected_hits1 < 1, s
        seed, dataset, rate, fwd, without = s.positional
        if s.table == "valid":  # a Table 1 line (the same dataset and rate) with a validation split
            assert any(t.table == "table1" and s.args[:5] == t.args for t in SPECS) and "--val_ratio" in s.flags, s
        if s.table == "seeds":  # the base line with only the seed changed
            assert int(seed) != 42 and s.args[1:] == base.args[1:] and s.expected == base.expected, s
        else:
            assert int(seed) == 42, s
        assert dataset in DATASETS and float(rate) in RATES and int(fwd) >= 0, s
        assert without in CODES or without in ("club", "hmoe"), s
        flags = list(s.flags)
        while flags:  # every flag is a Config field (train.py's flags) with a value, or a boolean
            name = flags.pop(0).removeprefix("--")
            assert name in fields, s
            if not fields[name].metadata.get("boolean"):
                type(fields[name].default)(flags.pop(0))
        assert all(c.isalnum() or c in "._-" for c in s.name), s


def test_table1_lines_are_the_paper_cells_with_the_official_fusion_dims():
    t1 = [s for s in SPECS if s.table == "table1"]
    assert {(s.dataset, s.rate) for s in t1} == set(PAPER_TABLE1)
    for s in t1:
        assert s.expected_hits1 == PAPER_TABLE1[(s.dataset, s.rate)][0]
        fwd = {("FB15K_DB15K", 0.2): "512", ("FB15K_YAGO15K", 0.2): "128"}.get((s.dataset, s.rate), "0")
        assert s.positional == ("42", s.dataset, str(s.rate), fwd, "0") and not s.flags
    assert BY_NAME[BASE_RUN].table == "table1" and (BY_NAME[BASE_RUN].dataset, BY_NAME[BASE_RUN].rate) == (
        "FB15K_DB15K", 0.2)


def test_table2_lines_cover_every_ablation_with_the_right_code():
    t2 = {s.row: s for s in SPECS if s.table == "table2"}
    assert set(t2) == set(TABLE2_ROWS) == set(PAPER_TABLE2) - {"Ours"}
    base = BY_NAME[BASE_RUN]
    for row, s in t2.items():
        assert s.expected_hits1 == PAPER_TABLE2[row][0]
        assert s.positional[:4] == base.positional[:4] and not s.flags
        name = CODES.get(s.without, s.without)  # the code as run.sh translates it
        assert name == TABLE2_ROWS[row], row
        if s.without in CODES:
            assert row not in ("w/o L_CLUB", "w/o HMoE")  # the official codes stop at 8


def test_iterative_lines_repeat_table1_with_il():
    t1 = {(s.dataset, s.rate): s for s in SPECS if s.table == "table1"}
    il = [s for s in SPECS if s.table == "il"]
    assert {(s.dataset, s.rate) for s in il} == set(OFFICIAL_IL)
    for s in il:
        assert s.flags == ("--il",) and s.positional == t1[(s.dataset, s.rate)].positional
        assert s.expected_hits1 == OFFICIAL_IL[(s.dataset, s.rate)][0]


def test_fig3_lines_sweep_one_flag_each_around_the_defaults():
    base = BY_NAME[BASE_RUN]
    defaults = Config()
    swept: dict[str, list[float]] = {}
    for s in (s for s in SPECS if s.table == "fig3"):
        param, value = s.fig3_point()
        assert s.positional == base.positional and s.flags == (f"--{param}", s.flags[1])
        assert float(s.flags[1]) == value
        assert value != getattr(defaults, param), "the default point is the Table 1 run, not repeated"
        swept.setdefault(param, []).append(value)
    assert set(swept) == set(FIG3_PARAMS) == set(FIG3_DEFAULTS)
    assert all(FIG3_DEFAULTS[p] == getattr(defaults, p) for p in FIG3_DEFAULTS)  # run.sh keeps these too
    assert all(len(v) >= 4 for v in swept.values())
    assert min(swept["tau_al"]) <= 0.1 and max(swept["tau_al"]) >= 8.0
    assert min(swept["n_exp"]) == 1 and max(swept["n_exp"]) == 9
    for p in ("al_loss", "cl_loss", "tau_cl"):
        assert min(swept[p]) == 0.01 and max(swept[p] + [getattr(defaults, p)]) == 1.0


# ---------------------------------------------------------------------------------------------
# run_all.sh itself.
# ---------------------------------------------------------------------------------------------


def test_list_prints_one_annotated_command_per_line(fake):
    # An empty runs folder of the test's own: the repository's runs/ may hold finished runs ("done").
    lines = fake.run("run_all.sh", "--list", extra_env={"RUNS_DIR": str(fake.out)}).stdout.splitlines()
    assert len(lines) == len(SPECS)
    for line, s in zip(lines, SPECS):
        cmd, comment = line.split("  # ")
        assert cmd == f"bash run.sh {' '.join(s.args)} --run_name {s.name} --out_dir {fake.out}"
        status = "not run: no image features, = t1_db_20" if s.name == "t2_db_20_wo_v" else "todo"
        assert comment == f"{s.table} | {s.row} | paper Hits@1 {s.expected} | {status}"
    assert not fake.calls()


def test_list_with_override_filter_and_pass_through(fake):
    lines = fake.run("run_all.sh", "--list", "--only", "table2,il_yg_80", "--dataset-override", "default",
                     "--out_dir", "x/y", "--epochs", "2").stdout.splitlines()
    assert len(lines) == len(TABLE2_ROWS) + 1
    for line in lines:
        argv = line.split("  # ")[0].split()
        assert argv[:2] == ["bash", "run.sh"] and argv[3] == "default"
        # the pass-through flags come after the line's own flags; the run folder last
        assert argv[-6:-3] == ["--epochs", "2", "--run_name"] and argv[-2:] == ["--out_dir", "x/y"]
    env_lines = fake.run("run_all.sh", "--list", "--only", "fig3", extra_env={"DATASET_OVERRIDE": "default"})
    assert all(l.split()[3] == "default" for l in env_lines.stdout.splitlines())
    bad = fake.run("run_all.sh", "--list", "--only", "nothing", check=False)
    assert bad.returncode == 2 and "no run matches" in bad.stderr
    assert fake.run("run_all.sh", "--run_name", "x", check=False).returncode == 2


def test_preset_official_passes_through_into_its_own_run_folders(fake):
    lines = fake.run("run_all.sh", "--list", "--only", "table1", "--preset", "official",
                     "--out_dir", fake.out).stdout.splitlines()
    assert len(lines) == 6
    for line in lines:
        argv = line.split("  # ")[0].split()
        assert _flag(argv, "--preset") == "official" and _flag(argv, "--out_dir") == f"{fake.out}/official"
    paper = fake.run("run_all.sh", "--list", "--only", "t1_db_20", "--out_dir", fake.out).stdout
    assert "--preset" not in paper and f"--out_dir {fake.out} " in paper + " "
    bad = fake.run("run_all.sh", "--list", "--preset", "mine", check=False)
    assert bad.returncode == 2 and "unknown --preset" in bad.stderr


def test_skips_finished_runs_and_resumes_interrupted_ones(fake):
    out = fake.out
    (out / "t1_db_20").mkdir(parents=True)
    (out / "t1_db_20" / "results.json").write_text("{}")
    (out / "t1_db_50").mkdir()
    (out / "t1_db_50" / "checkpoint.pt").write_text("")  # interrupted after a checkpoint
    listing = fake.run("run_all.sh", "--list", "--only", "table1", "--out_dir", out).stdout
    assert "| done" in listing.splitlines()[0] and "| resume" in listing.splitlines()[1]

    res = fake.run("run_all.sh", "--only", "table1", "--out_dir", out, "--no-report", "--epochs", "2")
    calls = fake.calls()
    names = [_flag(a, "--run_name") for _, a in calls]
    assert names == ["t1_db_50", "t1_db_80", "t1_yg_20", "t1_yg_50", "t1_yg_80"]
    assert "skip t1_db_20" in res.stdout
    assert _flag(calls[0][1], "--resume") == f"{out}/t1_db_50"
    assert all(_flag(a, "--resume") is None for _, a in calls[1:])
    assert all(cuda == "" for cuda, _ in calls)  # no GPU: sequential, CUDA_VISIBLE_DEVICES untouched
    assert (out / "t1_yg_80" / "command.txt").read_text().startswith("bash run.sh 42 FB15K_YAGO15K 0.8 0 0 ")
    assert (out / "t1_yg_80" / "stdout.txt").exists()

    again = fake.run("run_all.sh", "--only", "table1", "--out_dir", out, "--no-report")
    assert len(fake.calls()) == len(calls) and "0 of 6 runs to do" in again.stdout


def test_a_line_whose_folder_is_gone_but_whose_record_is_kept_is_done_unless_named(fake, tmp_path):
    out, records = fake.out, tmp_path / "records"
    records.mkdir()
    (records / "t1_db_50.json").write_text("{}")
    listing = fake.run("run_all.sh", "--list", "--only", "table1", "--out_dir", out, "--records", records).stdout
    assert "| done (record)" in listing.splitlines()[1] and "| todo" in listing.splitlines()[0]
    res = fake.run("run_all.sh", "--only", "table1", "--out_dir", out, "--records", records, "--no-report")
    assert "t1_db_50" not in [_flag(a, "--run_name") for _, a in fake.calls()]
    assert f"skip t1_db_50 (no run folder; {records}/t1_db_50.json holds its finished run" in res.stdout
    fake.run("run_all.sh", "--only", "t1_db_50", "--out_dir", out, "--records", records, "--no-report")
    assert _flag(fake.calls()[-1][1], "--run_name") == "t1_db_50"  # named: it runs again
    assert _flag(fake.calls()[-1][1], "--resume") is None


def test_an_iterative_line_starts_from_its_finished_plain_run(fake):
    """il_db_20 is t1_db_20 plus --il: once t1_db_20 is finished, il_db_20 trains only the iterative epochs
    from its final checkpoint (--il_from); il_db_50, whose plain run is not finished, starts from scratch,
    and an interrupted iterative run is resumed, not started again from the plain run."""
    out = fake.out
    (out / "t1_db_20").mkdir(parents=True)
    (out / "t1_db_20" / "results.json").write_text("{}")
    (out / "t1_db_80").mkdir()
    (out / "t1_db_80" / "results.json").write_text("{}")
    (out / "il_db_80").mkdir()
    (out / "il_db_80" / "checkpoint.pt").write_text("")
    fake.run("run_all.sh", "--only", "il_db_20,il_db_50,il_db_80", "--out_dir", out, "--no-report")
    calls = {_flag(a, "--run_name"): a for _, a in fake.calls()}
    assert _flag(calls["il_db_20"], "--il_from") == f"{out}/t1_db_20"
    assert _flag(calls["il_db_50"], "--il_from") is None
    assert _flag(calls["il_db_80"], "--il_from") is None and _flag(calls["il_db_80"], "--resume") == f"{out}/il_db_80"


def test_without_images_on_a_dataset_without_them_is_not_run(fake, tmp_path):
    """The datasets here have no image feature file: w/o v is the full model, so its line is skipped
    and listed as t1_db_20; once the dataset has images, it runs."""
    out = fake.out
    listing = fake.run("run_all.sh", "--list", "--only", "t2_db_20_wo_v", "--out_dir", out).stdout
    assert listing.rstrip().endswith("| not run: no image features, = t1_db_20")
    res = fake.run("run_all.sh", "--only", "t2_db_20_wo_v,t2_db_20_wo_g", "--out_dir", out, "--no-report")
    assert "skip t2_db_20_wo_v (" in res.stdout and "has no image features: w/o v is t1_db_20)" in res.stdout
    assert [_flag(a, "--run_name") for _, a in fake.calls()] == ["t2_db_20_wo_g"]
    (tmp_path / "data" / "FB15K_DB15K" / "FB15K_DB15K_id_img_feature_dict.pkl").write_bytes(b"")
    fake.run("run_all.sh", "--only", "t2_db_20_wo_v", "--out_dir", out, "--no-report")
    assert [_flag(a, "--run_name") for _, a in fake.calls()][-1] == "t2_db_20_wo_v"


def test_a_failed_run_is_reported_and_the_others_still_run(fake):
    res = fake.run("run_all.sh", "--only", "il", "--out_dir", fake.out, "--no-report",
                   extra_env={"FAKE_RC": "3"}, check=False)
    assert res.returncode == 1
    assert len(fake.calls()) == 6 and res.stdout.count("FAILED (exit 3)") == 6
    assert "fake failure" in res.stdout and "il_db_20" in res.stderr


def _max_overlap(times_file: Path) -> int:
    events = []
    for line in times_file.read_text().splitlines():
        kind, _, t = line.split()
        events.append((float(t), 1 if kind == "start" else -1))
    level = peak = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        level += d
        peak = max(peak, level)
    return peak


@pytest.mark.parametrize("gpu_env, expected", [({"FAKE_GPUS": "2"}, {"0", "1"}),
                                               ({"CUDA_VISIBLE_DEVICES": "3,5"}, {"3", "5"})])
def test_one_run_per_gpu_in_parallel(fake, gpu_env, expected):
    res = fake.run("run_all.sh", "--only", "table1", "--out_dir", fake.out, "--no-report",
                   extra_env={"FAKE_SLEEP": "0.4", **gpu_env})
    calls = fake.calls()
    assert sorted(_flag(a, "--run_name") for _, a in calls) == sorted(s.name for s in SPECS if s.table == "table1")
    assert {cuda for cuda, _ in calls} == expected  # each job sees one GPU
    assert _max_overlap(Path(str(fake.log) + ".times")) == 2
    assert "parallel" in res.stdout


def test_a_missing_dataset_stops_before_any_run(fake, tmp_path):
    """The datasets of the selected lines that are still to do must exist; one message says how to
    build the missing ones, and nothing runs or is created."""
    import shutil

    shutil.rmtree(tmp_path / "data" / "FB15K_YAGO15K")
    res = fake.run("run_all.sh", "--only", "table1", "--out_dir", fake.out, "--no-report", check=False)
    assert res.returncode == 2 and not fake.calls() and not fake.out.exists()
    assert "dataset folder(s) missing" in res.stderr and res.stderr.count("build_mmkb") == 1
    assert (f"python -m data_process.build_mmkb --mmkb <mmkb root> --dataset FB15K_YAGO15K --out "
            f"{tmp_path / 'data'}") in res.stderr
    # Lines whose dataset exists run; so does every line on the embedded default or an existing folder.
    fake.run("run_all.sh", "--only", "t1_db_20", "--out_dir", fake.out, "--no-report")
    shutil.rmtree(tmp_path / "data")
    fake.run("run_all.sh", "--only", "t1_yg_20", "--out_dir", fake.out, "--no-report", "--dataset-override", "default")
    (tmp_path / "mine").mkdir()
    fake.run("run_all.sh", "--only", "t1_yg_50", "--out_dir", fake.out, "--no-report",
             "--dataset-override", str(tmp_path / "mine"))
    assert [_flag(a, "--run_name") for _, a in fake.calls()] == ["t1_db_20", "t1_yg_20", "t1_yg_50"]
    res = fake.run("run_all.sh", "--only", "table2", "--out_dir", fake.out, "--no-report",
                   "--dataset-override", str(tmp_path / "nowhere"), check=False)
    assert res.returncode == 2 and str(tmp_path / "nowhere") in res.stderr and len(fake.calls()) == 3


def test_jobs_runs_several_at_a_time_on_the_cpu_with_one_thread_each_or_several_per_gpu(fake):
    fake.env.pop("OMP_NUM_THREADS", None)
    res = fake.run("run_all.sh", "--only", "table1", "--out_dir", fake.out, "--no-report", "--jobs", "2",
                   extra_env={"FAKE_SLEEP": "0.4"})
    assert "2 runs in parallel on the CPU, one thread each" in res.stdout
    assert _max_overlap(Path(str(fake.log) + ".times")) == 2
    assert {c for c, _ in fake.calls()} == {""}  # no GPU named
    omp = Path(str(fake.log) + ".omp").read_text().split()
    assert omp.count("OMP=1") == 6
    res = fake.run("run_all.sh", "--only", "table2", "--out_dir", fake.out, "--no-report", "--jobs", "2",
                   extra_env={"FAKE_SLEEP": "0.4", "FAKE_GPUS": "2"})
    assert "4 runs in parallel, 2 per GPU" in res.stdout
    assert {c for c, _ in fake.calls()[6:]} == {"0", "1"}
    times = Path(str(fake.log) + ".times")
    times.write_text("\n".join(times.read_text().splitlines()[12:]) + "\n")  # the table2 pass alone
    assert _max_overlap(times) == 4
    bad = fake.run("run_all.sh", "--only", "t1_db_20", "--jobs", "0", check=False)
    assert bad.returncode == 2 and "--jobs must be a positive integer" in bad.stderr


def test_the_report_keeps_records_only_for_the_default_run_folders(fake, tmp_path):
    """After every finished run the report is rewritten; into docs/records only when the runs are the
    real campaign (default --out_dir, no dataset override), never for a smoke pass elsewhere.

    run_all.sh works in its own folder, whose default runs/ may hold real runs: the scripts are copied
    to a folder of their own here, so that the fake runs never touch the repository's runs/."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for script in ("run_all.sh", "run.sh"):
        (repo / script).write_text((ROOT / script).read_text())
    fake.run(repo / "run_all.sh", "--only", "t1_db_20")
    reports = [a for _, a in fake.calls() if a[:2] == ["-m", "data_process.report"]]
    assert len(reports) == 2  # after the run, and at the end
    assert all(_flag(a, "--records") == "docs/records" and "--save_records" in a for a in reports)
    assert (repo / "runs" / "t1_db_20" / "results.json").is_file()
    fake.run(repo / "run_all.sh", "--only", "t1_db_50", "--preset", "official")
    assert _flag(fake.calls()[-1][1], "--records") == "docs/records/official"
    fake.run(repo / "run_all.sh", "--only", "t1_db_80", "--out_dir", tmp_path / "smoke")
    fake.run(repo / "run_all.sh", "--only", "t1_yg_20", "--dataset-override", "default")
    for _, argv in fake.calls()[-5:]:
        assert "--records" not in argv


def test_the_report_takes_its_notes_from_the_file_beside_it(fake, tmp_path):
    page = tmp_path / "pages" / "results.md"
    page.parent.mkdir()
    fake.run("run_all.sh", "--only", "t1_db_20", "--out_dir", fake.out, "--report", page)
    assert "--notes" not in fake.calls()[-1][1]  # no pages/results_notes.md: no notes
    (page.parent / "results_notes.md").write_text("- a note\n")
    fake.run("run_all.sh", "--only", "t1_db_50", "--out_dir", fake.out, "--report", page)
    reports = [a for _, a in fake.calls() if a[:2] == ["-m", "data_process.report"]][-2:]
    assert [_flag(a, "--notes") for a in reports] == [str(page.parent / "results_notes.md")] * 2


def test_one_gpu_runs_sequentially_on_it(fake):
    fake.run("run_all.sh", "--only", "t1_db_20,t1_db_50", "--out_dir", fake.out, "--no-report",
             extra_env={"FAKE_GPUS": "1"})
    assert [c for c, _ in fake.calls()] == ["0", "0"]
    assert _max_overlap(Path(str(fake.log) + ".times")) == 1


# ---------------------------------------------------------------------------------------------
# run.sh: the official positional arguments and integer codes, translated once.
# ---------------------------------------------------------------------------------------------


def _train_argv(fake, *args, extra_env=None) -> list[str]:
    before = len(fake.calls())
    fake.run("run.sh", *args, extra_env=extra_env)
    cuda, argv = fake.calls()[before]
    assert argv[0] == "train.py"
    return argv[1:]


@pytest.mark.parametrize("code, name", sorted(CODES.items()))
def test_run_sh_translates_the_official_codes(fake, code, name):
    argv = _train_argv(fake, 42, "default", 0.2, 512, code, "--epochs", 2)
    assert _flag(argv, "--without") == name
    cfg = train.parse_args(argv).cfg  # what train.py makes of it: the later --epochs wins
    assert cfg.switches.off == ((name,) if name else ())
    assert (cfg.seed, cfg.rate, cfg.fusion_weight_dim, cfg.epochs, cfg.file_dir) == (42, 0.2, 512, 2, "")
    assert (cfg.lr, cfg.n_exp, cfg.tau_cl, cfg.tau_al, cfg.cl_loss, cfg.al_loss, cfg.mi_loss) == (
        5e-4, 5, 0.1, 4.0, 1.0, 0.1, 1e-4)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.table in ("table2", "fig3")], ids=lambda s: s.name)
def test_every_table2_and_fig3_line_reaches_train_py_as_intended(fake, spec):
    args = list(spec.args)
    args[1] = "default"  # the dataset folders need not exist here
    cfg = train.parse_args(_train_argv(fake, *args)).cfg
    if spec.table == "table2":
        assert cfg.switches.off == (TABLE2_ROWS[spec.row],)
    else:
        param, value = spec.fig3_point()
        assert getattr(cfg, param) == value and cfg.switches.off == ()
        assert (cfg.rate, cfg.fusion_weight_dim) == (0.2, 512)


def test_run_sh_names_dataset_folder_ill_file_and_env_weights(fake, tmp_path):
    argv = _train_argv(fake, 7, "FB15K_DB15K", 0.5, 0, "image,club", "pairs.tsv", "--il",
                       extra_env={"DATA_ROOT": str(tmp_path / "data"), "AL_LOSS": "0.5", "TAU_CL": "0.05"})
    cfg = train.parse_args(argv).cfg
    assert cfg.file_dir == f"{tmp_path}/data/FB15K_DB15K" and cfg.train_ill_path == "pairs.tsv" and cfg.il
    assert cfg.switches.off == ("club", "image") and (cfg.al_loss, cfg.tau_cl, cfg.seed) == (0.5, 0.05, 7)


def test_run_sh_rejects_unknown_codes_and_missing_folders(fake, tmp_path):
    res = fake.run("run.sh", 42, "default", 0.2, 0, 9, check=False)
    assert res.returncode != 0 and "unknown <without> code '9'" in res.stderr
    res = fake.run("run.sh", 42, "FB15K_DB15K", 0.2, 0, 0, check=False,
                   extra_env={"DATA_ROOT": str(tmp_path / "nowhere")})
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert f"build_mmkb --mmkb <mmkb root> --dataset FB15K_DB15K --out {tmp_path / 'nowhere'}" in res.stderr
    res = fake.run("run.sh", 42, "FB15K_WIKI", 0.2, 0, 0, check=False)
    assert res.returncode == 2 and "unknown dataset 'FB15K_WIKI'" in res.stderr
    assert all(name in res.stderr for name in ("FB15K_DB15K", "FB15K_YAGO15K", "default", "a path to a folder"))
    assert fake.run("run.sh", 42, "default", check=False).returncode == 2
    assert not fake.calls()


def test_run_sh_codes_match_the_modality_table():
    """run.sh translates the official integer codes in bash; they must be those of MODALITY_TABLE
    and COMPONENTS."""
    table = {0: ""} | {m.without_code: m.name for m in MODALITY_TABLE}
    table |= {code: name for name, (code, _) in COMPONENTS.items() if code is not None}
    text = (ROOT / "run.sh").read_text()
    body = text[text.index("without_name() {"):]
    body = body[:body.index("\n}")]
    codes = {int(c): n for c, n in re.findall(r"\b(\d)\) echo (\w+) ;;", body)}
    assert re.search(r'0\|""\) echo "" ;;', body)
    assert {0: "", **codes} == table
    assert CODES == {str(c): (n or None) for c, n in table.items()}


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="run_all.sh looks for other trainings with pgrep")
def test_warns_when_another_training_runs_and_threads_are_not_set(fake):
    """One run at a time takes torch's default threads: beside another train.py that over-subscribes the
    cores, so run_all.sh says so (not when OMP_NUM_THREADS is set)."""
    fake.env.pop("OMP_NUM_THREADS", None)
    # A stand-in whose command line names train.py (python keeps its argv; `bash -c "sleep 60" train.py` would
    # exec sleep and lose it). pgrep must see it, or the test would pass only beside a real training.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train.py"])
    try:
        seen = subprocess.run(["pgrep", "-f", "train[.]py"], capture_output=True, text=True).stdout.split()
        assert str(other.pid) in seen
        warned = fake.run("run_all.sh", "--only", "t1_db_20", "--out_dir", fake.out).stderr
        quiet = fake.run("run_all.sh", "--only", "t1_db_50", "--out_dir", fake.out,
                         extra_env={"OMP_NUM_THREADS": "1"}).stderr
    finally:
        other.kill()
        other.wait()
    assert "another training (train.py) is running" in warned and "OMP_NUM_THREADS=1" in warned
    assert "another training" not in quiet
    trained = [_flag(argv, "--run_name") for _, argv in fake.calls()]  # the report's calls have no run name
    assert [n for n in trained if n] == ["t1_db_20", "t1_db_50"]
