"""The standard MMEA folder layout (MCLEA / MEAformer / official HUMEA data): its file names, the one
loader, the input features built from it, the seed split and the pair files.

    ent_ids_1, ent_ids_2    id<TAB>name, one id space for both KGs (required)
    ill_ent_ids             id1<TAB>id2, the gold aligned pairs, KG1 id first (required)
    triples_1, triples_2    head<TAB>relation<TAB>tail (required)
    training_attrs_1/2      name<TAB>attr<TAB>attr...  (optional: the attribute bag-of-words)
    feature pickles         dict entity id -> vector, one per modality of utils.MODALITY_TABLE whose
                            source is a file (optional: a modality without its file is switched off)

data_process.synthetic and data_process.build_mmkb write this layout with the names defined here.
Axis letters: N entities, P aligned pairs, T triples, F feature size.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_process.safe_load import ForbiddenGlobal, load_pickle
from utils import MIN_FEATURE_COVERAGE, MODALITIES, MODALITY_TABLE, DataError, atomic_write, kv

ENT_IDS = ("ent_ids_1", "ent_ids_2")
TRIPLES = ("triples_1", "triples_2")
LINKS = "ill_ent_ids"
TRAINING_ATTRS = ("training_attrs_1", "training_attrs_2")
BOW_TOP = 1000  # bag-of-words vocabulary size (relations and attribute names), as in the paper
GRAPH_SOURCE = "graph"  # the source of the graph modality: the triples, encoded by the model's GAT


def feature_file(modality: str, folder: str | Path) -> str:
    """File name of a modality's feature pickle in ``folder`` (MODALITY_TABLE's source)."""
    source = next(m.source for m in MODALITY_TABLE if m.name == modality)
    if not source.endswith(".pkl"):
        raise ValueError(f"{modality}: its input is built by the loader ({source}), not read from a file")
    return source.format(folder=Path(folder).name)


@dataclass
class MMKG:
    """Two KGs in one id space, their gold links and per-entity modality inputs."""

    root: Path
    names: list[str]  # (N,) entity name by id
    kg: np.ndarray  # (N,) 0 = KG1 (left), 1 = KG2 (right)
    links: np.ndarray  # (P, 2) gold aligned pairs (KG1 id, KG2 id)
    triples: np.ndarray  # (T, 3) h, r, t over both KGs
    features: dict[str, np.ndarray]  # modality -> (N, F) float32, for the modalities with inputs (rows as
    #                                  read: bag-of-words counts / indicators, text and image vectors raw)
    coverage: dict[str, float]  # modality -> fraction of entities with a real vector
    present: dict[str, np.ndarray]  # modality -> (N,) bool: the entity has a real input (not a fill)
    notes: list[str]  # what the loader decided (disabled modalities, fills), for the log

    @property
    def num_entities(self) -> int:
        return len(self.names)


# ---------------------------------------------------------------------------------------------
# Readers of the text files.
# ---------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: byte {e.start} is not UTF-8 text ({e.reason}); expected a "
                        "UTF-8 text file") from None


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: required file is missing")
    text = _read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{path}: file is empty; expected at least one line")
    return lines


def _int(path: Path, lineno: int, token: str, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise DataError(f"{path} line {lineno}: expected an integer {what}, got '{token}'") from None


def _read_int_table(path: Path, columns: int, form: str) -> np.ndarray:
    """A tab-separated table of integers; fast path first, exact diagnosis on failure."""
    lines = _read_lines(path)
    rows = [line.split("\t") for line in lines]
    if all(len(r) == columns for r in rows):
        try:
            return np.array(rows, dtype=np.int64).reshape(-1, columns)
        except (ValueError, OverflowError):
            pass
    values = []
    for lineno, row in enumerate(rows, 1):
        if len(row) != columns:
            raise DataError(f"{path} line {lineno}: expected '{form}' ({columns} tab-separated fields), "
                            f"got {len(row)} field(s): {lines[lineno - 1][:80]!r}")
        ints = [_int(path, lineno, tok.strip(), "id") for tok in row]
        for v in ints:
            if not -(2**63) <= v < 2**63:
                raise DataError(f"{path} line {lineno}: id {v} is out of range (too large for a 64-bit integer)")
        values.append(ints)
    return np.array(values, dtype=np.int64).reshape(-1, columns)


def _read_ent_ids(path: Path) -> tuple[list[int], list[str]]:
    ids, names = [], []
    for lineno, line in enumerate(_read_lines(path), 1):
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1]:
            raise DataError(f"{path} line {lineno}: expected 'id<TAB>name' (2 tab-separated fields, a name "
                            f"without tabs), got {len(parts)} field(s): {line[:80]!r}")
        ids.append(_int(path, lineno, parts[0], "entity id"))
        names.append(parts[1])
    return ids, names


def _check_ids(path: Path, array: np.ndarray, allowed: np.ndarray, cols, kg_name: str, num: int):
    """Every id in the given columns must be in range and an entity of the allowed KG."""
    for c in cols:
        col = array[:, c]
        bad = np.nonzero((col < 0) | (col >= num))[0]
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{path} line {i + 1}: id {col[i]} is out of range (entity ids are 0..{num - 1})")
        bad = np.nonzero(~allowed[col])[0]
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{path} line {i + 1}: id {col[i]} is not an entity of {kg_name}")


def _read_entities(root: Path) -> tuple[list[str], np.ndarray]:
    """ent_ids_1/2 -> (N,) names by id and (N,) KG side; the ids must be 0..N-1, each once."""
    ids1, names1 = _read_ent_ids(root / ENT_IDS[0])
    ids2, names2 = _read_ent_ids(root / ENT_IDS[1])
    n = len(ids1) + len(ids2)
    names: list[str | None] = [None] * n
    kg = np.full(n, -1, dtype=np.int8)
    seen: dict[int, str] = {}
    for fname, ids, nms, side in ((ENT_IDS[0], ids1, names1, 0), (ENT_IDS[1], ids2, names2, 1)):
        for lineno, (i, name) in enumerate(zip(ids, nms), 1):
            where = f"{root / fname} line {lineno}"
            if i in seen:
                raise DataError(f"{where}: duplicated entity id {i} (first defined at {seen[i]})")
            if not 0 <= i < n:
                raise DataError(f"{where}: id {i} is out of range; the ids of ent_ids_1 and ent_ids_2 together "
                                f"must be 0..{n - 1}")
            seen[i] = where
            names[i], kg[i] = name, side
    return names, kg


def _refuse_repeated_links(path: Path, links: np.ndarray) -> None:
    """A pair listed twice would be split into both the training and the test pairs. (An entity in two
    different pairs is kept: the built FB15K-DB15K aligns 4 DB15K entities with two FB15K ones each.)"""
    first: dict[tuple[int, int], int] = {}
    for lineno, pair in enumerate(map(tuple, links.tolist()), 1):
        if pair in first:
            raise DataError(f"{path} line {lineno}: the pair {pair[0]}<TAB>{pair[1]} repeats line {first[pair]}; "
                            "expected each aligned pair once")
        first[pair] = lineno


def _read_links_and_triples(root: Path, kg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(kg)
    links = _read_int_table(root / LINKS, 2, "id1<TAB>id2")
    _check_ids(root / LINKS, links, kg == 0, [0], "KG1 (ent_ids_1)", n)
    _check_ids(root / LINKS, links, kg == 1, [1], "KG2 (ent_ids_2)", n)
    _refuse_repeated_links(root / LINKS, links)
    triples = []
    for side, fname in enumerate(TRIPLES):
        t = _read_int_table(root / fname, 3, "head<TAB>relation<TAB>tail")
        _check_ids(root / fname, t, kg == side, [0, 2], f"KG{side + 1} (ent_ids_{side + 1})", n)
        negative = np.nonzero(t[:, 1] < 0)[0]
        if negative.size:
            i = int(negative[0])
            raise DataError(f"{root / fname} line {i + 1}: relation id {t[i, 1]} is negative; expected an id >= 0")
        triples.append(t)
    return links, np.concatenate(triples)


def _read_attrs(root: Path, names: list[str], kg: np.ndarray):
    """training_attrs_1/2 -> list of (entity id, [attribute names]); None if both files absent."""
    files = [root / f for f in TRAINING_ATTRS]
    if not any(p.is_file() for p in files):
        return None
    index = [{} for _ in range(2)]
    for i, name in enumerate(names):
        index[kg[i]][name] = i
    out = []
    for side, path in enumerate(files):
        if not path.is_file():
            continue
        for lineno, line in enumerate(_read_text(path).splitlines(), 1):
            parts = line.split("\t")
            if len(parts) < 1 or not parts[0]:
                raise DataError(f"{path} line {lineno}: expected 'entity name<TAB>attr<TAB>attr...', got {line[:80]!r}")
            ent = index[side].get(parts[0])
            if ent is None:
                raise DataError(f"{path} line {lineno}: entity '{parts[0][:80]}' is not in ent_ids_{side + 1}")
            out.append((ent, [a for a in parts[1:] if a]))
    return out


# ---------------------------------------------------------------------------------------------
# Feature pickles.
# ---------------------------------------------------------------------------------------------


def _find_feature_file(root: Path, source: str) -> Path | None:
    """The feature pickle of a source name; for a "{folder}" pattern, <folder name>_... first, else the
    first file matching the pattern (an official folder renamed after unpacking still loads)."""
    preferred = root / source.format(folder=root.name)
    if preferred.is_file() or "{folder}" not in source:
        return preferred if preferred.is_file() else None
    found = sorted(root.glob(source.format(folder="*")))
    return found[0] if found else None


def _entity_id(path: Path, key, n: int) -> int:
    """A feature dict's key as an entity id: an int (or numpy int) or a string of one, in 0..n-1."""
    i = None
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        i = int(key)
    elif isinstance(key, str) and key.strip().lstrip("+-").isdecimal():
        with contextlib.suppress(ValueError):  # e.g. '+-5'
            i = int(key)
    if i is None:
        raise DataError(f"{path}: key {key!r:.80} is not an integer entity id; expected a dict entity id (an "
                        f"int in 0..{n - 1}) -> vector")
    if not 0 <= i < n:
        raise DataError(f"{path}: key {i} is out of range (entity ids are 0..{n - 1})")
    return i


