"""docs/analysis/departures.py: each variant changes exactly one departure of its reference preset,
back to (or over to) the other preset's values, and the table reads the run folders' metrics."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

import train
from utils import PRESETS, Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "analysis"))
import departures  # noqa: E402


def _cfg(flags: list[str]) -> Config:
    return train.parse_args([*departures.BASE, *flags, "--epochs", "5"]).cfg


def _diff(a: Config, b: Config) -> dict:
    return {f.name: getattr(b, f.name) for f in dataclasses.fields(Config) if getattr(a, f.name) != getattr(b, f.name)}


@pytest.mark.parametrize("name", [n for n, v in departures.VARIANTS.items() if v[0] is not None])
def test_a_variant_takes_the_other_presets_values_for_the_fields_it_changes(name):
    ref, _, flags = departures.VARIANTS[name]
    changed = _diff(_cfg(departures.VARIANTS[ref][2]), _cfg(flags))
    other = Config.from_preset("paper" if ref == "official" else "official")
    assert changed and set(changed) <= set(PRESETS["official"])  # only fields the presets disagree on
    assert all(value == getattr(other, field) for field, value in changed.items()), changed
    # a variant that shares no field with another one: each departure is measured on its own
    for other_name, (other_ref, _, other_flags) in departures.VARIANTS.items():
        if other_ref == ref and other_name != name:
            assert not set(changed) & set(_diff(_cfg(departures.VARIANTS[ref][2]), _cfg(other_flags)))


def test_every_official_choice_is_switched_back_by_one_variant():
    switched = set()
    for ref, _, flags in departures.VARIANTS.values():
        if ref == "official":
            switched |= set(_diff(_cfg(["--preset", "official"]), _cfg(flags)))
    assert switched == set(PRESETS["official"])


def _fake_run(folder: Path, h1: dict[int, float], finished: bool) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps({"epoch": e, "test": {"avg": {"hits@1": v, "mrr": v + 0.1}},
                         "health": {"weight": {"graph": 0.5, "rel_bow": v}}}) for e, v in h1.items()]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "config.json").write_text(json.dumps({"epochs": max(h1)}))
    (folder / ("results.json" if finished else "checkpoint.pt")).write_text("{}")


def test_table_and_commands_from_the_run_folders(tmp_path):
    out = tmp_path / "dep"
    _fake_run(out / "official", {10: 0.2, 20: 0.3, 50: 0.45, 100: 0.5}, finished=True)
    _fake_run(out / "o_ffn", {10: 0.25, 20: 0.35, 50: 0.40}, finished=False)
    rows = departures.table({n: out / n for n in departures.VARIANTS})
    assert "| `official` | official preset | 0.200 / 0.300 | 0.300 / 0.400 | 0.450 / 0.550 | 0.500 / 0.600 | - |" \
        in rows[3]
    assert rows[4].startswith("| `o_ffn` |") and "| -0.050 at 50 |" in rows[4]  # last epoch both have
    assert "| graph 0.50 rel_bow 0.40 (epoch 50) |" in rows[4]
    assert len(rows) == 5  # the variants without a folder are left out
    assert departures.command("official", 300, out)[2:] == ["--resume", str(out / "official"), "--extend_to", "300"]
    resume = departures.command("o_ffn", 300, out)
    assert resume[-2:] == ["--resume", str(out / "o_ffn")] and resume[resume.index("--epochs") + 1] == "50"
    fresh = departures.command("o_mask", 100, out)
    assert "--resume" not in fresh and fresh[fresh.index("--missing") + 1] == "mask"


def test_the_change_column_shows_epoch_100_beside_a_longer_comparison_and_no_negative_zero(tmp_path):
    out = tmp_path / "dep"
    _fake_run(out / "official", {10: 0.2, 20: 0.3, 50: 0.45, 100: 0.5, 300: 0.514}, finished=True)
    _fake_run(out / "o_entity", {10: 0.2, 20: 0.3, 50: 0.40, 100: 0.467, 300: 0.559}, finished=True)
    _fake_run(out / "o_sum", {10: 0.2, 20: 0.3, 50: 0.45, 100: 0.5, 300: 0.5139}, finished=True)
    rows = {r.split(" | ")[0]: r for r in departures.table({n: out / n for n in departures.VARIANTS})}
    assert "| +0.045 at 300 (-0.033 at 100) |" in rows["| `o_entity`"]
    assert "| 0.000 at 300 (0.000 at 100) |" in rows["| `o_sum`"]
    _fake_run(out / "p_raw_bow", {10: 0.2}, finished=False)  # a flag whose value is the word "official"
    rows = {r.split(" | ")[0]: r for r in departures.table({n: out / n for n in departures.VARIANTS})}
    assert rows["| `p_raw_bow`"].endswith("| `--feature_norm official` |")
    assert rows["| `o_sum`"].endswith("| `--loss_weighting sum` |")  # "--preset official" is the reference


def test_every_official_choice_is_switched_on_by_one_paper_variant():
    switched = set()
    for ref, _, flags in departures.VARIANTS.values():
        if ref == "paper":
            switched |= set(_diff(_cfg([]), _cfg(flags)))
    assert switched == set(PRESETS["official"])
