"""The report builder on fake run folders: numbers only from results.json, missing runs shown as
missing (never zeros), smoke runs labelled, figures drawn or skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_process import report
from data_process.report import BASE_RUN, PAPER_TABLE1, Run, build_report, choose_entities, load_run_list

SPECS = {s.name: s for s in load_run_list()}
MODS = ("graph", "image", "rel_bow", "rel_text", "attr_bow", "attr_text")


def _metrics(h1: float) -> dict:
    avg = {"hits@1": h1, "hits@5": h1 + 0.1, "hits@10": h1 + 0.2, "mrr": h1 + 0.05, "mr": 12.0}
    return {"l2r": avg, "r2l": avg, "avg": avg}


def make_run(runs: Path, name: str, h1: float, *, epochs=1000, file_dir=None, valid=False, artifacts=False,
             command=None, seconds=12.5, **config) -> Path:
    """A finished run folder as train.py writes it (results.json + config.json [+ arrays])."""
    spec = SPECS[name]
    folder = runs / name
    folder.mkdir(parents=True)
    cfg = {"file_dir": f"data/mmkb-datasets/{spec.dataset}" if file_dir is None else file_dir,
           "rate": spec.rate, "epochs": epochs, "check_point": 10 if epochs == 1000 else 1,
           "il": spec.table == "il", "il_epochs": 500, "al_loss": 0.1, "cl_loss": 1.0, "tau_cl": 0.1,
           "tau_al": 4.0, "n_exp": 5, "seed": 42, **config}
    best = {"epoch": epochs - 10, "test": _metrics(h1 + 0.01)}
    results = {"last_epoch": {"epoch": epochs, "test": _metrics(h1)},
               "best_valid_epoch": {"epoch": epochs - 20, "test": _metrics(h1 - 0.005)} if valid else None,
               "best_test_epoch": {**best, "note": "selected on the TEST set"},
               "config": cfg, "pairs": {"train": 10, "valid": 0, "test": 40, "pseudo": 0}, "train_seconds": seconds}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "results.json").write_text(json.dumps(results))
    if command:
        (folder / "command.txt").write_text(command + "\n")
    if artifacts:
        rng = np.random.default_rng(0)
        w = rng.dirichlet(np.ones(6), size=20).astype(np.float32)  # (N, M)
        np.save(folder / "modality_weights.npy", w)
        gates = {m: rng.dirichlet(np.ones(5), size=20).astype(np.float32) for m in MODS}
        np.savez(folder / "expert_gates.npz", modalities=np.array(MODS), **gates)
        rows = ["left_id\tleft_name\tpred_right_id\tpred_right_name\tscore\tgold_right_id\tgold_right_name\t"
                "correct\trank"]
        rows += [f"{i}\t/m/0e{i}\t{10 + i}\tx\t0.5\t{10 + i}\t<http://dbpedia.org/resource/E_{i}>\t"
                 f"{int(i != 3)}\t1" for i in range(10)]
        (folder / "predictions.tsv").write_text("\n".join(rows) + "\n")
    return folder


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_missing_runs_show_as_missing_never_as_zeros(tmp_path):
    text = build_report(tmp_path / "runs", tmp_path / "results.md")
    assert (tmp_path / "results.md").read_text() == text
    t1 = _section(text, "Table 1")
    ours = [l for l in t1.splitlines() if "ours," in l]
    assert ours and all(l.count("missing") == 10 for l in ours)  # 4 metrics + epoch, two datasets
    assert "0.0000" not in text and "0 of 50 runs" in text
    assert "0.5118" in t1  # the paper's number stays beside it
    assert "SMOKE" not in text
    assert "*Figure 4 not drawn: run `t1_db_20` is missing*" in text
    f3 = _section(text, "Figure 3")
    assert "| τ_al (tau_al) | 4 (default) | `t1_db_20` | missing | missing | missing | missing |" in f3


def test_numbers_come_from_the_run_folders(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, BASE_RUN, 0.4321, command="bash run.sh 42 FB15K_DB15K 0.2 512 0 --run_name t1_db_20")
    make_run(runs, "t2_db_20_wo_g", 0.3333)
    text = build_report(runs, tmp_path / "results.md")
    t1 = _section(text, "Table 1")
    last = next(l for l in t1.splitlines() if "ours, last epoch" in l and "20%" in t1)
    assert "| 0.4321 | 0.5321 | 0.6321 | 0.4821 | 1000 |" in last and last.count("missing") == 5
    best = next(l for l in t1.splitlines() if "best TEST epoch*" in l)
    assert "| 0.4421 |" in best and "| 990 |" in best
    assert "best valid" not in t1  # no run has a validation split: the row is left out
    t2 = _section(text, "Table 2")
    assert "| Ours | paper | 0.5118 |" in t2 and "| 0.4321 |" in t2 and "| 0.3333 |" in t2
    assert "selection rule behind the paper's Table 1" in text
    assert "bash run.sh 42 FB15K_DB15K 0.2 512 0 --run_name t1_db_20" in text  # the recorded command
    assert "SMOKE" not in text and "2 of 50 runs" in text
    runs_rows = _section(text, "Runs")
    assert "| `t1_db_20` | table1 | FB15K-DB15K 20% | 0.5118 | finished | FB15K_DB15K | 0.2 | 1000 | 12 | paper |" \
        in runs_rows


def test_a_validation_selected_row_appears_when_present(tmp_path):
    make_run(tmp_path / "runs", BASE_RUN, 0.5, valid=True, val_ratio=0.1)
    t1 = _section(build_report(tmp_path / "runs", tmp_path / "r.md"), "Table 1")
    valid = [l for l in t1.splitlines() if "best valid epoch" in l]
    assert len(valid) == 3  # one per seed ratio
    assert "| 0.4950 |" in valid[0] and "| 980 |" in valid[0]


def test_table_1_takes_the_best_valid_epoch_of_the_early_stopping_split_run_where_its_own_run_has_none(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, BASE_RUN, 0.50)
    make_run(runs, "t1_db_20_val_es", 0.46, valid=True, val_ratio=0.1, early_stop=5)
    make_run(runs, "t1_db_20_val", 0.40, valid=True, val_ratio=0.1)  # no --early_stop: not the stand-in
    t1 = _section(build_report(runs, tmp_path / "r.md"), "Table 1")
    valid = [l for l in t1.splitlines() if "| ours, best valid epoch |" in l]
    assert len(valid) == 3
    # the 20% cell: t1_db_20_val_es's best valid epoch (0.46 - 0.005 at 980), marked; YAGO has no run
    assert "| 0.4550 § | 0.5550 § | 0.6550 § | 0.5050 § | 980 | missing |" in valid[0]
    assert "§" not in valid[1] and "missing" in valid[1]  # 50%: no run, and no split run of that ratio
    assert "§ best valid epoch of `t1_db_20_val_es` (FB15K-DB15K 20%): the same command with " \
           "`--val_ratio 0.1 --early_stop 5`" in t1
    # the table 1 run's own validation split wins over a stand-in
    other = tmp_path / "other"
    make_run(other, BASE_RUN, 0.50, valid=True, val_ratio=0.1)
    make_run(other, "t1_db_20_val_es", 0.46, valid=True, val_ratio=0.1, early_stop=5)
    t1 = _section(build_report(other, tmp_path / "o.md"), "Table 1")
    assert "| 0.4950 |" in next(l for l in t1.splitlines() if "| ours, best valid epoch |" in l) and "§" not in t1


def test_seeds_section_gives_each_seed_and_the_mean_and_sample_std_of_the_finished_ones(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, BASE_RUN, 0.50)
    make_run(runs, "t1_db_20_s43", 0.52, seed=43)
    seeds = _section(build_report(runs, tmp_path / "r.md"), "Seeds")
    assert "| 42 | `t1_db_20` | finished | 0.5000 | 0.5500 | 1000 | 0.5100 | 0.5600 | 990 |" in seeds
    assert "| 43 | `t1_db_20_s43` | finished | 0.5200 |" in seeds
    assert "| 44 | `t1_db_20_s44` | missing | - |" in seeds  # its seed from run_all.sh's line
    # last H@1 0.50 and 0.52: mean 0.51, sample std sqrt(2 * 0.01^2 / 1) = 0.0141; s44 not counted.
    assert "| mean ± std |  | 2 finished | 0.5100 ± 0.0141 | 0.5600 ± 0.0141 |  | 0.5200 ± 0.0141 |" in seeds


def test_validation_section_puts_the_three_selections_side_by_side(tmp_path):
    make_run(tmp_path / "runs", "t1_db_20_val", 0.50, valid=True, val_ratio=0.1)
    sec = _section(build_report(tmp_path / "runs", tmp_path / "r.md"), "Selection on a validation split")
    # last 0.50 (epoch 1000), best valid 0.495 (980), best test 0.51 (990); MRR = H@1 + 0.05
    assert ("| `t1_db_20_val` | FB15K-DB15K 20% | finished | 10 / 0 / 40 | 0.5000 | 0.5500 | 1000 | 0.4950 | 0.5450 "
            "| 980 | 0.5100 | 0.5600 | 990 | -0.0150 / -0.0150 |") in sec


def test_calibrated_runs_get_their_own_table_of_the_calibrated_numbers(tmp_path):
    folder = make_run(tmp_path / "runs", "t1_yg_20_val_cal", 0.40, valid=True, val_ratio=0.1,
                      calibrate_weights=True)
    res = json.loads((folder / "results.json").read_text())
    factors = {"graph": 1.0, "rel_bow": 0.0, "attr_text": 2.0}
    res["last_epoch"]["calibrated"] = {"factors": factors, "valid_mrr": 0.7, "valid_mrr_learned": 0.6,
                                       "test": _metrics(0.45)}
    res["best_calibrated_valid_epoch"] = {"epoch": 400, "factors": factors, "valid_mrr": 0.75,
                                          "valid_mrr_learned": 0.6, "test": _metrics(0.47)}
    (folder / "results.json").write_text(json.dumps(res))
    evals = [{"epoch": e, "test": _metrics(0.3), "calibrated": {"factors": factors, "valid_mrr": 0.7,
                                                                  "valid_mrr_learned": 0.6, "test": _metrics(h1)}}
             for e, h1 in ((400, 0.47), (600, 0.48), (1000, 0.45))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in evals))
    make_run(tmp_path / "runs", "t1_db_20_val", 0.50, valid=True, val_ratio=0.1)
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_BEGIN}\n{report.README_END}\n")
    records = tmp_path / "records"
    sec = _section(build_report(tmp_path / "runs", tmp_path / "r.md", readme=readme, save_records_to=records),
                   "Selection on a validation split")
    assert ("| `t1_yg_20_val_cal` | FB15K-YAGO15K 20% | finished | 0.4000 / 0.4500 | 0.4500 / 0.5000 | graph 1 / "
            "rel_bow 0 / attr_text 2 | 0.4700 / 0.5200 (400) |") in sec
    assert "| `t1_db_20_val` |" in sec.split("Calibrated weights")[0]  # not calibrated: not in that table
    assert "| `t1_db_20_val` |" not in sec.split("Calibrated weights")[1]
    # The README's opening table: the calibrated last epoch, and the best calibrated test epoch (600)
    row = "FB15K-YAGO15K 20%, weights calibrated on a validation split (`t1_yg_20_val_cal`)"
    line = next(l for l in readme.read_text().splitlines() if row in l)
    assert ("| 0.4393 / 0.5280 | 0.4280 / 0.5150 | 0.4500 / 0.5000 (epoch 1000) | - | 0.4800 / 0.5300 (epoch 600) |"
            in line)
    # The record keeps the calibrated numbers: the same row once the folder is gone
    import shutil
    shutil.rmtree(folder)
    build_report(tmp_path / "runs", tmp_path / "r.md", readme=readme, records_dir=records)
    assert line in readme.read_text()


def test_seed_spread_of_one_value_has_no_deviation():
    assert report.seed_spread([0.5]) == (0.5, None)
    mean, std = report.seed_spread([0.1, 0.2, 0.6])
    assert mean == pytest.approx(0.3) and std == pytest.approx(np.sqrt((0.04 + 0.01 + 0.09) / 2))


def test_smoke_runs_are_labelled(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, BASE_RUN, 0.3, epochs=2, file_dir="")
    make_run(runs, "il_yg_80", 0.3, epochs=2, file_dir="", il_epochs=2)
    text = build_report(runs, tmp_path / "r.md")
    assert "SMOKE PASS: 2 of the 2 finished runs" in text and "embedded default" in text
    assert "not** reproductions" in text
    assert "| 0.3000 † |" in _section(text, "Table 1")
    row = next(l for l in _section(text, "Runs").splitlines() if "`il_yg_80`" in l)
    assert "2 + 2 il" in row and "SMOKE: dataset embedded default (the line's FB15K_YAGO15K); epochs 2" in row
    assert "il_epochs 2 (paper 500)" in row


def test_pseudo_label_counts_come_from_the_log(tmp_path):
    folder = make_run(tmp_path / "runs", "il_db_50", 0.6)
    (folder / "log.txt").write_text("10:00 epoch=1010 pseudo_new=100 pseudo_total=100 pseudo_new_precision=0.9000\n"
                                    "10:01 epoch=1020 pseudo_new=50 pseudo_total=150 pseudo_new_precision=0.5000\n")
    run = Run.load(SPECS["il_db_50"], tmp_path / "runs")
    assert report.pseudo_label_stats(run) == (150, 115)
    il = _section(build_report(tmp_path / "runs", tmp_path / "r.md"), "Iterative")
    assert "| `il_db_50` | 150 | 0.7667 |" in il and "| `il_db_20` | missing | - |" in il
    assert "0.6790" in il  # the official iterative log's number beside ours


def test_pseudo_label_counts_come_from_the_steps_when_the_folder_is_gone(tmp_path):
    """A record has no log: its results' pseudo_steps give the last step's set (the reselect scheme drops pairs,
    so the sum of the additions, 4,276 + 1,719, is not the set), and they win over a log that repeats a step."""
    runs, records = tmp_path / "runs", tmp_path / "records"
    folder = make_run(runs, "il_db_20", 0.6)
    results = json.loads((folder / "results.json").read_text())
    results["pseudo_steps"] = [{"epoch": 1010, "new": 4276, "correct": 3758, "dropped": 0, "total": 4276,
                                "total_correct": 3758},
                               {"epoch": 1020, "new": 1719, "correct": 1497, "dropped": 97, "total": 5898,
                                "total_correct": 5212}]
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "log.txt").write_text("10:00 epoch=1010 pseudo_new=4276 pseudo_new_precision=0.8789\n" * 2)
    assert report.pseudo_label_stats(Run.load(SPECS["il_db_20"], runs)) == (5898, 5212)
    records.mkdir()
    (records / "il_db_20.json").write_text(json.dumps({"source": "runs/il_db_20/results.json", "results": results}))
    shutil.rmtree(folder)
    il = _section(build_report(runs, tmp_path / "r.md", records_dir=records), "Iterative")
    assert "| `il_db_20` | 5898 | 0.8837 |" in il


def test_choose_entities_picks_distinct_correct_pairs_deterministically():
    w = np.full((6, 3), 1 / 3, dtype=np.float32)
    w[1] = [0.8, 0.1, 0.1]
    w[2] = [0.1, 0.1, 0.8]
    w[4] = [0.9, 0.05, 0.05]  # wrongly aligned: not chosen while correct ones remain
    preds = [{"left_id": str(i), "correct": "0" if i == 4 else "1"} for i in range(6)]
    chosen = [int(p["left_id"]) for p in choose_entities(w, preds, n=3)]
    assert chosen[:2] == [1, 2] and len(set(chosen)) == 3 and 4 not in chosen
    assert choose_entities(w, preds, n=3) == choose_entities(w, preds, n=3)
    assert choose_entities(w, [], n=3) == []


def test_figures_are_drawn_from_the_run_arrays(tmp_path):
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    make_run(runs, BASE_RUN, 0.5, artifacts=True)
    make_run(runs, "f3_tau_cl_0.5", 0.2, tau_cl=0.5)
    make_run(runs, "f3_n_exp_1", 0.4, n_exp=1)
    out = tmp_path / "docs" / "results.md"
    text = build_report(runs, out, tmp_path / "docs" / "figures")
    for png in ("fig3_hyperparameters.png", "fig4_modality_weights.png"):
        data = (tmp_path / "docs" / "figures" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"](figures/{png})" in text  # relative to the page
    f3 = _section(text, "Figure 3")
    assert "| τ_cl (tau_cl) | 0.1 (default) | `t1_db_20` | 0.5000 |" in f3
    assert "| τ_cl (tau_cl) | 0.5 | `f3_tau_cl_0.5` | 0.2000 |" in f3
    assert "| τ_cl (tau_cl) | 1 | `f3_tau_cl_1.0` | missing |" in f3
    f4 = _section(text, "Figure 4")
    rows = [l for l in f4.splitlines() if "(KG1)" in l or "(KG2)" in l]
    assert len(rows) == 8 and "/m/0e3 (KG1)" not in f4  # 4 pairs, only correctly aligned ones
    assert "E_" in f4 and "<http" not in f4  # names shortened to the URI's last part
    assert "| entity | graph | image |" in f4 and "img e5" in f4


def test_figure_3_sets_the_papers_reading_beside_the_range_of_each_sweep(tmp_path, monkeypatch):
    """Each swept flag gets the paper's reading and the lowest and highest Hits@1 of its finished points,
    the default point (t1_db_20) among them, with the value at each end."""
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    runs = tmp_path / "runs"
    make_run(runs, BASE_RUN, 0.5)
    make_run(runs, "f3_tau_cl_0.5", 0.2, tau_cl=0.5)
    make_run(runs, "f3_tau_cl_0.01", 0.45, tau_cl=0.01)
    section = _section(build_report(runs, tmp_path / "r.md", tmp_path / "figs"), "Figure 3")
    reading = section[section.index("The paper's reading beside ours"):]
    assert ("| τ_cl (tau_cl) | (3) the most significant impact; keep it around 0.1 | 3 of 5 | "
            "0.2100 (0.5) to 0.5100 (0.1), range 0.300 | 0.2000 (0.5) to 0.5000 (0.1), range 0.300 |") in reading
    assert "| k (n_exp) | (1) should not be too small; once enough, performance stabilises | 1 of 5 | " \
           "0.5100 (5) only | 0.5000 (5) only |" in reading
    assert "| τ_al (tau_al) | not in the paper's figure" in reading


def test_without_matplotlib_the_tables_are_written_and_figures_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    make_run(tmp_path / "runs", BASE_RUN, 0.5, artifacts=True)
    text = build_report(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")
    assert text.count("*Figure skipped: matplotlib is not installed") == 2
    assert not (tmp_path / "figs").exists()
    assert "| 0.5000 |" in _section(text, "Table 1") and "img e1" in _section(text, "Figure 4")


def test_cli_writes_the_page_with_notes(tmp_path, capsys):
    make_run(tmp_path / "runs", BASE_RUN, 0.5)
    rc = report.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out.md"), "--note", "hello"])
    text = (tmp_path / "out.md").read_text()
    assert rc == 0 and "## Notes\n\n- hello" in text and "python -m data_process.report --runs" in text
    assert "wrote" in capsys.readouterr().out
    assert all(t in text for t in ("## Table 1", "## Table 2", "## Iterative", "## Figure 3", "## Figure 4",
                                   "## Runs"))
    # Table 1 prints the paper's four numbers of every cell in the cell's row and dataset columns.
    rows = [line.split(" | ") for line in _section(text, "Table 1").splitlines()
            if "| paper (best test epoch) |" in line]
    assert len(rows) == 3
    by_rate = {row[0].strip("| "): row for row in rows}
    assert sorted(PAPER_TABLE1) == sorted((d, r) for d in ("FB15K_DB15K", "FB15K_YAGO15K") for r in (0.2, 0.5, 0.8))
    for (dataset, rate), numbers in PAPER_TABLE1.items():
        h1, h5, h10, mrr = numbers
        assert 0 < h1 <= h5 <= h10 < 1 and h1 <= mrr < 1  # a well-formed result (MRR >= Hits@1)
        first = 2 if dataset == "FB15K_DB15K" else 7  # columns: seeds, result, 5 per dataset
        assert by_rate[f"{round(rate * 100)}%"][first:first + 4] == [f"{v:.4f}" for v in numbers]


def test_the_notes_file_gives_the_pages_notes_and_the_header_command_rebuilds_the_page(tmp_path):
    make_run(tmp_path / "runs", BASE_RUN, 0.5)
    notes = tmp_path / "results_notes.md"
    notes.write_text("# Notes of the page\n\nWhat this file is, wrapped\nover two lines.\n\n"
                     "- The first note,\n  wrapped here\n    and here.\n\n- The second.\n")
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out.md"), "--notes", str(notes),
            "--note", "A third."]
    assert report.main(argv) == 0
    text = (tmp_path / "out.md").read_text()
    assert "## Notes\n\n- The first note, wrapped here and here.\n- The second.\n- A third.\n" in text
    assert f"--notes {notes} --note '...'`" in text  # the file's path, which rebuilds the page as it is


@pytest.mark.parametrize("content, line, got", [
    ("- a note\n\n  indented after a blank line\n", 3, "indented after a blank line"),
    ("intro\n\n- a note\nnot indented\n", 4, "not indented"),
])
def test_a_notes_line_that_is_no_note_is_refused_with_its_line_and_the_page_kept(tmp_path, capsys, content,
                                                                                 line, got):
    notes, out = tmp_path / "notes.md", tmp_path / "out.md"
    notes.write_text(content)
    out.write_text("the page as it was\n")
    assert report.main(["--runs", str(tmp_path / "runs"), "--out", str(out), "--notes", str(notes)]) == 2
    err = capsys.readouterr().err
    assert f"{notes} line {line}: expected a note" in err and got in err
    assert out.read_text() == "the page as it was\n"
    assert report.main(["--runs", str(tmp_path / "runs"), "--out", str(out), "--notes", str(tmp_path / "no.md")]) == 2
    assert f"{tmp_path / 'no.md'}: cannot read the notes file" in capsys.readouterr().err


def test_the_command_from_config_json_skips_its_provenance():
    config = {"rate": 0.5, "epochs": 1000, "provenance": {"git_commit": "abc", "device": "cpu"}}
    assert report._non_default_flags(config) == ["--rate 0.5"]


def test_the_page_names_the_preset_of_its_runs_and_warns_when_they_mix(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, BASE_RUN, 0.5, preset="official")
    text = build_report(runs, tmp_path / "r.md")
    assert "Preset: `--preset official` (the official code's variant" in text
    assert "mix presets" not in text
    make_run(runs, "t2_db_20_wo_g", 0.4)  # no preset in its config: an older run, the paper's method
    text = build_report(runs, tmp_path / "r.md")
    assert "Preset: `--preset official` (the official code's variant, every departure of docs/departures.md " \
           "switched on); `--preset paper` (the paper's method). **The runs mix presets.**" in text
    assert "Preset:" not in build_report(tmp_path / "empty", tmp_path / "e.md")  # nothing finished, nothing said


def test_a_run_whose_folder_is_gone_is_read_from_its_record(tmp_path):
    """--save_records keeps a finished run's results and a slim metrics copy; once the folder is gone
    the page shows the same numbers from the record, marked as such, and the record is never read while
    the folder is there."""
    runs, records = tmp_path / "runs", tmp_path / "records"
    folder = make_run(runs, BASE_RUN, 0.4321, command="bash run.sh 42 FB15K_DB15K 0.2 512 0 --run_name t1_db_20")
    line = {"epoch": 10, "loss": 99.5, "grad_norm_max": 3.0, "test": _metrics(0.2), "seconds": 5.0,
            "health": {"weight": {"graph": 0.5}, "hits1": {"test": {"graph": 0.1}}, "cosine": {"graph": 0.0}}}
    (folder / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    with_folder = build_report(runs, tmp_path / "a.md", records_dir=records, save_records_to=records)
    saved = json.loads((records / f"{BASE_RUN}.json").read_text())
    assert saved["metrics"] == [{"epoch": 10, "loss": 99.5, "grad_norm_max": 3.0, "seconds": 5.0,
                                 "test": _metrics(0.2)["avg"], "weight": {"graph": 0.5},
                                 "hits1": {"test": {"graph": 0.1}}}]
    assert sorted(p.name for p in records.iterdir()) == [f"{BASE_RUN}.json"]  # only finished runs
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    without = build_report(runs, tmp_path / "b.md", records_dir=records)
    table = lambda text: _section(text, "Table 1")
    assert table(without) == table(with_folder)
    assert "| finished (record) |" in _section(without, "Runs")
    assert "bash run.sh 42 FB15K_DB15K 0.2 512 0 --run_name t1_db_20" in without
    assert "missing" in table(build_report(runs, tmp_path / "c.md"))  # no records folder: missing


def test_the_readme_table_is_spliced_between_its_markers_and_says_what_the_data_holds(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, BASE_RUN, 0.4321)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{report.README_BEGIN}\nold table\n{report.README_END}\n\n## Rest\n")
    build_report(runs, tmp_path / "r.md", readme=readme)
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith(f"{report.README_END}\n\n## Rest\n")
    assert "old table" not in text
    db20 = next(l for l in text.splitlines() if l.startswith("| FB15K-DB15K 20% |"))
    assert db20 == ("| FB15K-DB15K 20% | complete graphs, no images | 0.5118 / 0.5980 | 0.4730 / 0.5610 | "
                    "0.4321 / 0.4821 (epoch 1000) | - | 0.4421 / 0.4921 (epoch 990) |")
    yg20 = next(l for l in text.splitlines() if l.startswith("| FB15K-YAGO15K 20% |"))
    assert "57% of YAGO15K's triples" in yg20 and yg20.endswith("| not run yet | not run yet | not run yet |")
    build_report(runs, tmp_path / "r.md", readme=readme)
    assert readme.read_text() == text  # idempotent
    running = runs / "il_db_20"  # an unfinished run shows its latest evaluation, labelled unfinished
    running.mkdir()
    (running / "config.json").write_text(json.dumps({"epochs": 1000, "il": True, "il_epochs": 500}))
    (running / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 1.0, "test": _metrics(h)}) + "\n"
                                                  for e, h in ((1150, 0.68), (1160, 0.6812))))
    build_report(runs, tmp_path / "r.md", readme=readme)
    il = next(l for l in readme.read_text().splitlines() if l.startswith("| FB15K-DB15K 20%, iterative |"))
    assert il.endswith("| unfinished: 0.6812 / 0.7312 at epoch 1160 of 1500 | unfinished | unfinished |")
    bare = tmp_path / "BARE.md"
    bare.write_text("# no markers\n")
    with pytest.raises(ValueError, match="no '<!-- results:begin -->'"):
        report.splice_readme(bare, ["x"])


def test_figure_4_shows_the_image_gates_or_else_the_most_varied_ones(tmp_path):
    """Data without images: the gates shown are the modality's whose gates differ most between the test
    entities (here rel_text's, one-hot on alternating experts, against attr_bow's constant gates)."""
    n = 6
    rel_text = np.eye(3, dtype=np.float32)[np.arange(n) % 3]  # (N, K) one-hot, varied
    attr_bow = np.full((n, 3), 1 / 3, dtype=np.float32)  # the same for everyone
    path = tmp_path / "gates.npz"
    np.savez(path, modalities=np.array(["graph", "rel_text", "attr_bow"]), graph=rel_text[:, :2] * 0.5 + 0.25,
             rel_text=rel_text, attr_bow=attr_bow)
    assert report.gate_modality(np.load(path), np.arange(n)) == "rel_text"
    np.savez(path, modalities=np.array(["image", "rel_text"]), image=attr_bow, rel_text=rel_text)
    assert report.gate_modality(np.load(path), np.arange(n)) == "image"  # the paper's panel when there is one


def test_the_status_says_what_is_left_and_what_it_costs_here(tmp_path):
    """The cost is per epoch: a 400-epoch Figure 3 point and a 1000-epoch run at 7.2 s an epoch both say a
    1000-epoch run takes 2 h, a Figure 3 point left 400 x 7.2 s, an iterative line 1500 x 7.2 s."""
    runs = tmp_path / "runs"
    make_run(runs, BASE_RUN, 0.5, seconds=7200.0)
    make_run(runs, "t1_db_20_s43", 0.5, seconds=7200.0)
    make_run(runs, "f3_n_exp_1", 0.5, epochs=400, seconds=2880.0)
    status = _section(build_report(runs, tmp_path / "r.md"), "Status")
    assert "| table2 | 0 of 10 | 10 runs | 20.0 h |" in status  # 10 x 1000 x 7.2 s
    assert "| seeds | 1 of 2 | `t1_db_20_s44` | 2.0 h |" in status
    assert "| fig3 | 1 of 21 | 20 runs | 16.0 h |" in status  # 20 x 400 x 7.2 s
    assert "| il | 0 of 6 | 6 runs | 3.0 h for 1 of them |" in status  # il_db_20 only: 1500 x 7.2 s
    assert "| table1 | 1 of 6 | 5 runs | not measured yet |" in status  # no finished run at 50 / 80% or on YAGO
    assert "A 1000-epoch run costs here" in status and "FB15K-DB15K 20% 2.0 h" in status


def test_our_numbers_on_the_partial_yago_graph_are_marked_as_such(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "t1_yg_20", 0.37)
    make_run(runs, BASE_RUN, 0.5)
    t1 = _section(build_report(runs, tmp_path / "r.md"), "Table 1")
    last = next(l for l in t1.splitlines() if "ours, last epoch" in l)  # the 20% block's
    assert "| 0.5000 | 0.6000 | 0.7000 | 0.5500 | 1000 | 0.3700 ‡ | 0.4700 ‡ | 0.5700 ‡ | 0.4200 ‡ | 1000 |" in last
    assert "| 0.4393 | 0.6278 |" in t1  # the paper's YAGO numbers are not marked: they had the whole graph
    assert "‡ FB15K-YAGO15K built from 57% of YAGO15K's relation triples" in t1


def test_the_largest_loss_rise_is_per_pair_between_evaluations_on_the_same_pairs():
    """From epoch 100: 50 -> 60 on 10 pairs is x1.2; the pseudo-label step to 30 pairs (version 1) is no
    rise, whatever its sum; 200 -> 210 on 30 pairs is x1.05; epoch 90's jump is before the window."""
    metrics = [{"epoch": 90, "loss": 10.0, "train_pairs": 10}, {"epoch": 100, "loss": 50.0, "train_pairs": 10},
               {"epoch": 110, "loss": 60.0, "train_pairs": 10},
               {"epoch": 120, "loss": 200.0, "train_pairs": 30, "pair_version": 1},
               {"epoch": 130, "loss": 210.0, "train_pairs": 30, "pair_version": 1}]
    assert report.loss_rise_between_evaluations(metrics) == pytest.approx(1.2)
    assert report.loss_rise_between_evaluations(metrics[2:]) == pytest.approx(1.05)
    assert report.loss_rise_between_evaluations(metrics[:2]) is None


