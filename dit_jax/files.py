"""Small files written whole: a crash, a kill or a reader beside the writer sees either the old
file or the complete new one, never a part (write to a temporary name, fsync, rename). And the
one cache directory of the project."""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np


def write_atomically(path: str, data: Union[bytes, str]) -> None:
    """Replaces `path` by `data` (text is written as UTF-8), creating its directory if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"  # one writer per file; a killed write's leftover is replaced by the next
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """The bytes of an uncompressed `.npz` of `arrays` (for `write_atomically`)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def cache_dir() -> str:
    """$DIT_JAX_CACHE, else ~/.cache/dit_jax: the embedded dataset, the digit classifier and
    downloaded weights live here."""
    return os.environ.get("DIT_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dit_jax"
    )
