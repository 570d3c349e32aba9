"""Checkpoint files: safe readers for PyTorch / safetensors / npz state dicts, conversion of
official DiT state dicts to Flax parameters, and the project's own Orbax parameter files.

Nothing here executes code from a file. PyTorch `.pt/.pth/.bin` files (the zip format that
`torch.save` has written since 1.6) are read with a restricted unpickler that can only build
tensors, ordered dicts and argparse namespaces; any other global in the pickle (os.system,
builtins.eval, ...) is refused before it is called, with an error naming the file.
TorchScript archives (`torch.jit.save`) are read the same way: their `__torch__.*` module
classes become inert `TorchScriptObject` dicts of the module's attributes; the TorchScript
code stored in the archive is never read.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import struct
import sys
import traceback
import zipfile
import zlib
from typing import Any, Callable, Mapping, Optional

import numpy as np
from flax import traverse_util

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
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": _BF16,
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
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
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_unused):
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("argparse", "Namespace"): Namespace,
    **{("torch", name): _StorageType(name) for name, dt in _TORCH_STORAGE_DTYPES.items() if dt is not None},
}


class TorchScriptObject(dict):
    """What a `__torch__.<module path>.<Class>` object in a TorchScript archive becomes: a dict of
    its pickled attributes (sub-modules, tensors as numpy arrays, ints, lists), with the
    TorchScript class name in `torch_class`. Building one runs nothing from the file."""

    torch_class = "__torch__"

    def __setstate__(self, state):
        if not isinstance(state, Mapping):
            raise UnsafeCheckpointError(f"{self.torch_class}: unexpected object state of type {type(state).__name__}.")
        self.update(state)

    def __repr__(self):
        return f"<{self.torch_class} {sorted(self)}>"


_TORCHSCRIPT_CLASSES: dict[str, type] = {}


def _torchscript_class(qualified_name: str) -> type:
    """One inert TorchScriptObject subclass per TorchScript class name (e.g. '__torch__.inceptionv3.Conv2dLayer')."""
    if qualified_name not in _TORCHSCRIPT_CLASSES:
        _TORCHSCRIPT_CLASSES[qualified_name] = type(
            "TorchScriptObject", (TorchScriptObject,), {"torch_class": qualified_name})
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
    def __init__(self, file, path: str, read_record: Callable[[str], bytes], *,
                 torchscript: bool = False, storage_dir: str = "data"):
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
            "Nothing was executed.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self._path}: unexpected persistent id {pid!r} in the pickle.")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            raw = self._read_record(f"{self._storage_dir}/{key}")
            dtype = storage_type.dtype
            if len(raw) < numel * dtype.itemsize:
                raise CheckpointError(f"{self._path}: storage {key} holds {len(raw)} bytes, "
                                      f"needs {numel * dtype.itemsize} ({numel} x {dtype}); the file is truncated or corrupt.")
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
            raise CheckpointError(f"{self._path}: malformed pickle in the checkpoint ({type(e).__name__}: {e}); "
                                  "only the allowed tensor-building functions were called.") from None


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
        what = ("a legacy (pre-1.6) PyTorch file; re-save it with a current torch.save"
                if head[:1] == b"\x80" else "not a PyTorch zip checkpoint (or it is truncated)")
        raise CheckpointError(f"{path}: {what}.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise CheckpointError(f"{path}: no data.pkl record; not a torch.save checkpoint.")
            prefix = pkl[0][: -len("data.pkl")]
            byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
            if byteorder != "little":
                raise CheckpointError(f"{path}: big-endian checkpoints are not supported.")

            def read_record(name: str) -> bytes:
                try:
                    return archive.read(prefix + name)
                except KeyError:
                    raise CheckpointError(f"{path}: the record {name} is missing; the file is incomplete.") from None

            torchscript = prefix + "constants.pkl" in names
            unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pkl[0])), path, read_record,
                                             torchscript=torchscript)
            obj = unpickler.load()
            if torchscript:
                constants = _RestrictedUnpickler(io.BytesIO(archive.read(prefix + "constants.pkl")), path,
                                                 read_record, torchscript=True, storage_dir="constants").load()
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

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": _BF16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a .safetensors file, validating the header against the file's real size."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file.")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size - 8} after the length.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}).") from None
        data = f.read()
    out, spans = {}, []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry {info!r}.") from None
        want = int(np.prod(shape)) * dtype.itemsize
        if not (0 <= start <= end <= len(data)) or end - start != want:
            raise CheckpointError(
                f"{path}: tensor {key!r} claims bytes [{start}, {end}) for shape {shape} {dtype} "
                f"({want} bytes) but the data section has {len(data)} bytes; the header lies or the file is truncated.")
        out[key] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape).copy()
        spans.append((start, end, key))
    # The format stores the tensors back to back: overlapping or gapped offsets mean a bad header.
    spans.sort()
    for (_, prev_end, prev), (start, _, key) in zip([(0, 0, None)] + spans, spans):
        if start != prev_end:
            what = f"overlaps tensor {prev!r}" if start < prev_end else f"leaves a gap of {start - prev_end} bytes"
            raise CheckpointError(f"{path}: tensor {key!r} starts at byte {start}, which {what}; "
                                  "the header is corrupt.")
    if spans and spans[-1][1] != len(data):
        raise CheckpointError(f"{path}: the tensors end at byte {spans[-1][1]} but the data section has "
                              f"{len(data)} bytes; the header is corrupt.")
    return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items() if v is not None}
    header, offset, blobs = {}, 0, []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        header[key] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        blobs.append(arr.tobytes())
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


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
        raise CheckpointError(f"{path}: unknown checkpoint type {ext!r}; expected .pt/.pth/.bin, "
                              ".safetensors or .npz (or an Orbax directory from dit_jax.convert).")
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
            k = k[len(prefix):]
        if k.startswith("module."):
            k = k[len("module."):]
        if not isinstance(v, np.ndarray):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor.")
        flat[k] = v
    if not flat:
        raise CheckpointError(f"{path}: no tensors found" + (f" under the prefix {prefix!r}." if prefix else "."))
    return flat


# ----------------------------------------------------------------------------------------
# Official DiT names <-> Flax parameter paths
# ----------------------------------------------------------------------------------------

def _torch_key(path: tuple[str, ...]) -> str:
    """Flax path ('blocks_3', 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight'."""
    parts = []
    for i, p in enumerate(path):
        last = i == len(path) - 1
        m = re.fullmatch(r"(blocks|mlp)_(\d+)", p)
        if m:
            parts += [m.group(1), m.group(2)]
        elif p == "adaLN_modulation":
            parts += [p, "1"]
        elif p == "x_embedder":
            parts += [p, "proj"]
        elif p == "embedding_table" and last:
            parts += [p, "weight"]
        elif last and p in ("kernel", "scale"):
            parts.append("weight")
        else:
            parts.append(p)
    return ".".join(parts)


def _to_flax(path: tuple[str, ...], value: np.ndarray, target_shape: tuple) -> np.ndarray:
    if path[-1] == "kernel" and path[0] == "x_embedder" and value.ndim == 4:
        # Conv2d weight [D, C, p, q] -> patch Linear [p*q*C, D] with (p, q, c) flattening.
        d = value.shape[0]
        return value.transpose(2, 3, 1, 0).reshape(-1, d)
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T
    return value


def _from_flax(path: tuple[str, ...], value: np.ndarray, patch_size: int) -> np.ndarray:
    if path[-1] == "kernel" and path[0] == "x_embedder":
        d = value.shape[1]
        c = value.shape[0] // (patch_size * patch_size)
        return value.reshape(patch_size, patch_size, c, d).transpose(3, 2, 0, 1)
    if path[-1] == "kernel":
        return value.T
    return value


def describe_state_dict(sd: Mapping[str, np.ndarray]) -> Optional[dict]:
    """Infers DiT hyper-parameters from an official-layout state dict (None if it is not one)."""
    try:
        _, tokens, hidden = sd["pos_embed"].shape
        d, c, p, _ = sd["x_embedder.proj.weight"].shape
        depth = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
        out = sd["final_layer.linear.weight"].shape[0] // (p * p)
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, ValueError):
        return None
    grid = int(round(np.sqrt(tokens)))
    return dict(hidden_size=int(hidden), depth=depth, patch_size=int(p), in_channels=int(c),
                input_size=int(grid * p), learn_sigma=out == 2 * c, num_classes_plus_null=int(rows))


