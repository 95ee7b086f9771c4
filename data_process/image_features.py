"""Image features for an MMEA dataset: MMKB's VGG16 vectors, or a folder of images encoded with ResNet.

MMKB layout assumed by `h5_image_features` (MMKB's own files could not be inspected here; the
assumption is written down in docs/data.md):
- `<KG>_ImageIndex.txt`: one line per image, `entity<TAB>key` (any whitespace works; extra fields
  are ignored). An entity may have several lines (several images); their vectors are averaged.
- `<KG>_ImageData.h5`: either one dataset per key (`h5[key]`, a (D,) vector or a (K, D) stack of
  K images, averaged), or a single 2-d dataset (M, D) in which the key is a row number.

`folder_image_features` reads a folder in which each image is named after its entity,
`urllib.parse.quote(name, safe='')` plus an image extension, or a sub-folder with that name holding
several images of the entity (averaged); alternatively `--image_map` lists `entity<TAB>path` lines.
The encoder is a torchvision ResNet (ResNet-152 in the paper) with weights from a local file,
classifier removed: one (2048,) vector per image for ResNet-50/101/152.

Both optional dependencies are imported lazily: h5py (`pip install humea[h5]`) and
torchvision + pillow (`pip install humea[vision]`).

Axis letters: B images in a batch, D feature width.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class ImageInputError(Exception):
    """Bad or missing image input; the CLI prints this without a traceback."""


@dataclass
class ImageReport:
    source: str = ""
    images: int = 0  # image vectors read or encoded
    entities: int = 0  # dataset entities that received a vector
    unknown_entities: int = 0  # index / folder entries naming no entity of the dataset
    missing_keys: int = 0  # index keys absent from the h5 file
    dim: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _require_h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImageInputError(
            "reading MMKB's *_ImageData.h5 needs h5py: pip install humea[h5] (or pip install h5py)"
        ) from e
    return h5py


def _require_torchvision():
    try:
        import torchvision
        from PIL import Image
    except Exception as e:  # a torchvision built for another torch raises RuntimeError, not ImportError
        raise ImageInputError(
            f"encoding an image folder needs torchvision and pillow built for this torch "
            f"({torch.__version__}): pip install humea[vision]; "
            f"the import failed with: {type(e).__name__}: {e}"
        ) from e
    return torchvision, Image


def lookup_ids(name: str, name_to_ids: Mapping[str, Sequence[int]]) -> Sequence[int]:
    """Entity ids for a name, accepting it with or without the surrounding <...> of a URI."""
    ids = name_to_ids.get(name)
    if ids is None:
        alt = name[1:-1] if name.startswith("<") and name.endswith(">") else f"<{name}>"
        ids = name_to_ids.get(alt, ())
    return ids


def read_image_index(path: Path) -> list[tuple[str, str]]:
    """(entity, key) pairs of an MMKB `<KG>_ImageIndex.txt` (lines `entity<TAB>key`)."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"missing image index: expected {path} (lines 'entity<TAB>key')")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2:
                fields = line.split()
            if len(fields) < 2:
                raise ImageInputError(
                    f"{path.name} line {lineno}: expected 'entity<TAB>key' (2 fields), got {len(fields)} field"
                )
            pairs.append((fields[0].strip(), fields[1].strip()))
    return pairs


def default_index_path(h5_path: Path) -> Path:
    """`FB15K_ImageData.h5` -> `FB15K_ImageIndex.txt` in the same folder."""
    h5_path = Path(h5_path)
    stem = h5_path.stem
    stem = stem[: -len("_ImageData")] if stem.endswith("_ImageData") else stem
    return h5_path.with_name(f"{stem}_ImageIndex.txt")


def _average(sums: dict[int, np.ndarray], counts: dict[int, int]) -> dict[int, np.ndarray]:
    return {e: (sums[e] / counts[e]).astype(np.float32) for e in sorted(sums)}