def test_the_stability_section_gives_each_runs_peak_last_rise_rollbacks_and_brakes(tmp_path):
    runs = tmp_path / "runs"
    folder = make_run(runs, BASE_RUN, 0.5)
    results = json.loads((folder / "results.json").read_text())
    results["spike_guard"] = {"rollbacks": [{"epoch": 567}]}
    results["table_brake"] = {"events": []}
    (folder / "results.json").write_text(json.dumps(results))
    rows = [{"epoch": e, "loss": loss, "train_pairs": 10, "loss_rise_max": r}
            for e, loss, r in ((100, 50.0, 1.01), (110, 52.5, 1.3), (120, 51.0, 1.02))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_run(runs, "t1_db_50", 0.7)  # before the guard: nothing recorded
    text = build_report(runs, tmp_path / "results.md")
    section = _section(text, "Stability")
    assert f"| `{BASE_RUN}` | 0.5100 @990 | 0.5000 | x1.050 | x1.300 | 1 | 0 |" in section
    before = "| `t1_db_50` | 0.7100 @990 | 0.7000 | not recorded | - | (before the guard) | (before the brake) |"
    assert before in section


def test_without_images_shows_the_full_model_when_the_data_has_none(tmp_path):
    """w/o v on data without images is the full model: with no folder of its own, Table 2's w/o v row and
    the Runs table show t1_db_20's numbers, marked; the run counts as covered, and it is kept out of the
    cost estimate and the stability table (no second copy of t1_db_20)."""
    runs = tmp_path / "runs"
    folder = make_run(runs, BASE_RUN, 0.5)
    results = json.loads((folder / "results.json").read_text())
    (folder / "results.json").write_text(json.dumps({**results, "modalities": ["graph", "rel_bow", "attr_text"]}))
    text = build_report(runs, tmp_path / "results.md")
    table2 = _section(text, "Table 2")
    row = next(line for line in table2.splitlines() if line.startswith("| w/o v |"))
    assert "0.5000" not in row  # the paper's row; ours follow
    assert "| `t2_db_20_wo_v` |" in row
    assert table2.count("0.5000") == 2  # last epoch of Ours and of w/o v
    assert "= `t1_db_20` (the data has no images)" in _section(text, "Runs")
    assert "2 of 50 runs" in text
    assert _section(text, "Stability").count("`t1_db_20`") == 1


def test_without_images_is_missing_while_the_full_model_has_images_or_is_unfinished(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, BASE_RUN, 0.5)  # results.json without "modalities": images are not ruled out
    text = build_report(runs, tmp_path / "results.md")
    assert "(the data has no images)" not in text and "1 of 50 runs" in text


def test_a_400_epoch_sweep_is_labelled_and_compared_with_the_base_runs_first_400_epochs(tmp_path):
    """Figure 3's points may train 400 epochs: they are no smoke runs, the section says so, and the default
    point is t1_db_20 at epoch 400 (its last) with its best test epoch up to 400, read from its metrics."""
    runs = tmp_path / "runs"
    base = make_run(runs, BASE_RUN, 0.5)
    rows = [{"epoch": e, "loss": 1.0, "test": _metrics(h1)}
            for e, h1 in ((100, 0.40), (200, 0.56), (300, 0.55), (400, 0.54), (500, 0.60), (1000, 0.5))]
    (base / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_run(runs, "f3_al_loss_0.5", 0.45, epochs=400, al_loss=0.5, check_point=10)
    text = build_report(runs, tmp_path / "results.md")
    section = _section(text, "Figure 3")
    assert "SMOKE" not in text and "Each point trained 400 epochs, not the paper's 1000" in section
    default = next(line for line in section.splitlines() if "(default)" in line and "λ2" in line)
    assert "| 0.5400 | 0.5900 | 0.5600 | 0.6100 |" in default  # epoch 400; best up to 400 is epoch 200
    assert "| 0.4500 | 0.5000 | 0.4600 | 0.5100 |" in section  # the 400-epoch point itself


def test_a_fresh_run_of_a_line_keeps_the_earlier_runs_record_and_shows_both(tmp_path):
    """A fresh run of a line whose record holds another run moves that record to superseded/ (never
    overwrites it); rewriting the same run's record supersedes nothing; the stability table lists the
    earlier run beneath the current one."""
    runs, records = tmp_path / "runs", tmp_path / "records"
    make_run(runs, "t1_db_50", 0.7)
    build_report(runs, tmp_path / "a.md", records_dir=records, save_records_to=records)
    first = (records / "t1_db_50.json").read_text()
    build_report(runs, tmp_path / "a.md", records_dir=records, save_records_to=records)  # same run again
    assert not (records / "superseded").exists()
    for f in (runs / "t1_db_50").iterdir():
        f.unlink()
    (runs / "t1_db_50").rmdir()
    make_run(runs, "t1_db_50", 0.74)  # the fresh run of the same command
    text = build_report(runs, tmp_path / "b.md", records_dir=records, save_records_to=records)
    assert (records / "superseded" / "t1_db_50.1.json").read_text() == first
    assert json.loads((records / "t1_db_50.json").read_text())["results"]["last_epoch"]["test"]["avg"]["hits@1"] == 0.74
    section = _section(text, "Stability")
    now = section.index("| `t1_db_50` | 0.7500 @990 | 0.7400 |")
    before = section.index("| `t1_db_50` (earlier run 1, superseded) | 0.7100 @990 | 0.7000 |")
    assert now < before
    assert "0.7400" in _section(text, "Table 1") and "0.7000" not in _section(text, "Table 1")


def test_table1_shows_the_last_epoch_under_weights_calibrated_without_labels(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, BASE_RUN, 0.5)
    yago = make_run(runs, "t1_yg_50", 0.57)
    results = json.loads((yago / "results.json").read_text())
    results["last_epoch"]["calibrated_unlabelled"] = {"factors": {"graph": 1.0}, "test": _metrics(0.66)}
    (yago / "results.json").write_text(json.dumps(results))
    t1 = _section(build_report(runs, tmp_path / "r.md"), "Table 1")
    rows = [l for l in t1.splitlines() if "weights calibrated without labels †" in l]
    assert len(rows) == 3  # one per seed ratio, after the plain last epoch
    assert rows[0].count("not recorded") == 1 and "| missing |" in rows[0]  # t1_db_20 predates it; no YAGO 20%
    assert "| 0.6600 ‡ | 0.7600 ‡ |" in rows[1] and "| 1000 |" in rows[1]
    assert "† the last epoch's embeddings ranked under the router's weights times one factor" in t1
    lines = t1.splitlines()
    assert "ours, last epoch |" in lines[lines.index(rows[1]) - 1]
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_BEGIN}\n{report.README_END}\n")
    build_report(runs, tmp_path / "r.md", readme=readme)
    yg50 = next(l for l in readme.read_text().splitlines() if l.startswith("| FB15K-YAGO15K 50% |"))
    assert "| 0.5700 / 0.6200 (epoch 1000) | 0.6600 / 0.7100 (epoch 1000) | 0.5800 / 0.6300 (epoch 990) |" in yg50


def test_table2_shows_the_calibrated_last_epoch_and_no_valid_rows_without_a_split(tmp_path):
    """Table 2 has the † row of each ablation after its plain last epoch ('not recorded' for a run that
    finished before the option), and no 'best valid epoch' rows when none of its runs holds out a split,
    even while a Table 1 split run does."""
    runs = tmp_path / "runs"
    make_run(runs, BASE_RUN, 0.5)
    make_run(runs, "t1_db_20_val_es", 0.46, valid=True, val_ratio=0.1, early_stop=5)
    hmoe = make_run(runs, "t2_db_20_wo_hmoe", 0.44)
    results = json.loads((hmoe / "results.json").read_text())
    results["last_epoch"]["calibrated_unlabelled"] = {"factors": {"graph": 2.0}, "test": _metrics(0.52)}
    (hmoe / "results.json").write_text(json.dumps(results))
    text = build_report(runs, tmp_path / "r.md")
    t2 = _section(text, "Table 2").splitlines()
    assert not any("best valid epoch" in l for l in t2)
    assert any("best valid epoch" in l for l in _section(text, "Table 1").splitlines())
    start = next(i for i, l in enumerate(t2) if l.startswith("| w/o HMoE |"))
    assert "ours, last epoch |" in t2[start + 1] and "| 0.4400 |" in t2[start + 1]
    assert "weights calibrated without labels †" in t2[start + 2]
    assert "| 0.5200 | 0.6200 | 0.7200 | 0.5700 | 1000 |" in t2[start + 2]
    ours = next(i for i, l in enumerate(t2) if l.startswith("| Ours |"))
    assert "| not recorded |" in t2[ours + 2]
    assert any(l.startswith("† the last epoch's embeddings") for l in t2)


REPO = Path(__file__).resolve().parent.parent
RESULT_TABLES = ("Table 1", "Table 2", "Seeds", "Selection on a validation split", "Iterative")


@pytest.mark.parametrize("page, records", [("docs/results.md", "docs/records"),
                                           ("docs/results_official.md", "docs/records/official")])
def test_the_committed_pages_tables_follow_from_the_committed_records(tmp_path, page, records):
    """Every number of the committed results pages can be rebuilt from docs/records alone, as on a clean
    checkout without run folders: a record typed in by hand, or a page not regenerated after a record
    changed, shows here. Only the state column may differ ('finished' on the page, read from a folder)."""
    rebuilt = build_report(tmp_path / "no_runs", tmp_path / "r.md", records_dir=REPO / records)
    committed = (REPO / page).read_text(encoding="utf-8")
    for title in RESULT_TABLES:
        assert _section(committed, title).replace("finished (record)", "finished") == \
            _section(rebuilt, title).replace("finished (record)", "finished"), f"{page}: {title}"