def _matching_names(info: dict) -> list[str]:
    from dit_jax import models
    names = []
    for name in models.MODEL_NAMES:
        kw = models.model_kwargs_from_name(name)
        if (kw["depth"], kw["hidden_size"], kw["patch_size"]) == (info["depth"], info["hidden_size"], info["patch_size"]):
            names.append(name)
    return names


def dit_params_from_state_dict(sd: Mapping[str, np.ndarray], model, *, source: str = "state dict") -> dict:
    """Official-layout DiT state dict -> Flax params for `model`, checking every key and shape."""
    from dit_jax import models
    target = models.abstract_params(model)
    items, used, missing, mismatched = [], set(), [], []
    for path, leaf in traverse_util.flatten_dict(target).items():
        key = _torch_key(path)
        if key not in sd:
            missing.append(key)
            continue
        used.add(key)
        value = _to_flax(path, np.asarray(sd[key]), leaf.shape)
        if tuple(value.shape) != tuple(leaf.shape):
            want = _from_flax(path, np.zeros(leaf.shape, np.bool_), model.patch_size).shape
            mismatched.append(f"{key}: file {tuple(sd[key].shape)}, model {tuple(want)}")
            continue
        items.append((path, value.astype(np.float32)))
    unexpected = sorted(set(sd) - used)
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit the model (depth {model.depth}, hidden {model.hidden_size}, "
                 f"patch {model.patch_size}, input {model.input_size}, {model.num_classes} classes, "
                 f"block {model.block_type}):"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = keys[:12] + ([f"... ({len(keys) - 12} more)"] if len(keys) > 12 else [])
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
        info = describe_state_dict(sd)
        if info:
            fits = _matching_names(info)
            lines.append(
                f"  the file looks like depth {info['depth']}, hidden {info['hidden_size']}, patch "
                f"{info['patch_size']}, input_size {info['input_size']} ({info['input_size'] * 8}px images), "
                f"{info['num_classes_plus_null'] - 1} classes + null"
                + (f": model name {' or '.join(fits)}" if fits else ""))
        raise CheckpointError("\n".join(lines))
    return traverse_util.unflatten_dict(dict(items))


def state_dict_from_dit_params(params: Mapping, patch_size: int) -> dict[str, np.ndarray]:
    """Flax params -> official-layout state dict (numpy, float32)."""
    return {_torch_key(path): np.asarray(_from_flax(path, np.asarray(v, np.float32), patch_size))
            for path, v in traverse_util.flatten_dict(params).items()}


# ----------------------------------------------------------------------------------------
# The project's own parameter checkpoints (Orbax)
# ----------------------------------------------------------------------------------------

MODEL_CONFIG_FILE = "dit_model.json"


def save_params(directory: str, params: Mapping, model_config: Mapping) -> str:
    """Writes `params` as an Orbax checkpoint in `directory` (absolute) with the model's config."""
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise CheckpointError(f"{directory}: already exists; choose a new output path.")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "params"), {"params": params})
    with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
        json.dump(dict(model_config), f, indent=1, sort_keys=True)
    return directory


