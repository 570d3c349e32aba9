"""State dicts read from files: PyTorch `.pt/.pth/.bin`, TorchScript archives, `.safetensors`
and `.npz`, each as flat {name: numpy array} without PyTorch; also `CheckpointError`, the error
every checkpoint reader in dit_jax raises for a file it cannot use.

Nothing here executes code from a file. PyTorch `.pt/.pth/.bin` files (the zip format that
`torch.save` has written since 1.6) are read with a restricted unpickler that can only build
tensors, ordered dicts and argparse namespaces; any other global in the pickle (os.system,
builtins.eval, ...) is refused before it is called, with an error naming the file.
TorchScript archives (`torch.jit.save`) are read the same way: their `__torch__.*` module
classes become inert `TorchScriptObject` dicts of the module's attributes; the TorchScript
code stored in the archive is never read. `.safetensors` files are read and written with the
`safetensors` package; a file it refuses is a CheckpointError saying what is wrong with it.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, Callable, Mapping, Optional

import numpy as np
import safetensors
import safetensors.numpy

try:  # bfloat16 for numpy; ships with jax
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the file and the reason."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks for something other than tensor storage."""


# ----------------------------------------------------------------------------------------
# PyTorch zip checkpoints, read without PyTorch
# ----------------------------------------------------------------------------------------

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": _BF16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    """Stand-in for torch.XStorage classes: only carries the element dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _TORCH_STORAGE_DTYPES[name]


