"""Reading feature pickles from elsewhere without running their code.

``pickle.load`` calls whatever importable function a file names (``__reduce__``), so a downloaded
``triples_feature_dict.pkl`` could run a shell command while it loads. ``load_pickle`` reads the same
files through an unpickler whose ``find_class`` admits only the globals that the feature format
needs and refuses every other one *before* it is called (``ForbiddenGlobal``, naming it):

    opcodes only, no global  dict, list, tuple, int, float, str, bytes, bool, None
    numpy arrays             numpy(._core|.core).multiarray._reconstruct and numpy.ndarray (protocols
                             0-4), numpy(._core|.core).numeric._frombuffer (protocol 5), numpy.dtype,
                             numpy(._core|.core).multiarray.scalar (numpy scalars, e.g. in a list),
                             _codecs.encode and builtins.bytes (how protocols 0-2 write the raw bytes)

The numpy names do not reach numpy's own unpickling code: each is a stand-in that rebuilds the
array from a checked (shape, numeric dtype, byte order, raw bytes), so a file can make only plain
bool / int / uint / float arrays and scalars; object, structured and sub-array dtypes, array
subclasses and any state whose bytes do not match the shape are refused. Both numpy 1.x
(``numpy.core``) and 2.x (``numpy._core``) module names load, as do Python 2 pickles (str
decoded as latin-1, as numpy documents for them). Torch tensors are not admitted: pickling them
goes through ``torch.load`` of nested bytes, which is the hole this module closes.

Nothing here checks what the objects mean (a dict of entity ids, vectors of one size): that is
``data_process.dataset``'s job.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np

MAX_DEPTH = 100  # containers nested deeper than this are refused (the feature format needs 3)
# numpy's pickled dtype names of plain data: 'f4', 'i8', 'u4', 'b1', 'c16', 'U3', 'S3', ... (complex and
# text arrays load so that the feature validation can name the key holding them)
_DTYPE_SPEC = re.compile(r"[biufc][0-9]{1,2}|[SU][0-9]{1,6}")


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global that the format does not need; nothing it names was called."""

    def __init__(self, module: str, name: str):
        self.global_name = f"{module}.{name}"
        super().__init__(f"the pickle calls {self.global_name}, which is not admitted")


class _Dtype:
    """Stand-in for numpy.dtype(spec, align, copy) + its BUILD state: only plain numeric dtypes."""

    __slots__ = ("dtype",)

    def __init__(self, spec, align=False, copy=False):
        if isinstance(spec, bytes):
            spec = spec.decode("latin-1")
        if not isinstance(spec, str) or not _DTYPE_SPEC.fullmatch(spec):
            raise pickle.UnpicklingError(f"dtype {spec!r:.40} is not a plain data type (bool, int, uint, float, "
                                         "complex or fixed-width text)")
        try:
            self.dtype = np.dtype(spec)
        except TypeError:
            raise pickle.UnpicklingError(f"dtype {spec!r} is not a numpy type") from None

    def __setstate__(self, state):
        # numpy's state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
                and state[2] is None and state[3] is None and state[4] is None):
            raise pickle.UnpicklingError(f"dtype state {state!r:.80} is not that of a plain data type "
                                         "(sub-array and structured dtypes are not admitted)")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


def _as_dtype(dtype) -> np.dtype:
    if not isinstance(dtype, _Dtype):
        raise pickle.UnpicklingError(f"expected a numpy dtype, got {type(dtype).__name__}")
    return dtype.dtype


def _as_bytes(data) -> bytes | bytearray:
    if isinstance(data, str):  # a Python 2 str, decoded as latin-1 by the unpickler
        try:
            return data.encode("latin-1")
        except UnicodeEncodeError:
            raise pickle.UnpicklingError("array data is text, not bytes") from None
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, pickle.PickleBuffer):
        return data.raw()
    raise pickle.UnpicklingError(f"array data must be bytes, got {type(data).__name__}")