def saved_model_config(path: str) -> Optional[dict]:
    """The model config stored with a dit_jax parameter checkpoint, or None for other paths."""
    cfg_path = os.path.join(path, MODEL_CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path) as f:
        return json.load(f)


def load_params(directory: str, model=None) -> tuple[dict, dict]:
    """Reads (params, model_config) written by `save_params`; checks shapes against `model`."""
    import jax
    import orbax.checkpoint as ocp
    directory = os.path.abspath(directory)
    config = saved_model_config(directory)
    if config is None:
        raise CheckpointError(f"{directory}: not a dit_jax parameter checkpoint (no {MODEL_CONFIG_FILE}).")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(os.path.join(directory, "params"))
        except Exception as e:  # orbax raises many types for bad trees/files
            raise CheckpointError(f"{directory}: cannot restore parameters ({type(e).__name__}: {e}).") from None
    params = jax.tree_util.tree_map(np.asarray, restored["params"])
    if model is not None:  # Orbax does not check shapes against a target; do it here
        from dit_jax import models
        want = {path: tuple(v.shape) for path, v in traverse_util.flatten_dict(models.abstract_params(model)).items()}
        have = {path: tuple(v.shape) for path, v in traverse_util.flatten_dict(params).items()}
        wrong = [f"{'/'.join(p)}: file {have.get(p)}, model {want.get(p)}"
                 for p in sorted(set(want) | set(have)) if want.get(p) != have.get(p)]
        if wrong:
            shown = wrong[:8] + ([f"... ({len(wrong) - 8} more)"] if len(wrong) > 8 else [])
            raise CheckpointError(f"{directory}: parameters do not fit the model ({len(wrong)} differ; the "
                                  f"checkpoint was saved for {config}): " + "; ".join(shown))
    return params, config