class Namespace(dict):
    """What an argparse.Namespace in a checkpoint becomes: a dict with attribute access."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e

    def __setstate__(self, state):
        self.update(state or {})


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
    size, stride = tuple(size), tuple(stride)
    if not size:
        return storage[offset].copy()
    extent = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride) if n > 0)
    if any(n == 0 for n in size):
        return np.zeros(size, storage.dtype)
    if extent > storage.size:
        raise CheckpointError("a tensor's size/stride points past the end of its storage")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_unused):
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("argparse", "Namespace"): Namespace,
    **{
        ("torch", name): _StorageType(name)
        for name, dt in _TORCH_STORAGE_DTYPES.items()
        if dt is not None
    },
}


class TorchScriptObject(dict):
    """What a `__torch__.<module path>.<Class>` object in a TorchScript archive becomes: a dict of
    its pickled attributes (sub-modules, tensors as numpy arrays, ints, lists), with the
    TorchScript class name in `torch_class`. Building one runs nothing from the file."""

    torch_class = "__torch__"

    def __setstate__(self, state):
        if not isinstance(state, Mapping):
            raise UnsafeCheckpointError(
                f"{self.torch_class}: unexpected object state of type {type(state).__name__}."
            )
        self.update(state)

    def __repr__(self):
        return f"<{self.torch_class} {sorted(self)}>"


_TORCHSCRIPT_CLASSES: dict[str, type] = {}


def _torchscript_class(qualified_name: str) -> type:
    """One inert TorchScriptObject subclass per TorchScript class name
    (e.g. '__torch__.inceptionv3.Conv2dLayer')."""
    if qualified_name not in _TORCHSCRIPT_CLASSES:
        _TORCHSCRIPT_CLASSES[qualified_name] = type(
            "TorchScriptObject", (TorchScriptObject,), {"torch_class": qualified_name}
        )
    return _TORCHSCRIPT_CLASSES[qualified_name]


def _build_intlist(values) -> list:
    if not all(isinstance(v, int) for v in values):
        raise UnsafeCheckpointError("torch.jit._pickle.build_intlist got non-integers.")
    return list(values)


# Extra globals a TorchScript archive's data.pkl may ask for (besides `__torch__.*` classes).
_TORCHSCRIPT_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch.jit._pickle", "build_intlist"): _build_intlist,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(
        self,
        file,
        path: str,
        read_record: Callable[[str], bytes],
        *,
        torchscript: bool = False,
        storage_dir: str = "data",
    ):
        super().__init__(file)
        self._path, self._read_record = path, read_record
        self._torchscript, self._storage_dir = torchscript, storage_dir
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if self._torchscript:
            if (module, name) in _TORCHSCRIPT_GLOBALS:
                return _TORCHSCRIPT_GLOBALS[(module, name)]
            if module == "__torch__" or module.startswith("__torch__."):
                return _torchscript_class(f"{module}.{name}")
        raise UnsafeCheckpointError(
            f"{self._path}: refused to load: its pickle asks for the global "
            f"'{module}.{name}', which a tensor checkpoint never needs (only tensors, "
            "ordered dicts, argparse namespaces and TorchScript module attributes are allowed). "
            "Nothing was executed."
        )

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
        ):
            raise UnsafeCheckpointError(
                f"{self._path}: unexpected persistent id {pid!r} in the pickle."
            )
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            raw = self._read_record(f"{self._storage_dir}/{key}")
            dtype = storage_type.dtype
            if len(raw) < numel * dtype.itemsize:
                raise CheckpointError(
                    f"{self._path}: storage {key} holds {len(raw)} bytes, needs "
                    f"{numel * dtype.itemsize} ({numel} x {dtype}); "
                    "the file is truncated or corrupt."
                )
            self._storages[key] = np.frombuffer(raw, dtype=dtype, count=numel)
        return self._storages[key]

    def load(self):
        """Unpickles; a pickle that misuses the allowed callables (wrong arguments or state)
        is a CheckpointError naming the file, like any other damaged checkpoint."""
        try:
            return super().load()
        except (CheckpointError, pickle.UnpicklingError):
            raise
        except (TypeError, ValueError, AttributeError, IndexError, KeyError, RecursionError) as e:
            raise CheckpointError(
                f"{self._path}: malformed pickle in the checkpoint ({type(e).__name__}: {e}); "
                "only the allowed tensor-building functions were called."
            ) from None


def read_torch_file(path: str) -> Any:
    """Reads a `torch.save` zip file into nested dicts of numpy arrays, without PyTorch.

    A TorchScript archive (`torch.jit.save`: data.pkl + constants.pkl + code/) gives its root
    module as a `TorchScriptObject` (sub-modules nested, parameters as numpy arrays); its
    constants table is in `.constants`. `flatten_torchscript` turns it into a state dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file.")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        what = (
            "a legacy (pre-1.6) PyTorch file; re-save it with a current torch.save"
            if head[:1] == b"\x80"
            else "not a PyTorch zip checkpoint (or it is truncated)"
        )
        raise CheckpointError(f"{path}: {what}.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise CheckpointError(f"{path}: no data.pkl record; not a torch.save checkpoint.")
            prefix = pkl[0][: -len("data.pkl")]
            byteorder = "little"
            if prefix + "byteorder" in names:
                byteorder = archive.read(prefix + "byteorder").decode()
            if byteorder != "little":
                raise CheckpointError(f"{path}: big-endian checkpoints are not supported.")

            def read_record(name: str) -> bytes:
                try:
                    return archive.read(prefix + name)
                except KeyError:
                    raise CheckpointError(
                        f"{path}: the record {name} is missing; the file is incomplete."
                    ) from None

            torchscript = prefix + "constants.pkl" in names
            unpickler = _RestrictedUnpickler(
                io.BytesIO(archive.read(pkl[0])), path, read_record, torchscript=torchscript
            )
            obj = unpickler.load()
            if torchscript:
                constants = _RestrictedUnpickler(
                    io.BytesIO(archive.read(prefix + "constants.pkl")),
                    path,
                    read_record,
                    torchscript=True,
                    storage_dir="constants",
                ).load()
                if isinstance(obj, TorchScriptObject):
                    obj.constants = constants
            return obj
    except (zipfile.BadZipFile, EOFError, zlib.error, struct.error) as e:
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch checkpoint ({e}).") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: corrupt pickle in the checkpoint ({e}).") from None