def _feature_vector(path: Path, key, vec) -> np.ndarray:
    """A feature dict's value as a 1-d numeric array (not yet cast), or a DataError that names the key."""
    try:
        a = np.asarray(vec)
    except (TypeError, ValueError):  # e.g. a ragged list of lists
        a = None
    if a is not None and a.ndim == 1 and a.size and a.dtype.kind in "biuf":
        return a
    if a is not None and a.ndim == 1 and not a.size:
        got = "an empty vector"
    elif a is not None and a.ndim == 0:
        got = f"a single {type(vec).__name__} ({vec!r:.40})"
    elif a is not None and a.dtype.kind in "biuf":
        got = f"an array of shape {a.shape}"
    else:
        got = f"{type(vec).__name__} {str(vec)[:40]!r}"
    raise DataError(f"{path}: the value of key {key!r:.40} is not a numeric vector: got {got}; expected a 1-d "
                    "vector of numbers (a numpy array or a list), one size for every key")


def _read_feature_pickle(path: Path, n: int, rng: np.random.Generator):
    """dict id -> vector  ->  (N, F) float32 matrix with the missing rows filled, and the (N,) mask of
    the entities that have a vector. The file is read with data_process.safe_load: it may hold only
    dicts, lists, tuples, numbers, strings and numpy arrays, and runs no code."""
    try:
        obj = load_pickle(path)
    except ForbiddenGlobal as e:
        raise DataError(f"{path}: refused: the pickle would call {e.global_name}, which a feature file does not "
                        "need; nothing in it was run (a feature pickle may hold dicts, lists, tuples, numbers, "
                        "strings and numpy arrays; docs/reliability.md says how to convert another pickle "
                        "you trust)") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a data error here
        raise DataError(f"{path}: cannot unpickle ({type(e).__name__}: {e}); "
                        "expected a dict entity id -> vector") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict entity id -> vector, got {type(obj).__name__}")
    if not obj:
        return None, None
    dim = first = None
    mat = None
    present = np.zeros(n, dtype=bool)
    for key, vec in obj.items():
        i = _entity_id(path, key, n)
        with np.errstate(over="ignore", invalid="ignore"):  # overflows are refused just below
            v = _feature_vector(path, key, vec).astype(np.float32, copy=False)
            norm = np.linalg.norm(v)
        if not np.isfinite(v).all():
            raise DataError(f"{path}: the vector of key {key!r:.40} (entity {i}) holds NaN/inf values (or values "
                            "beyond float32's range); expected finite numbers")
        if not np.isfinite(norm):  # the vector is L2-normalised later (--feature_norm)
            raise DataError(f"{path}: the vector of key {key!r:.40} (entity {i}) holds values too large to "
                            "normalise (its L2 norm overflows float32); expected numbers of a moderate size")
        if present[i]:
            raise DataError(f"{path}: entity {i} appears under two keys (e.g. {i} and '{i}')")
        if dim is None:
            dim, first = v.size, key
            mat = np.empty((n, dim), dtype=np.float32)
        elif v.size != dim:
            raise DataError(f"{path}: the vector of key {key!r:.40} (entity {i}) has size {v.size}, expected {dim} "
                            f"(the size of the first vector, key {first!r:.40})")
        mat[i] = v
        present[i] = True
    missing = ~present
    if missing.any():
        with np.errstate(over="ignore", invalid="ignore"):  # refused just below
            mean, std = mat[present].mean(0), mat[present].std(0)
            mat[missing] = rng.normal(mean, std, size=(int(missing.sum()), dim)).astype(np.float32)
        if not np.isfinite(mat[missing]).all():
            raise DataError(f"{path}: the vectors' values are too large to draw the missing rows from (their "
                            "mean or standard deviation overflows float32); expected numbers of a moderate size")
    return mat, present