def load_dit_params(path: str, model, *, which: str = "ema", prefix: str = "") -> dict:
    """Parameters for `model` from any supported file: an Orbax directory written by
    `save_params`/`dit_jax.convert`, or an official-layout .pt/.pth/.bin/.safetensors/.npz."""
    if os.path.isdir(path):
        return load_params(path, model)[0]
    sd = read_state_dict(path, which=which, prefix=prefix)
    return dit_params_from_state_dict(sd, model, source=os.fspath(path))


# ----------------------------------------------------------------------------------------
# Training checkpoints (Orbax CheckpointManager)
# ----------------------------------------------------------------------------------------

def train_checkpoint_manager(directory: str, config=None, *, read_only: bool = False):
    """Async Orbax manager keeping the last `config.keep_checkpoints` steps plus every
    `config.keep_every_steps`-th; leftovers of interrupted saves are removed in the background
    from the start. `read_only` (for readers such as sampling, which may run beside training):
    never writes, deletes or cleans anything. Close it with `close_manager`."""
    import orbax.checkpoint as ocp
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False)
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, keep_period=config.keep_every_steps or None,
            enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def close_manager(manager) -> None:
    """Waits for pending saves and for the start-up clean-up of interrupted saves (Orbax itself
    waits for that only at the next save, so a run stopping before one would exit with it still
    running), then closes the manager."""
    wait_for_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait_for_cleanup is not None:
        try:
            wait_for_cleanup()
        except Exception:  # a failed clean-up of leftovers must not hide why the run stopped
            pass
    manager.close()


FINGERPRINT_ITEM = "fingerprint"


