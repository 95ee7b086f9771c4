"""Synthetic multi-modal KG pair in the standard MMEA folder layout.

Used as the embedded default dataset (``python train.py`` with no dataset trains on
:func:`default_dataset`) and, through :func:`fb15k_db15k_shape`, for benchmarks at
FB15K-DB15K scale and beyond. Everything is vectorised numpy; the same arguments give
byte-identical files.

Generative story
----------------
* There are ``n1 + n2 - n_links`` latent "true" entities, each with a type (its community)
  and a latent vector z of size ``Z_DIM`` (type centre + individual part). The first
  ``n_links`` true entities appear in both KGs (the gold alignment); the others belong to
  one KG only.
* A base relation graph over the true entities: heads and tails are drawn in proportion to
  a heavy-tailed (Pareto) activity weight, a tail is drawn from the head's own type with
  probability ``P_INTRA_TYPE`` (community structure), and the relation is one of the head's
  or the tail's few habitual relations (its "roles", drawn from its type's pool) or else one
  of a small preferred set of the (head type, tail type) pair. Each KG keeps a random subset
  of the base edges whose two ends it holds and adds its own noise edges (``NOISE_EDGE_FRAC``).
  KG2 renames relations through a noisy many-to-one map from KG1's vocabulary.
* Attributes: a shared universe of attribute meanings; each KG names a part of it (the
  two vocabularies overlap by ``ATTR_OVERLAP``, like Freebase vs DBpedia names). Each true
  entity draws a few attributes from its type; the numeric values are a projection of z,
  so linked entities have correlated values in the two KGs.
* Image-like features: ReLU of a fixed random projection of z plus a per-KG offset and
  heavy per-KG noise (two different photos), present for a fraction ``image_coverage`` of
  each KG's entities; ``IMG_WRONG_FRAC`` of images show another entity (noisy crawls).
* Relation-text features: per entity, the mean of "relation-name embeddings" over its
  triples (head or tail), like the official preprocessing's averaged RoBERTa vectors of the
  relation names; KG2 relation names embed near the KG1 names that map to them.
* Attribute-text features: the embedding of the sentence "a1 is v1, a2 is v2, ...": mean
  over the entity's attributes of (attribute-name embedding + value * value direction).
  Both text features share a common offset (the anisotropy of transformer sentence
  vectors) and get a little per-entity noise.

Calibration (:func:`raw_feature_hits1`, left-to-right Hits@1 of each raw feature over all gold
pairs): the embedded default, seed 0, gives image 0.268, relation text 0.098, attribute
text 0.159 (chance 0.0008; seeds 1 and 2 agree within 0.05); the three concatenated, centred,
give about 0.43, so combining modalities and the graph pays, while no modality is close to solved.
At FB15K-DB15K scale 1.0 (12,842 candidates): 0.104 / 0.102 / 0.074.

Departures from the real FB15K-DB15K, each on purpose:
* links are one-to-one (the real ``ill_ent_ids`` has 12,846 pairs over 12,842 DB15K
  entities, so a few entities appear twice); :func:`fb15k_db15k_shape` therefore uses
  ``min(12846 * scale, n2)`` links;
* every entity has at least one triple and at least one attribute, so the relation-text and
  attribute-text dictionaries are complete; only images are missing for some entities.

Layout written (``NAME`` is the output folder's basename): ``ent_ids_1``, ``ent_ids_2``
(``id<TAB>name``; one id space, KG1 ids 0..n1-1 then KG2 ids n1..n1+n2-1), ``triples_1``,
``triples_2`` (``h<TAB>r<TAB>t``; KG1 relations 0..R1-1, KG2 relations R1..R1+R2-1),
``ill_ent_ids`` (``id1<TAB>id2``, shuffled), ``training_attrs_1``, ``training_attrs_2``
(``name<TAB>attr1<TAB>attr2...``), ``attr_triples_1``, ``attr_triples_2``
(``id<TAB>attribute<TAB>value``), ``rel_names`` (``rel_id<TAB>name``), and pickles (protocol
4) of dicts int entity id -> float32 1-d vector: ``NAME_id_img_feature_dict.pkl``,
``triples_feature_dict.pkl``, ``attribute_feature_dict.pkl``.

Axis letters in shape comments: N entities (of one KG or all true ones), E edges/triples,
Z latent size, D feature size, R relations, U attribute meanings, K types.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from data_process.dataset import ENT_IDS, LINKS, TRAINING_ATTRS, TRIPLES, feature_file

# ---- generative constants (calibrated with raw_feature_hits1 on the embedded default) ----
Z_DIM = 32  # size of the latent entity vector
INDIV_STD = 1.0  # std of an entity's own latent part around its type centre (centres have std 1)
PARETO_ALPHA = 1.8  # tail index of the activity weights: heavy-tailed degrees
MAX_WEIGHT = 200.0  # cap on one entity's activity weight (min weight is 1) ...
MAX_WEIGHT_FRAC = 0.02  # ... and on weight / entities, so no hub links to most of a small KG
P_INTRA_TYPE = 0.5  # probability that an edge's tail is drawn from the head's own type
REL_SLOT_P = (0.45, 0.25, 0.15, 0.10, 0.05)  # preferred relations of a (head type, tail type) pair
REL_RANDOM_FRAC = 0.05  # edges whose relation ignores the types (drawn by global popularity)
REL_ROLE_HEAD = 0.6  # edges whose relation is one of the head's own habitual relations (its "roles")
REL_ROLE_TAIL = 0.3  # edges whose relation is one of the tail's roles; the rest follow the type pair
REL_ROLES = 3  # habitual relations per entity
REL_ROLE_POOL = 40  # relations a type's entities pick their roles from
KEEP_MAX = 0.8  # the denser KG keeps this fraction of the base edges it holds
BASE_CAP = 4.0  # the base graph has at most this many times the kept edges of both KGs
NOISE_EDGE_FRAC = 0.2  # fraction of each KG's triples that are KG-specific noise edges
REL2_NOISE = 0.05  # KG2 triples whose relation is renamed at random instead of via the map
ATTR_OVERLAP = 0.6  # fraction of the smaller attribute vocabulary that the other KG also names
ATTR_POOL = 12  # attributes a type's entities draw theirs from (uniformly)
ATTR_TABLE_POP = 0.0  # weight of global popularity (vs uniform) when filling the type pools
ATTR_RANDOM_FRAC = 0.15  # attribute draws that ignore the type
ATTR_MEAN = 5.0  # mean number of attributes of a true entity
ATTR_KEEP = 0.85  # probability that a KG records a true attribute it has a name for
ATTR_EXTRA = 0.2  # mean number of extra KG-specific attributes per entity
VALUE_NOISE = 0.3  # noise of an attribute value around its latent projection (shared by KGs)
VALUE_KG_NOISE = 0.15  # per-KG noise of a value (rounding, different sources)
IMG_NOISE = 1.25  # per-KG photo noise at IMG_REF_DIM, relative to the unit-variance projection of z
IMG_REF_DIM = 256  # image size at which IMG_NOISE applies; see _image_noise_std
IMG_OFFSET = 0.3  # std of the per-KG offset of image features (different photo sources)
IMG_WRONG_FRAC = 0.05  # images that show a different entity
TEXT_COMMON = 0.3  # norm of the common offset of text vectors (anisotropy), specific parts ~1
REL_NAME_NOISE = 0.3  # how far a KG2 relation name embeds from the KG1 names mapped to it
REL_TEXT_NOISE = 0.1  # per-entity noise of the relation-text vector
ATTR_NAME_NOISE = 0.3  # how far the two KGs' names of one attribute meaning embed
VALUE_TEXT_WEIGHT = 1.0  # weight of the value term in an attribute sentence embedding
ATTR_TEXT_NOISE = 0.1  # per-entity noise of the attribute-text vector
IMG_CHUNK = 4096  # rows of image features generated at once (bounds memory; fixed for determinism)

DEFAULT_KWARGS = dict(
    n1=3000, n2=2800, n_links=2500, n_relations1=100, n_relations2=40, n_attributes1=40,
    n_attributes2=60, avg_degree1=20.0, avg_degree2=8.0, img_dim=256, text_dim=128,
    image_coverage=0.85, seed=0,
)
DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "data" / "embedded_default"
FB15K_DB15K = dict(
    n1=14951, n2=12842, n_links=12846, n_relations1=1345, n_relations2=279, n_attributes1=116,
    n_attributes2=225, avg_degree1=80.0, avg_degree2=14.0, img_dim=4096, text_dim=768,
    image_coverage=0.9,
)
# The layout's file names come from data_process.dataset, which reads them.
TEXT_FILES = (*ENT_IDS, *TRIPLES, LINKS, *TRAINING_ATTRS, "attr_triples_1", "attr_triples_2", "rel_names")
MODALITY_FILES = {"relation_text": feature_file("rel_text", ""), "attribute_text": feature_file("attr_text", "")}
PICKLE_FILES = tuple(MODALITY_FILES.values())


def image_pickle_name(folder: str | os.PathLike) -> str:
    """File name of the image-feature pickle of a dataset folder: ``<basename>_id_img_feature_dict.pkl``."""
    return feature_file("image", folder)


def expected_files(folder: str | os.PathLike) -> list[str]:
    """Every file name a complete dataset folder holds."""
    return [*TEXT_FILES, *PICKLE_FILES, image_pickle_name(folder)]


# ------------------------------------------------------------------ sampling helpers
class _WeightedSampler:
    """Draws items in proportion to their weights, globally or within one group."""

    def __init__(self, weights: np.ndarray, groups: np.ndarray, n_groups: int):
        self.order = np.argsort(groups, kind="stable")  # items sorted by group
        self.cum = np.cumsum(weights[self.order])  # (N,)
        bounds = np.searchsorted(groups[self.order], np.arange(n_groups + 1))  # (K+1,)
        self.cum_before = np.concatenate([[0.0], self.cum])[bounds]  # cumulative weight before group k

    def _pick(self, u: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.cum, u, side="right")
        return self.order[np.minimum(idx, len(self.order) - 1)]

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return self._pick(rng.random(size) * self.cum[-1])

    def sample_in_group(self, rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
        lo, hi = self.cum_before[groups], self.cum_before[groups + 1]
        return self._pick(lo + rng.random(len(groups)) * (hi - lo))


def _categorical(rng: np.random.Generator, probs: Iterable[float], size: int) -> np.ndarray:
    cum = np.cumsum(np.asarray(probs, dtype=np.float64))
    return np.minimum(np.searchsorted(cum / cum[-1], rng.random(size), side="right"), len(cum) - 1)


def _zipf_popularity(rng: np.random.Generator, n: int, exponent: float = 1.0) -> np.ndarray:
    """Popularity of n items: Zipf over a random ranking, so id 0 is not the most popular."""
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return (p / p.sum())[rng.permutation(n)]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------ the generator
@dataclass
class _KG:
    """One generated KG, ids local (0..n-1) until written."""

    tag: str  # "kg1" / "kg2", the name prefix
    true_of: np.ndarray  # (N,) true entity of each local id
    id_offset: int  # global id of local id 0
    rel_offset: int  # global id of local relation 0
    triples: np.ndarray | None = None  # (E, 3) local h, local r, local t
    attr_ent: np.ndarray | None = None  # (A,) local entity of each attribute triple
    attr_name: np.ndarray | None = None  # (A,) local attribute-name id
    attr_latent: np.ndarray | None = None  # (A,) latent value (standardised)


def _latent_entities(rng, n_true: int, n_types: int):
    type_p = 1.0 / np.arange(1, n_types + 1) ** 0.7
    types = _categorical(rng, type_p, n_true)  # (N,)
    centres = rng.standard_normal((n_types, Z_DIM))  # (K, Z)
    z = centres[types] + INDIV_STD * rng.standard_normal((n_true, Z_DIM))  # (N, Z)
    cap = max(10.0, min(MAX_WEIGHT, MAX_WEIGHT_FRAC * n_true))
    weights = np.minimum((1.0 - rng.random(n_true)) ** (-1.0 / PARETO_ALPHA), cap)  # Pareto(min 1)
    return types, z.astype(np.float32), weights


@dataclass
class _RelationModel:
    """How an edge's relation (KG1 vocabulary) is chosen from its two true entities."""

    types: np.ndarray  # (N,) type of each true entity
    table: np.ndarray  # (K, K, slots) preferred relations of a (head type, tail type) pair
    roles: np.ndarray  # (N, roles) an entity's own habitual relations, drawn from its type's pool
    pop: np.ndarray  # (R,) global popularity

    def draw(self, rng: np.random.Generator, h: np.ndarray, t: np.ndarray) -> np.ndarray:
        slot = _categorical(rng, REL_SLOT_P, len(h))
        rel = self.table[self.types[h], self.types[t], slot]  # (E,)
        src = _categorical(rng, (REL_ROLE_HEAD, REL_ROLE_TAIL, REL_RANDOM_FRAC,
                                 1.0 - REL_ROLE_HEAD - REL_ROLE_TAIL - REL_RANDOM_FRAC), len(h))
        role = rng.integers(0, self.roles.shape[1], len(h))
        rel = np.where(src == 0, self.roles[h, role], np.where(src == 1, self.roles[t, role], rel))
        rand = src == 2
        rel[rand] = _categorical(rng, self.pop, int(rand.sum()))
        return rel