def _refuse_sparse(name: str, source: str, has: np.ndarray, min_coverage: float) -> None:
    """A modality whose input covers almost no entity (below ``min_coverage``) is refused."""
    if has.mean() < min_coverage:
        raise DataError(f"{source}: covers {int(has.sum())} of {has.size} entities ({has.mean():.2%}), below "
                        f"--min_feature_coverage {min_coverage:g}: the {name} modality would be filler for the rest. "
                        "Expected a file with inputs for most entities; remove it to switch the modality off, "
                        "or pass --min_feature_coverage 0 to train on it anyway")


def _file_features(name: str, source: str, root: Path, n: int, rng: np.random.Generator, notes: list[str],
                   min_coverage: float = MIN_FEATURE_COVERAGE):
    """A modality read from its feature pickle: (matrix, mask), or (None, None) with a note why not."""
    path = _find_feature_file(root, source)
    if path is None:
        notes.append(f"{name}: no {source.format(folder='*')} in {root} -> modality disabled")
        return None, None
    mat, has = _read_feature_pickle(path, n, rng)
    if mat is not None:
        _refuse_sparse(name, str(path), has, min_coverage)
    if mat is None:
        notes.append(f"{name}: {path.name} holds no vectors -> modality disabled")
    elif not has.all():
        notes.append(f"{name}: {path.name} covers {has.mean():.1%} of entities; the rest drawn from the "
                     "per-dimension mean/std of the present vectors (seeded, as the official code did; "
                     "used only with --missing fill)")
    return mat, has