def _key_name(key) -> str:
    """A key-path entry as a plain name, the same for a TrainState field and the dict key
    Orbax restores it under (and for a tuple index and its restored list index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_digest(x):
    """Two uint32 sums of a leaf's raw bits, each element weighted by an odd hash of its
    index. Wrapping integer sums do not depend on the reduction order (sharding, devices),
    and changing any one element changes both sums."""
    import jax
    import jax.numpy as jnp
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8-byte values: a trailing dim of 2
    index, stride = jnp.zeros(u.shape, jnp.uint32), 1
    for d in reversed(range(u.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
        stride *= u.shape[d]

    def weight(h):
        h = h * jnp.uint32(0x9E3779B1)
        h = h ^ (h >> 16)
        h = h * jnp.uint32(0x85EBCA6B)
        return (h ^ (h >> 13)) | jnp.uint32(1)

    return jnp.stack([jnp.sum(u * weight(index), dtype=jnp.uint32),
                      jnp.sum(u * weight(index ^ jnp.uint32(0x5BD1E995)), dtype=jnp.uint32)])


def state_fingerprint(state, data_state: Optional[dict] = None) -> dict:
    """{"state": {leaf path: [two uint32 digests]}, "data": sha256 of the data state}: saved
    with every training checkpoint and checked on restore, so a checkpoint whose bytes changed
    after it was written (a garbled or half-overwritten file) is never loaded silently."""
    import hashlib
    import jax
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    names = ["/".join(_key_name(k) for k in path) for path, _ in flat]
    digests = jax.device_get(_digest_leaves([leaf for _, leaf in flat]))
    out = {"state": {n: [int(v) for v in np.asarray(d)] for n, d in zip(names, digests)}}
    if data_state is not None:
        out["data"] = hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()
    return out


def _digest_leaves(leaves):
    """Leaves this process holds whole are digested on the host (no device programs run beside
    the training step's); others (multi-host sharded) by one small compiled program per shape."""
    import jax
    global _DIGEST_FN
    out = []
    for leaf in leaves:
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            out.append(_leaf_digest_host(np.asarray(jax.device_get(leaf))))
            continue
        if _DIGEST_FN is None:
            _DIGEST_FN = jax.jit(_leaf_digest)
        out.append(_DIGEST_FN(leaf))
    return out


def _leaf_digest_host(x: np.ndarray) -> np.ndarray:
    """`_leaf_digest` in numpy: the same two wrapping uint32 sums."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    if x.dtype.itemsize == 8:
        u = x.view(np.uint32).reshape(*x.shape, 2)
    else:
        u = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
    u = u.astype(np.uint32)
    index = np.arange(u.size, dtype=np.uint64).astype(np.uint32).reshape(u.shape)

    def weight(h):
        with np.errstate(over="ignore"):
            h = h * np.uint32(0x9E3779B1)
            h = h ^ (h >> np.uint32(16))
            h = h * np.uint32(0x85EBCA6B)
            return (h ^ (h >> np.uint32(13))) | np.uint32(1)

    with np.errstate(over="ignore"):
        return np.stack([np.sum(u * weight(index), dtype=np.uint32),
                         np.sum(u * weight(index ^ np.uint32(0x5BD1E995)), dtype=np.uint32)])


_DIGEST_FN = None


def save_train_state(manager, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Saves the train state (params, EMA, optimizer, step, RNG), the data iterator state and
    their fingerprint (checked by `restore_checkpoint`)."""
    import orbax.checkpoint as ocp
    fingerprint = {"step": int(step), **state_fingerprint(state, data_state)}
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=ocp.args.JsonSave(data_state),
                                                      **{FINGERPRINT_ITEM: ocp.args.JsonSave(fingerprint)}),
                        force=force)


def _step_dir(manager, step: int):
    """The step's directory as an etils Path (local or cloud storage)."""
    return manager.directory / str(step)


def _is_late_callback_to_closed_loop(args) -> bool:
    """An exception of a TensorStore read that completed after Orbax's restore had already
    failed on another read and closed its asyncio loop: `call_soon_threadsafe` on the closed loop."""
    if args.exc_type is not RuntimeError or str(args.exc_value) != "Event loop is closed":
        return False
    frames = [f.f_code.co_name for f, _ in traceback.walk_tb(args.exc_traceback)]
    return "call_soon_threadsafe" in frames