def flatten_torchscript(module: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """TorchScriptObject tree -> {'net.layers.conv.weight': array, ...}: every tensor attribute
    under its dotted module path (ints, flags and lists are left out)."""
    flat = {}
    for key, value in module.items():
        name = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            flat[name] = value
        elif isinstance(value, TorchScriptObject):
            flat.update(flatten_torchscript(value, name + "."))
    return flat


# ----------------------------------------------------------------------------------------
# safetensors and npz
# ----------------------------------------------------------------------------------------

# Bytes per element of each safetensors dtype, to say what is wrong with a refused file.
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a .safetensors file (bfloat16 as ml_dtypes.bfloat16) with the safetensors package.
    A file it refuses is a CheckpointError naming the file and, where its header shows it,
    what is wrong: sizes or offsets that do not fit the data, a truncated file, bad JSON."""
    path = os.fspath(path)
    try:
        return safetensors.numpy.load_file(path)
    except safetensors.SafetensorError as e:
        problem = _safetensors_problem(path) or f"not a usable safetensors file ({e})."
        raise CheckpointError(f"{path}: {problem}") from None
    except (AttributeError, TypeError) as e:  # float8/float4: the package looks them up on numpy
        raise CheckpointError(f"{path}: holds a tensor type numpy cannot read ({e}).") from None


def _safetensors_problem(path: str) -> Optional[str]:
    """What the header of a refused safetensors file says is wrong with it, checked against the
    file's size (the format stores the tensors back to back, covering the data exactly);
    None when the header shows nothing wrong."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "too short to be a safetensors file."
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"header claims {n} bytes but the file has {size - 8} after the length."
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"the safetensors header is not valid JSON ({e})."
    if not isinstance(header, dict):
        return "the safetensors header is not a JSON object."
    data_size, spans = size - 8 - n, []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            itemsize = _SAFETENSORS_ITEMSIZE[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return f"tensor {key!r} has a malformed header entry {info!r}."
        want = int(np.prod(shape)) * itemsize
        if not (0 <= start <= end <= data_size) or end - start != want:
            return (
                f"tensor {key!r} claims bytes [{start}, {end}) for shape {shape} "
                f"{info['dtype']} ({want} bytes) but the data section has {data_size} bytes; "
                "the header lies or the file is truncated."
            )
        spans.append((start, end, key))
    spans.sort()
    for (_, prev_end, prev), (start, _, key) in zip([(0, 0, None)] + spans, spans):
        if start != prev_end:
            what = (
                f"overlaps tensor {prev!r}"
                if start < prev_end
                else f"leaves a gap of {start - prev_end} bytes"
            )
            return f"tensor {key!r} starts at byte {start}, which {what}; the header is corrupt."
    end = spans[-1][1] if spans else 0
    if end != data_size:
        return (
            f"the tensors end at byte {end} but the data section has {data_size} bytes; "
            "the header is corrupt."
        )
    return None


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes {name: array} as a .safetensors file (0-d arrays keep their shape)."""
    safetensors.numpy.save_file(
        {k: np.asarray(v, order="C") for k, v in tensors.items()}, os.fspath(path)
    )


def read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read as .npz ({e}).") from None


def read_state_dict(path: str, *, which: str = "ema", prefix: str = "") -> dict[str, np.ndarray]:
    """A flat {name: array} state dict from .pt/.pth/.bin, .safetensors or .npz.

    For training checkpoints ({"model", "ema", "opt", "args"}) `which` picks the entry
    ("ema" by default, as the official sampling code does). `prefix` selects and strips a
    key prefix (e.g. "state_dict/"); a DistributedDataParallel "module." prefix is dropped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file.")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth", ".bin", ".ckpt"):
        obj = read_torch_file(path)
        if isinstance(obj, TorchScriptObject):
            obj = flatten_torchscript(obj)
    elif ext == ".safetensors":
        obj = read_safetensors(path)
    elif ext == ".npz":
        obj = read_npz(path)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {ext!r}; expected .pt/.pth/.bin, "
            ".safetensors or .npz (or an Orbax directory from dit_jax.convert)."
        )
    if isinstance(obj, Mapping) and which in obj and isinstance(obj[which], Mapping):
        obj = obj[which]
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        raise CheckpointError(f"{path}: has no {which!r} entry (it has {sorted(obj)}).")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict.")
    flat = {}
    for k, v in obj.items():
        if prefix:
            if not k.startswith(prefix):
                continue
            k = k[len(prefix) :]
        if k.startswith("module."):
            k = k[len("module.") :]
        if not isinstance(v, np.ndarray):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor.")
        flat[k] = v
    if not flat:
        where = f" under the prefix {prefix!r}." if prefix else "."
        raise CheckpointError(f"{path}: no tensors found{where}")
    return flat