# ---------------------------------------------------------------------------------------------
# Features built by the loader (bag-of-words).
# ---------------------------------------------------------------------------------------------


def relation_bow(triples: np.ndarray, n: int, top: int = BOW_TOP) -> np.ndarray:
    """(N, top) counts of the `top` most frequent relations over the triples where the entity is
    head or tail (rows of isolated entities are zero; scaled later by ``normalise_features``)."""
    rels = np.concatenate([triples[:, 1], triples[:, 1]])
    ents = np.concatenate([triples[:, 0], triples[:, 2]])
    rels = np.unique(rels, return_inverse=True)[1].reshape(-1)  # ranks of the ids: sparse or huge ids are fine
    counts = np.bincount(rels)
    keep = np.argsort(-counts, kind="stable")[:min(top, int((counts > 0).sum()))]
    col = np.full(counts.size, -1)
    col[keep] = np.arange(keep.size)
    sel = col[rels] >= 0
    mat = np.zeros((n, keep.size), dtype=np.float32)
    np.add.at(mat, (ents[sel], col[rels[sel]]), 1.0)
    return mat


def attribute_bow(attrs, n: int, top: int = BOW_TOP) -> np.ndarray:
    """(N, top) binary indicators of the `top` most frequent attribute names."""
    freq: dict[str, int] = {}
    for _, names in attrs:
        for a in set(names):
            freq[a] = freq.get(a, 0) + 1
    vocab = sorted(freq, key=lambda a: (-freq[a], a))[:top]
    col = {a: j for j, a in enumerate(vocab)}
    mat = np.zeros((n, max(len(vocab), 1)), dtype=np.float32)
    for ent, names in attrs:
        for a in names:
            j = col.get(a)
            if j is not None:
                mat[ent, j] = 1.0
    return mat