def _drop_late_callbacks_to_closed_loops() -> None:
    """Installs (once) an unraisable-exception hook that drops `_is_late_callback_to_closed_loop`
    reports, which would otherwise print dozens of harmless tracebacks after a failed restore.
    Every other unraisable exception goes to the hook that was there before."""
    previous = sys.unraisablehook
    if getattr(previous, "_dit_jax_filter", False):
        return

    def hook(args):
        if not _is_late_callback_to_closed_loop(args):
            previous(args)

    hook._dit_jax_filter = True
    sys.unraisablehook = hook


def restore_checkpoint(manager, step: int, abstract_state=None, shardings=None, log=print):
    """(state, data_state) of training checkpoint `step`, placed as `abstract_state` with
    `shardings` (or as saved, when None) and verified against the fingerprint saved with it.
    Raises CheckpointError naming the step and what is wrong with it."""
    import jax
    import orbax.checkpoint as ocp
    target = None
    if abstract_state is not None:
        target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        abstract_state, shardings)
    where = f"checkpoint step {step} in {manager.directory}"
    items = dict(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    has_fingerprint = (_step_dir(manager, step) / FINGERPRINT_ITEM).exists()
    if has_fingerprint:
        items[FINGERPRINT_ITEM] = ocp.args.JsonRestore()
    _drop_late_callbacks_to_closed_loops()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax/TensorStore raise many types for missing or damaged files
        while (e.__cause__ or e.__context__) is not None:  # the innermost error names the file
            e = e.__cause__ or e.__context__
        message = " ".join(str(e).split()).split(" See full TensorStore details")[0]
        raise CheckpointError(f"{where} cannot be restored ({type(e).__name__}: {message[:300]})") from None
    if not has_fingerprint:
        log(f"warning: {where} has no fingerprint (written by an older version); its contents are not verified")
        return restored["state"], restored["data"]
    saved = restored[FINGERPRINT_ITEM]
    got = {"step": int(step), **state_fingerprint(restored["state"], restored["data"])}
    if saved != got:
        wrong = sorted(k for k in set(saved.get("state", {})) | set(got["state"])
                       if saved.get("state", {}).get(k) != got["state"].get(k))
        if saved.get("data") != got.get("data"):
            wrong.append("the data iterator state")
        if saved.get("step") != step:
            wrong.append(f"the step (saved as {saved.get('step')})")
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise CheckpointError(f"{where} is corrupt: its contents do not match the fingerprint written with it "
                              f"({shown})")
    return restored["state"], restored["data"]


def restore_train_state(manager, abstract_state=None, shardings=None, log=print, *, set_aside_bad: bool = False):
    """(state, data_state, step) from the newest checkpoint that restores and verifies, or None
    if there is none. A checkpoint that fails is reported by step and the previous one is
    tried; nothing is taken from a checkpoint that fails. With `set_aside_bad`, failed steps
    newer than the one restored are moved to `<checkpoints>.unusable/` (so that training can
    write those steps again). If every checkpoint fails, CheckpointError: none is touched."""
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, data = restore_checkpoint(manager, step, abstract_state, shardings, log=log)
        except CheckpointError as e:
            log(f"{e}; trying the previous one")
            failures.append(step)
            continue
        if failures and set_aside_bad:
            _set_aside(manager, failures, log)
        return state, data, step
    if failures:
        raise CheckpointError(f"none of the checkpoints in {manager.directory} (steps "
                              f"{', '.join(map(str, sorted(failures)))}) could be restored; they were left as they "
                              "are. Move them away to start over, or restore a backup.")
    return None


def _set_aside(manager, steps, log) -> None:
    import time
    import jax
    if jax.process_index() == 0:
        root = manager.directory.parent / (manager.directory.name + ".unusable")
        root.mkdir(parents=True, exist_ok=True)
        for step in steps:
            dest = root / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
            _step_dir(manager, step).rename(dest)
            log(f"moved the unusable checkpoint step {step} to {dest}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("dit_jax.set_aside_checkpoints")
    manager.reload()