def _unique_first(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct keys and the index of each one's first occurrence (a stable sort, no hashing)."""
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    return sorted_key[first], order[first]


def _dedupe(h, r, t, n_ent: int, n_rel: int) -> np.ndarray:
    """Drop self-loops and repeated (h, r, t); returns (E, 3) sorted by (h, r, t)."""
    keep = h != t
    key = np.sort((h[keep].astype(np.int64) * n_rel + r[keep]) * n_ent + t[keep])
    key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    t_ = key % n_ent
    hr = key // n_ent
    return np.stack([hr // n_rel, hr % n_rel, t_], axis=1)


def _kg_triples(rng, kg: _KG, base, n_target: int, n_base_keep: int, weights, n_types,
                relations: _RelationModel, rel_map, n_rel: int) -> np.ndarray:
    """Triples of one KG in local ids: kept base edges + typed noise edges, no isolated entity."""
    n = len(kg.true_of)
    local_of = np.full(len(weights), -1, dtype=np.int64)
    local_of[kg.true_of] = np.arange(n)
    bh, br, bt = base
    present = np.flatnonzero((local_of[bh] >= 0) & (local_of[bt] >= 0))
    pick = np.sort(rng.choice(present, min(n_base_keep, len(present)), replace=False))
    h, r, t = local_of[bh[pick]], br[pick], local_of[bt[pick]]

    sampler = _WeightedSampler(weights[kg.true_of], relations.types[kg.true_of], n_types)

    def rename(rel: np.ndarray) -> np.ndarray:  # KG1 relation vocabulary -> this KG's
        if rel_map is None:
            return rel
        out = rel_map[rel]
        noisy = rng.random(len(out)) < REL2_NOISE
        out[noisy] = rng.integers(0, n_rel, int(noisy.sum()))
        return out

    triples = _dedupe(h, rename(r), t, n, n_rel)
    for _ in range(6):  # noise edges, topped up when dedupe removed some
        deficit = n_target - len(triples)
        if deficit <= 0:
            break
        nh, nt = sampler.sample(rng, deficit), sampler.sample(rng, deficit)
        nr = rename(relations.draw(rng, kg.true_of[nh], kg.true_of[nt]))
        triples = _dedupe(np.concatenate([triples[:, 0], nh]), np.concatenate([triples[:, 1], nr]),
                          np.concatenate([triples[:, 2], nt]), n, n_rel)

    degree = np.bincount(triples[:, [0, 2]].ravel(), minlength=n)
    lonely = np.flatnonzero(degree == 0)
    if len(lonely):  # one edge each to a weighted partner, random direction
        partner = sampler.sample(rng, len(lonely))
        partner = np.where(partner == lonely, (partner + 1) % n, partner)
        rel = rename(relations.draw(rng, kg.true_of[lonely], kg.true_of[partner]))
        flip = rng.random(len(lonely)) < 0.5
        h_new, t_new = np.where(flip, partner, lonely), np.where(flip, lonely, partner)
        triples = _dedupe(np.concatenate([triples[:, 0], h_new]), np.concatenate([triples[:, 1], rel]),
                          np.concatenate([triples[:, 2], t_new]), n, n_rel)
    return triples


def _kg_attributes(rng, kg: _KG, k: int, true_attrs, model: _AttributeModel, z, types) -> np.ndarray:
    """Attribute triples of KG number k (0/1): recorded true attributes + extras, >= 1 per entity.

    Sets kg.attr_ent / attr_name / attr_latent (sorted by entity) and returns each triple's meaning.
    """
    n = len(kg.true_of)
    in_vocab = model.in_vocab[k]
    local_of = np.full(len(z), -1, dtype=np.int64)
    local_of[kg.true_of] = np.arange(n)
    bt, bu, bs = true_attrs
    keep = (local_of[bt] >= 0) & in_vocab[bu] & (rng.random(len(bt)) < ATTR_KEEP)
    ent, u = local_of[bt[keep]], bu[keep]
    latent = bs[keep] + VALUE_KG_NOISE * rng.standard_normal(int(keep.sum()))

    vocab = np.flatnonzero(in_vocab)  # meanings this KG names
    extra_ent = np.repeat(np.arange(n), rng.poisson(ATTR_EXTRA, n))
    lonely = np.flatnonzero(np.bincount(np.concatenate([ent, extra_ent]), minlength=n) == 0)
    extra_ent = np.concatenate([extra_ent, lonely])
    extra_u = vocab[_categorical(rng, model.pop[vocab], len(extra_ent))]
    fav = model.pools[types[kg.true_of[lonely]], 0]  # a lonely entity gets its type's first attribute
    named = in_vocab[fav]  # ... when this KG names it
    extra_u[len(extra_u) - len(lonely):][named] = fav[named]
    extra_latent = model.latent(z[kg.true_of[extra_ent]], extra_u)
    extra_latent += VALUE_NOISE * rng.standard_normal(len(extra_u))

    ent = np.concatenate([ent, extra_ent])
    u = np.concatenate([u, extra_u])
    latent = np.concatenate([latent, extra_latent])
    _, first = _unique_first(ent * len(in_vocab) + u)  # one value per (entity, attribute), sorted
    kg.attr_ent, kg.attr_name, kg.attr_latent = ent[first], model.local[k][u[first]], latent[first]
    return u[first]


def _image_noise_std(img_dim: int) -> float:
    """Photo noise std that keeps raw image Hits@1 roughly independent of the image size.

    The signal lives in a Z_DIM-dimensional subspace, so with a fixed per-dimension noise the
    signal-to-noise ratio of a dot product grows like sqrt(img_dim); it stays put when
    2 * std + std**2 grows like sqrt(img_dim).
    """
    c = (2 * IMG_NOISE + IMG_NOISE**2) * np.sqrt(img_dim / IMG_REF_DIM)
    return float(np.sqrt(1.0 + c) - 1.0)


def _image_features(rng, kg: _KG, z, proj, coverage: float) -> tuple[np.ndarray, np.ndarray]:
    """Global ids of the entities with an image, and their (N_img, D) photo-like features."""
    n = len(kg.true_of)
    who = np.sort(rng.permutation(n)[: int(round(coverage * n))])  # local ids that have an image
    shown = kg.true_of[who].copy()  # true entity the photo shows
    wrong = rng.random(len(who)) < IMG_WRONG_FRAC
    shown[wrong] = rng.integers(0, len(z), int(wrong.sum()))
    offset = IMG_OFFSET * rng.standard_normal(proj.shape[1]).astype(np.float32)  # (D,)
    feats = np.empty((len(who), proj.shape[1]), dtype=np.float32)  # (N_img, D)
    noise = _image_noise_std(proj.shape[1])
    for s in range(0, len(who), IMG_CHUNK):
        block = z[shown[s:s + IMG_CHUNK]] @ proj + offset  # (B, D)
        block += noise * rng.standard_normal(block.shape, dtype=np.float32)
        feats[s:s + IMG_CHUNK] = np.maximum(block, 0.0)
    return kg.id_offset + who, feats


def _mean_rows(rows, cols, vals, n_rows, table):
    """Per row, the mean of vals * table[cols] over its entries: (n_rows, D)."""
    mat = sp.csr_matrix((vals, (rows, cols)), shape=(n_rows, table.shape[0]))
    count = np.bincount(rows, minlength=n_rows).astype(np.float32)
    return (mat @ table).astype(np.float32) / np.maximum(count, 1.0)[:, None]


def _noisy(rng, x, std, common):
    x += std * rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(x.shape[1])
    x += common
    return x


@dataclass
class _AttributeModel:
    """Attribute meanings [0, U): KG1 names [0, A1), KG2 names [A1 - overlap, U)."""

    in_vocab: tuple[np.ndarray, np.ndarray]  # 2 x (U,) bool: does this KG name the meaning
    local: tuple[np.ndarray, np.ndarray]  # 2 x (U,) the KG's name number of each meaning (-1: none)
    pop: np.ndarray  # (U,) global popularity
    pools: np.ndarray  # (K, pool) the attributes a type's entities draw from
    direction: np.ndarray  # (U, Z) unit vector: value latent = z . direction
    kind: np.ndarray  # (U,) 0 year, 1 count, 2 real number
    mu: np.ndarray  # (U,) location of values
    scale: np.ndarray  # (U,) scale of real-valued attributes

    def latent(self, z: np.ndarray, u: np.ndarray) -> np.ndarray:
        """(A,) standardised value latent of attribute u of entities with latent z, before noise."""
        return np.einsum("ij,ij->i", z, self.direction[u]) / np.sqrt(1.0 + INDIV_STD**2)

    def values(self, u: np.ndarray, latent: np.ndarray) -> list[str]:
        """Value strings: years as integers, counts as integers, reals with 4 significant digits."""
        kind = self.kind[u]
        v = self.mu[u] + latent * np.where(kind == 0, 40.0, 1.0)  # years spread ~40, others ~1
        year = np.clip(np.round(1900.0 + v), 1000, 2030)
        count = np.round(np.exp(np.clip(v, -5.0, 12.0)))
        out = np.where(kind == 0, year, np.where(kind == 1, count, v * self.scale[u]))
        fmt = np.array(["%d", "%d", "%.4g"])[kind]
        return ("\x00".join(fmt.tolist()) % tuple(out.tolist())).split("\x00") if len(out) else []


def _attribute_model(rng, n_attributes1: int, n_attributes2: int, n_types: int) -> _AttributeModel:
    overlap = int(round(ATTR_OVERLAP * min(n_attributes1, n_attributes2)))
    n_u = n_attributes1 + n_attributes2 - overlap
    in_vocab = (np.arange(n_u) < n_attributes1, np.arange(n_u) >= n_attributes1 - overlap)
    local = []
    for mask, size in zip(in_vocab, (n_attributes1, n_attributes2)):
        loc = np.full(n_u, -1, dtype=np.int64)
        loc[mask] = rng.permutation(size)  # names do not reveal the shared meaning
        local.append(loc)
    pop = _zipf_popularity(rng, n_u, 0.8)
    pool_p = ATTR_TABLE_POP * pop + (1 - ATTR_TABLE_POP) / n_u
    pools = _categorical(rng, pool_p, n_types * ATTR_POOL).reshape(n_types, ATTR_POOL)  # (K, pool)
    direction = _unit_rows(rng.standard_normal((n_u, Z_DIM))).astype(np.float32)  # (U, Z)
    return _AttributeModel(in_vocab, tuple(local), pop, pools, direction, kind=rng.integers(0, 3, n_u),
                           mu=rng.uniform(-2.0, 6.0, n_u), scale=10.0 ** rng.uniform(-1.0, 3.0, n_u))


def _true_attributes(rng, model: _AttributeModel, types, z):
    """(entity, meaning, latent) of every true entity's attributes: a few from its type's pool."""
    n_true, n_u = len(types), len(model.pop)
    counts = 1 + rng.poisson(ATTR_MEAN - 1, n_true)
    ent = np.repeat(np.arange(n_true), counts)
    u = model.pools[types[ent], rng.integers(0, ATTR_POOL, len(ent))]
    rand = rng.random(len(ent)) < ATTR_RANDOM_FRAC
    u[rand] = _categorical(rng, model.pop, int(rand.sum()))
    key, _ = _unique_first(ent * n_u + u)
    ent, u = key // n_u, key % n_u
    latent = model.latent(z[ent], u) + VALUE_NOISE * rng.standard_normal(len(ent))
    return ent, u, latent


def _relation_model(rng, types, n_types: int, n_relations1: int, n_relations2: int):
    """The relation model (KG1 vocabulary) and the noise-free part of KG2's renaming map."""
    rel_pop = _zipf_popularity(rng, n_relations1)
    table_p = 0.5 * rel_pop + 0.5 / n_relations1  # the type tables also use rare relations
    n_slots = len(REL_SLOT_P)
    table = _categorical(rng, table_p, n_types * n_types * n_slots).reshape(n_types, n_types, n_slots)
    pool = _categorical(rng, table_p, n_types * REL_ROLE_POOL).reshape(n_types, REL_ROLE_POOL)  # (K, pool)
    roles = pool[types[:, None], rng.integers(0, REL_ROLE_POOL, (len(types), REL_ROLES))]  # (N, roles)
    rel_map = rng.integers(0, n_relations2, n_relations1)  # KG1 relation -> KG2 relation, many-to-one
    cover = rng.permutation(n_relations1)[: min(n_relations1, n_relations2)]
    rel_map[cover] = rng.permutation(n_relations2)[: len(cover)]  # every KG2 name used when R2 <= R1
    return _RelationModel(types, table, roles, rel_pop), rel_map


def _base_graph(rng, relations: _RelationModel, weights, n_types: int, n_edges: int):
    """(h, r, t) true-entity edges: weighted heads, tails from the head's type w.p. P_INTRA_TYPE."""
    sampler = _WeightedSampler(weights, relations.types, n_types)
    h = sampler.sample(rng, n_edges)
    intra = rng.random(n_edges) < P_INTRA_TYPE
    t = np.where(intra, sampler.sample_in_group(rng, relations.types[h]), sampler.sample(rng, n_edges))
    return h, relations.draw(rng, h, t), t


def _generate(out: Path, name: str, *, n1, n2, n_links, n_relations1, n_relations2, n_attributes1,
              n_attributes2, avg_degree1, avg_degree2, img_dim, text_dim, image_coverage, seed) -> None:
    rng = np.random.default_rng(seed)
    n_true = n1 + n2 - n_links
    n_types = max(4, int(round(np.sqrt(n_true) / 3)))
    types, z, weights = _latent_entities(rng, n_true, n_types)

    # true ids: [0, n_links) in both KGs, [n_links, n1) KG1 only, [n1, n_true) KG2 only
    kg1 = _KG("kg1", rng.permutation(n1), 0, 0)
    kg2 = _KG("kg2", rng.permutation(np.concatenate([np.arange(n_links), np.arange(n1, n_true)])),
              n1, n_relations1)
    kgs = (kg1, kg2)

    # ---- relation graphs
    relations, rel_map = _relation_model(rng, types, n_types, n_relations1, n_relations2)
    targets = [int(round(avg_degree1 * n1 / 2)), int(round(avg_degree2 * n2 / 2))]
    base_keep = [int(round((1 - NOISE_EDGE_FRAC) * t)) for t in targets]
    share = [(weights[kg.true_of].sum() / weights.sum()) ** 2 for kg in kgs]  # P(base edge inside KG)
    n_base = max(k / (KEEP_MAX * s) for k, s in zip(base_keep, share))
    n_base = int(min(n_base, BASE_CAP * sum(base_keep))) + 1  # a tiny KG beside a huge one: more noise
    base = _base_graph(rng, relations, weights, n_types, n_base)
    for kg, target, keep, rmap, n_rel in zip(kgs, targets, base_keep, (None, rel_map),
                                             (n_relations1, n_relations2)):
        kg.triples = _kg_triples(rng, kg, base, target, keep, weights, n_types, relations, rmap, n_rel)
    del base

    # ---- attributes
    attr_model = _attribute_model(rng, n_attributes1, n_attributes2, n_types)
    true_attrs = _true_attributes(rng, attr_model, types, z)
    meanings = [_kg_attributes(rng, kg, k, true_attrs, attr_model, z, types) for k, kg in enumerate(kgs)]
    del true_attrs

    # ---- alignment and names; the text files are written before the features are made
    id1 = np.empty(n_true, dtype=np.int64)
    id1[kg1.true_of] = np.arange(n1)
    id2 = np.empty(n_true, dtype=np.int64)
    id2[kg2.true_of] = n1 + np.arange(n2)
    links = np.stack([id1[:n_links], id2[:n_links]], axis=1)[rng.permutation(n_links)]  # (n_links, 2)
    ent_names = [rng.permutation(n1), rng.permutation(n2)]  # name number of each local id
    rel_names = [rng.permutation(n_relations1), rng.permutation(n_relations2)]
    values = [attr_model.values(u, kg.attr_latent) for kg, u in zip(kgs, meanings)]
    _write_text_files(out, kgs, links, ent_names, rel_names, values, (n_attributes1, n_attributes2))
    del values

    # ---- text embeddings of relation names and attribute names / values
    n_u = len(attr_model.pop)
    common = _unit_rows(rng.standard_normal((1, text_dim))).astype(np.float32) * TEXT_COMMON  # (1, D)
    rel_vec1 = _unit_rows(rng.standard_normal((n_relations1, text_dim))).astype(np.float32)  # (R1, D)
    rel_vec2 = _mean_rows(rel_map, np.arange(n_relations1), np.ones(n_relations1, np.float32),
                          n_relations2, rel_vec1)  # (R2, D) mean of the KG1 names mapped to it
    rel_vec2 = _unit_rows(rel_vec2 + REL_NAME_NOISE * rng.standard_normal(rel_vec2.shape).astype(
        np.float32) / np.sqrt(text_dim))
    attr_name_vec = _unit_rows(rng.standard_normal((n_u, text_dim)))  # (U, D) meaning of each attribute
    name_vec = [(_unit_rows(attr_name_vec + ATTR_NAME_NOISE * rng.standard_normal((n_u, text_dim))
                            / np.sqrt(text_dim))).astype(np.float32) for _ in kgs]  # 2 x (U, D)
    value_vec = _unit_rows(rng.standard_normal((n_u, text_dim))).astype(np.float32)  # (U, D)
    proj = (rng.standard_normal((Z_DIM, img_dim)) / np.sqrt(1.0 + INDIV_STD**2) / np.sqrt(Z_DIM)).astype(
        np.float32)  # (Z, D_img): unit-variance image pre-activations

    # ---- features, one modality at a time so that at most one is in memory
    _write_pickle(out / MODALITY_FILES["relation_text"], [
        (kg.id_offset + np.arange(len(kg.true_of)), _relation_text(rng, kg, rel_vec, common))
        for kg, rel_vec in zip(kgs, (rel_vec1, rel_vec2))])
    _write_pickle(out / MODALITY_FILES["attribute_text"], [
        (kg.id_offset + np.arange(len(kg.true_of)), _attribute_text(rng, kg, u, names, value_vec, common))
        for kg, u, names in zip(kgs, meanings, name_vec)])
    _write_pickle(out / image_pickle_name(name), [
        _image_features(rng, kg, z, proj, image_coverage) for kg in kgs])


def _relation_text(rng, kg: _KG, rel_vec: np.ndarray, common: np.ndarray) -> np.ndarray:
    """(N, D) mean of the relation-name vectors over each entity's triples (as head or tail), + noise."""
    tr = kg.triples
    rows = np.concatenate([tr[:, 0], tr[:, 2]])
    feats = _mean_rows(rows, np.concatenate([tr[:, 1], tr[:, 1]]), np.ones(len(rows), np.float32),
                       len(kg.true_of), rel_vec)  # (N, D)
    return _noisy(rng, feats, REL_TEXT_NOISE, common)


def _attribute_text(rng, kg: _KG, u_true, names, value_vec, common) -> np.ndarray:
    """(N, D) embedding of "a1 is v1, a2 is v2, ...": mean of (name vector + value * value direction)."""
    n = len(kg.true_of)
    feats = _mean_rows(kg.attr_ent, u_true, np.ones(len(u_true), np.float32), n, names)  # (N, D)
    feats += VALUE_TEXT_WEIGHT * _mean_rows(kg.attr_ent, u_true, kg.attr_latent.astype(np.float32),
                                            n, value_vec)
    return _noisy(rng, feats, ATTR_TEXT_NOISE, common)


# ------------------------------------------------------------------ writers
def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _int_rows(arr: np.ndarray, chunk: int = 1_000_000) -> str:
    """Tab-separated integer rows, one per line (bulk %-formatting: ~5x faster than np.savetxt)."""
    arr = np.asarray(arr, dtype=np.int64)
    line = "\t".join(["%d"] * arr.shape[1]) + "\n"
    return "".join((line * len(part)) % tuple(part.ravel().tolist())
                   for part in (arr[s:s + chunk] for s in range(0, len(arr), chunk)))


def _write_pickle(path: Path, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Pickle {int id: float32 row} over (ids, (N, D) vectors) parts, in part order."""
    feats = {}
    for ids, vectors in parts:
        feats.update(zip(ids.tolist(), vectors))  # rows are views; each pickles only its own data
    with open(path, "wb") as f:
        pickle.dump(feats, f, protocol=4)


def _write_text_files(out: Path, kgs: tuple[_KG, _KG], links, ent_names, rel_names, values,
                      n_attributes: tuple[int, int]) -> None:
    rel_lines = []
    for i, kg in enumerate(kgs, start=1):
        n = len(kg.true_of)
        off = kg.id_offset
        names = [f"{kg.tag}:ent_{k}" for k in ent_names[i - 1].tolist()]
        _write_text(out / ENT_IDS[i - 1], "".join(f"{off + e}\t{nm}\n" for e, nm in enumerate(names)))
        _write_text(out / TRIPLES[i - 1], _int_rows(kg.triples + [off, kg.rel_offset, off]))
        rel_lines += [f"{kg.rel_offset + r}\t{kg.tag}:rel_{k}\n"
                      for r, k in enumerate(rel_names[i - 1].tolist())]

        vocab = [f"{kg.tag}:attr_{k}" for k in range(n_attributes[i - 1])]
        attrs = [vocab[a] for a in kg.attr_name.tolist()]
        _write_text(out / f"attr_triples_{i}", "".join(
            f"{kg.id_offset + e}\t{a}\t{v}\n" for e, a, v in zip(kg.attr_ent.tolist(), attrs, values[i - 1])))
        bounds = np.searchsorted(kg.attr_ent, np.arange(n + 1)).tolist()  # attr_ent is sorted
        _write_text(out / TRAINING_ATTRS[i - 1], "".join(
            names[e] + "\t" + "\t".join(attrs[bounds[e]:bounds[e + 1]]) + "\n" for e in range(n)
            if bounds[e + 1] > bounds[e]))
    _write_text(out / "rel_names", "".join(rel_lines))
    _write_text(out / LINKS, _int_rows(links))


# ------------------------------------------------------------------ public API
def generate_pair(out_dir: str | os.PathLike, *, n1: int, n2: int, n_links: int, n_relations1: int,
                  n_relations2: int, n_attributes1: int, n_attributes2: int, avg_degree1: float,
                  avg_degree2: float, img_dim: int, text_dim: int, image_coverage: float, seed: int = 0,
                  overwrite: bool = False) -> Path:
    """Generate a synthetic KG pair into ``out_dir`` and return its path.

    Sizes: ``n1``/``n2`` entities, ``n_links`` one-to-one gold pairs (<= min(n1, n2)),
    ``n_relations*`` relation names, ``n_attributes*`` attribute names per KG,
    ``avg_degree*`` = 2 * triples / entities (head and tail counted), feature sizes
    ``img_dim``/``text_dim``, ``image_coverage`` in [0, 1] the fraction of each KG's entities
    with an image. Deterministic in all arguments. The folder is written as a temporary
    sibling and renamed at the end, so an existing ``out_dir`` is always complete; it is
    replaced only with ``overwrite=True`` (otherwise FileExistsError).
    """
    out = Path(out_dir).resolve()
    if not 0 < n_links <= min(n1, n2):
        raise ValueError(f"need 0 < n_links <= min(n1, n2), got n_links={n_links}, n1={n1}, n2={n2}")
    if not 0.0 <= image_coverage <= 1.0:
        raise ValueError(f"image_coverage must be in [0, 1], got {image_coverage}")
    if min(n_relations1, n_relations2, n_attributes1, n_attributes2, img_dim, text_dim) < 1:
        raise ValueError("relation / attribute counts and feature sizes must be >= 1")
    if min(avg_degree1, avg_degree2) <= 0:
        raise ValueError("average degrees must be > 0")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        _generate(tmp, out.name, n1=n1, n2=n2, n_links=n_links, n_relations1=n_relations1,
                  n_relations2=n_relations2, n_attributes1=n_attributes1, n_attributes2=n_attributes2,
                  avg_degree1=avg_degree1, avg_degree2=avg_degree2, img_dim=img_dim, text_dim=text_dim,
                  image_coverage=image_coverage, seed=seed)
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} appeared while generating; pass overwrite=True to replace it")
            trash = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds every file of the layout."""
    folder = Path(folder)
    return folder.is_dir() and all((folder / f).is_file() for f in expected_files(folder))


def default_dataset(root: str | os.PathLike | None = None) -> Path:
    """The embedded default dataset (DEFAULT_KWARGS), generated once into ``root`` if absent.

    ``root`` defaults to ``<repo>/data/embedded_default``. A complete folder made with the current
    DEFAULT_KWARGS (recorded in its ``generator.json``) is returned as is; one made with other
    settings (an older version of this file) is generated anew.
    """
    out = Path(root) if root is not None else DEFAULT_ROOT
    stamp = json.dumps(DEFAULT_KWARGS, sort_keys=True)
    if is_complete(out) and _stamp_of(out) == stamp:
        return out.resolve()
    try:
        folder = generate_pair(out, **DEFAULT_KWARGS, overwrite=is_complete(out))
    except FileExistsError:
        if is_complete(out) and _stamp_of(out) == stamp:  # another process finished it first
            return out.resolve()
        raise
    # Written after the folder is complete: a folder without it is regenerated, never trusted.
    (folder / "generator.json").write_text(stamp + "\n", encoding="utf-8")
    return folder


def _stamp_of(folder: Path) -> str | None:
    path = folder / "generator.json"
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def fb15k_db15k_shape(out_dir: str | os.PathLike, scale: float = 1.0, seed: int = 0,
                      overwrite: bool = False) -> Path:
    """FB15K-DB15K-shaped pair: every count times ``scale`` (degrees and feature sizes unchanged).

    At scale 1: 14,951 + 12,842 entities, ~592k + ~90k triples, 12,842 one-to-one links (the
    real file's 12,846 pairs are not one-to-one), 1,345 / 279 relations, 116 / 225 attribute
    names, images for 90% of entities at 4096-d, text features at 768-d.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    c = dict(FB15K_DB15K)
    for key in ("n1", "n2", "n_links", "n_relations1", "n_relations2", "n_attributes1", "n_attributes2"):
        c[key] = max(2, int(round(c[key] * scale)))
    c["n_links"] = min(c["n_links"], c["n2"], c["n1"])
    # a tiny scale cannot hold the full degree: at most half of all ordered pairs
    c["avg_degree1"] = min(c["avg_degree1"], (c["n1"] - 1) / 2)
    c["avg_degree2"] = min(c["avg_degree2"], (c["n2"] - 1) / 2)
    return generate_pair(out_dir, **c, seed=seed, overwrite=overwrite)


# ------------------------------------------------------------------ calibration
def _load_features(path: Path, ids: np.ndarray) -> np.ndarray:
    """(len(ids), D) float32, zero rows for ids absent from the pickle."""
    with open(path, "rb") as f:
        feats = pickle.load(f)
    dim = len(next(iter(feats.values()))) if feats else 1  # no feature at all: every query misses
    out = np.zeros((len(ids), dim), dtype=np.float32)
    for row, i in enumerate(ids.tolist()):
        vec = feats.get(i)
        if vec is not None:
            out[row] = vec
    return out


def _strict_hits1(left: np.ndarray, right: np.ndarray, chunk: int = 1024) -> float:
    """Share of rows i whose cosine with right[i] is strictly above that with every other right row."""
    left, right = _unit_rows(left), _unit_rows(right)  # zero rows stay zero: never a hit
    hits = 0
    for s in range(0, len(left), chunk):
        sim = left[s:s + chunk] @ right.T  # (B, N)
        rows = np.arange(sim.shape[0])
        true = sim[rows, s + rows].copy()
        sim[rows, s + rows] = -np.inf
        hits += int((true > sim.max(axis=1)).sum())
    return hits / len(left)


def raw_feature_hits1(folder: str | os.PathLike) -> dict[str, float]:
    """Left-to-right Hits@1 of each raw dense feature, for calibration.

    Rule: for every gold pair (all of ``ill_ent_ids``), rank the right entities of all gold
    pairs by cosine similarity of the raw feature; a hit needs the true partner strictly
    first (ties are misses). Missing features (images) are zero vectors, so a left entity
    without a feature, or whose partner has none, is a miss. Returns keys ``image``,
    ``relation_text``, ``attribute_text`` and ``chance`` (= 1 / number of pairs). The
    bag-of-words modalities are not listed: the two KGs' relation and attribute vocabularies
    are disjoint, so their raw cross-KG similarity is zero by construction.
    """
    folder = Path(folder)
    pairs = np.loadtxt(folder / LINKS, dtype=np.int64, delimiter="\t", ndmin=2)
    paths = {"image": folder / image_pickle_name(folder),
             **{k: folder / v for k, v in MODALITY_FILES.items()}}
    out = {k: _strict_hits1(_load_features(p, pairs[:, 0]), _load_features(p, pairs[:, 1]))
           for k, p in paths.items()}
    out["chance"] = 1.0 / len(pairs)
    return out


# ------------------------------------------------------------------ CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_process.synthetic",
        description="Generate a synthetic multi-modal KG pair in the standard MMEA layout.")
    p.add_argument("--out", required=True, help="output folder (its basename names the image pickle)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--scale", type=float, default=None,
                      help="FB15K-DB15K shape with every count times SCALE (unitless; 1.0 = full size)")
    size.add_argument("--default", action="store_true",
                      help="the embedded default size (3000 + 2800 entities, 2500 links); the default choice")
    p.add_argument("--seed", type=int, default=0, help="random seed (integer); same seed, same bytes")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--raw-hits", action="store_true",
                   help="afterwards print the raw per-modality Hits@1 (calibration figures)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if args.scale is not None:
        out = fb15k_db15k_shape(args.out, scale=args.scale, seed=args.seed, overwrite=args.overwrite)
    else:
        out = generate_pair(args.out, **{**DEFAULT_KWARGS, "seed": args.seed}, overwrite=args.overwrite)
    elapsed = time.perf_counter() - start
    n_tr = [sum(1 for _ in open(out / f"triples_{i}")) for i in (1, 2)]
    print(f"out={out} seconds={elapsed:.2f} triples_1={n_tr[0]} triples_2={n_tr[1]}")
    if args.raw_hits:
        print(" ".join(f"raw_hits1_{k}={v:.4f}" for k, v in raw_feature_hits1(out).items()))
    sys.stdout.flush()


if __name__ == "__main__":
    main(parse_args())