def _relation_bow_of(root: Path, names: list[str], kg: np.ndarray, triples: np.ndarray, notes: list[str]):
    return relation_bow(triples, len(names))


def _attribute_bow_of(root: Path, names: list[str], kg: np.ndarray, triples: np.ndarray, notes: list[str]):
    attrs = _read_attrs(root, names, kg)
    if attrs is None:
        notes.append("attr_bow: no training_attrs_1/2 files -> modality disabled")
        return None
    return attribute_bow(attrs, len(names))


# MODALITY_TABLE sources that the loader builds: (root, names, kg, triples, notes) -> (N, F) or None.
BUILDERS = {"relation_bow": _relation_bow_of, "attribute_bow": _attribute_bow_of}
BUILT_FROM = {"relation_bow": TRIPLES, "attribute_bow": TRAINING_ATTRS}  # the files named when one is refused
BOW_MODALITIES = tuple(m.name for m in MODALITY_TABLE if m.source in BUILDERS)


def normalise_features(features: dict[str, np.ndarray], scheme: str) -> dict[str, np.ndarray]:
    """Row scaling of the input features (--feature_norm): 'l2' L2-normalises every row; 'official'
    the text and image rows only (bag-of-words stay raw counts / indicators, as the official loader);
    'bow_l2' the bag-of-words rows only. Zero rows stay zero. Returns new arrays."""
    scaled = {"l2": set(features), "official": set(features) - set(BOW_MODALITIES),
              "bow_l2": set(BOW_MODALITIES)}[scheme]
    return {m: _l2_rows(x) if m in scaled else x.copy() for m, x in features.items()}