def _array(shape, dtype, data, order) -> np.ndarray:
    """The array of (shape, dtype, raw bytes, 'C' | 'F'); the bytes must be exactly what the shape needs."""
    d = _as_dtype(dtype)
    if not (isinstance(shape, tuple) and len(shape) <= 32 and all(type(s) is int and s >= 0 for s in shape)):
        raise pickle.UnpicklingError(f"array shape {shape!r:.80} is not a tuple of sizes")
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"array order {order!r:.20} is not 'C' or 'F'")
    raw = _as_bytes(data)
    need = math.prod(shape) * d.itemsize
    if len(raw) != need:
        raise pickle.UnpicklingError(f"array data holds {len(raw)} bytes; shape {shape} of {d} needs {need}")
    return np.frombuffer(raw, dtype=d).reshape(shape, order=order)


class _PendingArray:
    """What numpy's _reconstruct returns until the BUILD opcode hands it the array's state."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # (version, shape, dtype, is_fortran, data); numpy < 1.x wrote no version
        if not (isinstance(state, tuple) and len(state) == 4 and isinstance(state[2], bool | int)):
            raise pickle.UnpicklingError(f"array state {state!r:.80} is not (shape, dtype, is_fortran, data)")
        shape, dtype, fortran, data = state
        array = _array(shape, dtype, data, "F" if fortran else "C")
        # numpy's own unpickling turns these arrays to the machine's byte order (not protocol 5's)
        self.array = array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))

    def finished(self) -> np.ndarray:
        if self.array is None:
            raise pickle.UnpicklingError("an array without its state (a _reconstruct call with no BUILD)")
        return self.array


def _reconstruct(subtype, shape, typecode) -> _PendingArray:
    if subtype is not ADMITTED[("numpy", "ndarray")]:
        raise pickle.UnpicklingError(f"_reconstruct of {subtype!r:.80}: only numpy.ndarray is admitted")
    return _PendingArray()


def _frombuffer(buf, dtype, shape, order, axis_order=None) -> np.ndarray:
    if axis_order is not None:
        raise pickle.UnpicklingError("arrays with a permuted memory layout (axis_order) are not admitted")
    return _array(shape, dtype, buf, order)


def _scalar(dtype, data=None):
    d = _as_dtype(dtype)
    raw = _as_bytes(data)
    if len(raw) != d.itemsize:
        raise pickle.UnpicklingError(f"scalar data holds {len(raw)} bytes; {d} needs {d.itemsize}")
    return np.frombuffer(raw, dtype=d, count=1)[0]


def _latin1_encode(obj, encoding="utf-8", errors="strict") -> bytes:
    """_codecs.encode as protocols 0-2 use it: bytes written as latin-1 text; other codecs refused."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode(..., {encoding!r:.20}) is not the latin-1 bytes encoding")
    return obj.encode("latin-1")


def _empty_bytes(*args) -> bytes:
    """builtins.bytes as protocols 0-2 use it: bytes() for b''."""
    if args:
        raise pickle.UnpicklingError("builtins.bytes is admitted only without arguments (b'')")
    return b""


def _ndarray(*args, **kwargs):
    raise pickle.UnpicklingError("the pickle calls numpy.ndarray directly; only numpy's own array pickling "
                                 "(_reconstruct) is admitted")