def h5_image_features(
    h5_path: Path, index_path: Path | None, name_to_ids: Mapping[str, Sequence[int]]
) -> tuple[dict[int, np.ndarray], ImageReport]:
    """Entity id -> mean image vector, from an MMKB h5 file and its index (layout in the module doc)."""
    h5py = _require_h5py()
    h5_path = Path(h5_path)
    index_path = Path(index_path) if index_path else default_index_path(h5_path)
    if not h5_path.is_file():
        raise ImageInputError(f"missing image features: expected the h5 file {h5_path}")
    pairs = read_image_index(index_path)
    report = ImageReport(source=f"{h5_path.name} + {index_path.name}")
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    with h5py.File(h5_path, "r") as f:
        datasets = []
        f.visititems(lambda name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        matrix = None
        if len(datasets) == 1 and datasets[0].ndim == 2:
            matrix = np.asarray(datasets[0], dtype=np.float32)  # (M, D); keys are row numbers
        for entity, key in pairs:
            ids = lookup_ids(entity, name_to_ids)
            if not ids:
                report.unknown_entities += 1
                continue
            if matrix is not None and key.isdigit() and int(key) < len(matrix):
                vecs = matrix[int(key)][None]
            else:
                obj = f.get(key)
                if not isinstance(obj, h5py.Dataset):
                    report.missing_keys += 1
                    continue
                vecs = np.asarray(obj, dtype=np.float32).reshape(-1, obj.shape[-1])  # (K, D)
            report.images += len(vecs)
            for e in ids:
                sums[e] = sums.get(e, 0) + vecs.sum(0, dtype=np.float64)
                counts[e] = counts.get(e, 0) + len(vecs)
    out = _average(sums, counts)
    report.entities = len(out)
    report.dim = next(iter(out.values())).shape[0] if out else 0
    return out, report


def list_entity_images(
    image_dir: Path, name_to_ids: Mapping[str, Sequence[int]], image_map: Path | None = None
) -> tuple[dict[int, list[Path]], int]:
    """Entity id -> its image files, and the number of entries that name no entity of the dataset.

    Without a map: `<quote(name)>.<ext>` files and `<quote(name)>/` sub-folders of image files.
    With a map: lines `entity<TAB>path`, paths relative to image_dir.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise ImageInputError(f"missing image folder: expected a directory at {image_dir}")
    entries: list[tuple[str, Path]] = []
    if image_map is not None:
        for entity, rel in read_image_index(Path(image_map)):
            path = image_dir / rel
            if not path.is_file():
                raise ImageInputError(f"{Path(image_map).name}: image {path} of {entity} does not exist")
            entries.append((entity, path))
    else:
        for path in sorted(image_dir.iterdir()):
            if path.is_dir():
                entries += [
                    (urllib.parse.unquote(path.name), p)
                    for p in sorted(path.iterdir())
                    if p.suffix.lower() in IMAGE_EXTENSIONS
                ]
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                entries.append((urllib.parse.unquote(path.stem), path))
    by_id: dict[int, list[Path]] = {}
    unknown = 0
    for entity, path in entries:
        ids = lookup_ids(entity, name_to_ids)
        unknown += not ids
        for e in ids:
            by_id.setdefault(e, []).append(path)
    return by_id, unknown


def load_resnet(weights: Path, arch: str = "resnet152") -> tuple[torch.nn.Module, int]:
    """A torchvision ResNet with weights from a local state_dict file and the classifier removed."""
    torchvision, _ = _require_torchvision()
    if arch not in RESNET_ARCHS:
        raise ImageInputError(f"--resnet_arch must be one of {RESNET_ARCHS}, got {arch!r}")
    weights = Path(weights)
    if not weights.is_file():
        raise ImageInputError(f"missing ResNet weights: expected a state_dict file at {weights} (--resnet_weights)")
    model = getattr(torchvision.models, arch)(weights=None)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ImageInputError(f"{weights.name} is not a {arch} state_dict: {str(e)[:300]}") from e
    dim = model.fc.in_features
    model.fc = torch.nn.Identity()
    return model.eval(), dim


@torch.inference_mode()
def folder_image_features(
    image_dir: Path,
    name_to_ids: Mapping[str, Sequence[int]],
    resnet_weights: Path,
    arch: str = "resnet152",
    image_map: Path | None = None,
    device: str | None = None,
    batch_size: int = 32,
) -> tuple[dict[int, np.ndarray], ImageReport]:
    """Entity id -> mean ResNet feature of its images.

    Preprocessing: resize 256, centre crop 224, ImageNet mean/std normalisation."""
    torchvision, Image = _require_torchvision()
    by_id, unknown = list_entity_images(image_dir, name_to_ids, image_map)
    if resnet_weights is None:
        raise ImageInputError("--image_dir needs --resnet_weights (a local ResNet state_dict file)")
    model, dim = load_resnet(resnet_weights, arch)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev)
    T = torchvision.transforms
    transform = T.Compose(
        [
            T.Resize(256),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    paths = sorted({p for ps in by_id.values() for p in ps})
    vec_of: dict[Path, np.ndarray] = {}
    for start in tqdm(range(0, len(paths), batch_size), desc="images", unit="batch", leave=False):
        chunk = paths[start : start + batch_size]
        batch = []
        for p in chunk:
            try:
                with Image.open(p) as im:
                    batch.append(transform(im.convert("RGB")))
            except OSError as e:
                raise ImageInputError(f"cannot read image {p}: {e}") from e
        feats = model(torch.stack(batch).to(dev)).float().cpu().numpy()  # (B, D)
        vec_of.update(zip(chunk, feats))
    out = {e: np.mean([vec_of[p] for p in ps], axis=0).astype(np.float32) for e, ps in sorted(by_id.items())}
    report = ImageReport(
        source=f"{Path(image_dir).name} ({arch})",
        images=len(paths),
        entities=len(out),
        unknown_entities=unknown,
        dim=dim,
    )
    return out, report