def _l2_rows(mat: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(mat, axis=1, keepdims=True)
    return mat / np.maximum(norm, 1e-12)


# ---------------------------------------------------------------------------------------------
# The loader.
# ---------------------------------------------------------------------------------------------


def load_dataset(file_dir: str | Path, modalities_off=frozenset(), seed: int = 0,
                 log: logging.Logger | None = None, min_coverage: float = MIN_FEATURE_COVERAGE) -> MMKG:
    """Load the standard layout in ``file_dir`` (see the module docstring); the modalities of
    MODALITY_TABLE are read or built in its order, except those in ``modalities_off``. Missing rows
    of a feature pickle are filled from ``seed``. A modality whose input covers less than
    ``min_coverage`` of the entities is refused (DataError)."""
    root = Path(file_dir)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist (expected ent_ids_1, ent_ids_2, ill_ent_ids, "
                        "triples_1, triples_2 inside)")
    names, kg = _read_entities(root)
    links, triples = _read_links_and_triples(root, kg)
    n = len(names)
    notes: list[str] = []
    features: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)  # drawn from by the feature files in table order
    for mod in MODALITY_TABLE:
        if mod.name in modalities_off or mod.source == GRAPH_SOURCE:
            continue
        if mod.source in BUILDERS:
            mat = BUILDERS[mod.source](root, names, kg, triples, notes)
            has = None if mat is None else mat.any(1)
            if mat is not None:
                _refuse_sparse(mod.name, ", ".join(str(root / f) for f in BUILT_FROM[mod.source]), has, min_coverage)
        else:
            mat, has = _file_features(mod.name, mod.source, root, n, rng, notes, min_coverage)
        if mat is not None:
            features[mod.name], present[mod.name] = mat, has
    coverage = {m: float(p.mean()) for m, p in present.items()}
    data = MMKG(root, names, kg.astype(np.int64), links, triples, features, coverage, present, notes)
    if log:
        log.info(kv(dataset=str(root), entities=n, kg1=int((kg == 0).sum()), kg2=int((kg == 1).sum()),
                    links=len(links), triples=len(triples)))
        for note in notes:
            log.info(note)
        for m in MODALITIES:
            if m in features:
                log.info(kv(modality=m, dim=features[m].shape[1], coverage=coverage[m]))
    return data


# ---------------------------------------------------------------------------------------------
# The seed split and pair files.
# ---------------------------------------------------------------------------------------------


@dataclass
class Split:
    train: np.ndarray  # (P_train, 2)
    valid: np.ndarray  # (P_val, 2), empty when val_ratio = 0
    test: np.ndarray  # (P_test, 2)


def split_links(links: np.ndarray, rate: float, seed: int, val_ratio: float = 0.0) -> Split:
    """The paper's split: shuffle the aligned pairs with the seed, the first ``rate`` fraction
    trains, the rest tests. With val_ratio > 0 the last val_ratio of the training part is held
    out for model selection (the test pairs do not change)."""
    perm = np.random.RandomState(seed).permutation(len(links))
    shuffled = links[perm]
    n_train = int(len(links) * rate)
    train, test = shuffled[:n_train], shuffled[n_train:]
    n_val = int(round(len(train) * val_ratio))
    return Split(train[:len(train) - n_val], train[len(train) - n_val:], test)


def read_pair_file(path: str | Path, data: MMKG) -> np.ndarray:
    """A train_ill_path file: lines 'id1<TAB>id2' with id1 in KG1 and id2 in KG2."""
    path = Path(path)
    pairs = _read_int_table(path, 2, "id1<TAB>id2")
    _check_ids(path, pairs, data.kg == 0, [0], "KG1 (ent_ids_1): each pair must be (KG1 id, KG2 id)",
               data.num_entities)
    _check_ids(path, pairs, data.kg == 1, [1], "KG2 (ent_ids_2): each pair must be (KG1 id, KG2 id)",
               data.num_entities)
    return pairs


def write_pair_file(path: Path, pairs: np.ndarray) -> None:
    """Pairs in the layout of ill_ent_ids and train_ill_path files: 'id1<TAB>id2' lines."""
    atomic_write(path, lambda f: f.writelines(f"{a}\t{b}\n" for a, b in pairs))