class _Admitted:
    """What find_class hands out: a call-through to one stand-in. The pickle cannot change it (BUILD on
    it is refused), so one file cannot alter how the next one loads."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"the pickle sets the state of {self.name}")

    def __repr__(self) -> str:
        return self.name


def _admit(module: str, name: str, fn) -> tuple[tuple[str, str], _Admitted]:
    return (module, name), _Admitted(f"{module}.{name}", fn)


ADMITTED = dict([
    *(_admit(f"numpy.{core}.multiarray", "_reconstruct", _reconstruct) for core in ("_core", "core")),
    *(_admit(f"numpy.{core}.multiarray", "scalar", _scalar) for core in ("_core", "core")),
    *(_admit(f"numpy.{core}.numeric", "_frombuffer", _frombuffer) for core in ("_core", "core")),
    _admit("numpy", "ndarray", _ndarray),
    _admit("numpy", "dtype", _Dtype),
    _admit("_codecs", "encode", _latin1_encode),
    _admit("builtins", "bytes", _empty_bytes),
    _admit("__builtin__", "bytes", _empty_bytes),  # protocols 0-2 write the Python 2 name
])


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = ADMITTED.get((module, name))
        if found is None:
            raise ForbiddenGlobal(module, name)
        return found


def _settle(obj, depth: int, done: dict, writable: bool):
    """Replace the stand-ins by what they stand for: finished arrays (``writable`` copies, else views
    of the pickle's bytes), real dtypes."""
    if isinstance(obj, _PendingArray):
        obj = obj.finished()
    if isinstance(obj, np.ndarray):
        return obj.copy() if writable and not obj.flags.writeable else obj
    if isinstance(obj, _Dtype):
        return obj.dtype
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    if id(obj) in done:  # shared (or cyclic) containers are settled once
        return done[id(obj)]
    if depth > MAX_DEPTH:
        raise pickle.UnpicklingError(f"containers nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, tuple):
        done[id(obj)] = out = tuple(_settle(v, depth + 1, done, writable) for v in obj)
        return out
    done[id(obj)] = obj
    for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
        obj[k] = _settle(v, depth + 1, done, writable)
    return obj


def load_pickle(path: str | Path):
    """The object pickled in ``path``, built from admitted globals only (module docstring). Raises
    ForbiddenGlobal for any other global, and pickle.UnpicklingError or the unpickler's own errors
    (EOFError, ValueError, ...) for a damaged file."""
    with open(path, "rb") as f:
        obj = _RestrictedUnpickler(f, encoding="latin1").load()
    return _settle(obj, 0, {}, writable=False)  # read-only views: the feature files can be large


def _check_zip_records(path: str | Path) -> None:
    """torch.save writes a CRC-32 of every record of its zip file but torch.load does not check them: a
    flipped bit in a tensor would load as another number. Check them (about 0.03 s per 100 MB), and
    that no record name appears twice."""
    if not zipfile.is_zipfile(path):
        return  # torch's pre-1.6 format, or not a zip at all: torch.load reports it
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()
    except Exception as e:  # noqa: BLE001 - zipfile raises many kinds on a damaged archive
        raise pickle.UnpicklingError(f"damaged zip archive ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise pickle.UnpicklingError(f"record {bad} fails its CRC-32 check: the file is damaged")
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:  # which copy torch would read is not defined
        raise pickle.UnpicklingError(f"record {twice} appears twice: the file was altered")


def load_torch(path: str | Path):
    """``torch.load(path, weights_only=True)`` with numpy arrays admitted through the same stand-ins
    (train.py's checkpoints carry the numpy RNG state and the pseudo pairs as numpy arrays) and
    torch's TorchVersion (the version string of the provenance); nothing else beyond torch's own
    list (tensors, state dicts, Python builtins). Raises ForbiddenGlobal for any other global and
    pickle.UnpicklingError, RuntimeError (a damaged zip), ... for a damaged file."""
    import torch
    from torch.torch_version import TorchVersion

    _check_zip_records(path)
    admitted = [*((fn, f"{module}.{name}") for (module, name), fn in ADMITTED.items()),
                (_PendingArray, f"{__name__}._PendingArray"), (_Dtype, f"{__name__}._Dtype"),  # BUILD on them
                (TorchVersion, "torch.torch_version.TorchVersion")]
    try:
        with torch.serialization.safe_globals(admitted):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        forbidden = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's "Unsupported global: GLOBAL m.name ..."
        if forbidden:
            raise ForbiddenGlobal(*forbidden.group(1).rpartition(".")[::2]) from None
        reason = re.search(r"WeightsUnpickler error: (.+)", str(e))
        raise pickle.UnpicklingError(reason.group(1) if reason else str(e)) from None
    return _settle(obj, 0, {}, writable=True)
