"""Reading and validating voxel files (.npy, .npz). numpy only; never unpickles."""

from __future__ import annotations

import tokenize
import zipfile
from pathlib import Path

import numpy as np

from .errors import InputError, first_line


def load_voxels(path: str | Path, expected_voxels: int | None = None, key: str | None = None,
                rows: slice | None = None) -> np.ndarray:
    """Read one trial (V,) or many (N, V) from `path`; return float32 (N, V) or raise InputError.

    An .npz must hold exactly one array, or name it with `key`. An .npy is memory-mapped and only `rows`
    (all by default) are read and converted, so Brain-Diffuser's float64 (8859, V) file costs a float32 copy
    of the rows asked for, not a float64 copy of the whole file.
    """
    arr = read_array(path, key, "voxel")
    if rows is not None and arr.ndim in (1, 2):
        if arr.ndim == 1:
            arr = arr[None, :]                  # one trial is row 0: a selection that misses it selects nothing
        total = len(arr)
        arr = arr[rows]
        if len(arr) == 0 and total:
            stop = "" if rows.stop is None else rows.stop
            raise InputError(f"{path}: trials {rows.start or 0}:{stop} select nothing (the file holds {total} "
                             f"trial{'s' * (total != 1)}, rows 0 to {total - 1})")
    return validate_voxels(arr, str(path), expected_voxels)


def read_array(path: str | Path, key: str | None = None, what: str = "voxel") -> np.ndarray:
    """The array of an .npy (memory-mapped) or an .npz (exactly one array, or the one named `key`), numeric or
    not, or InputError naming the file: missing, a directory, unreadable, pickled or object, corrupt.
    `what` names the kind of file in messages."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a .npy or .npz {what} file")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    pickled = (f"{path}: holds a pickled or object array, which nsdedge never unpickles; "
               f"save a numeric array with np.save")
    if magic[:1] == b"\x80":
        raise InputError(pickled)
    if magic != b"\x93NUMPY" and magic[:4] != b"PK\x03\x04":
        raise InputError(f"{path}: not a readable .npy/.npz file (no numpy or zip header)")
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r")
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return loaded
        with loaded:
            names = list(loaded.files)
            if key is None:
                if len(names) != 1:
                    raise InputError(f"{path}: .npz holds {len(names)} arrays ({', '.join(names) or 'none'}); "
                                     f"it must hold exactly one")
                key = names[0]
            elif key not in names:
                raise InputError(f"{path}: .npz has no array {key!r} (has {', '.join(names)})")
            array = loaded[key]
        if not isinstance(array, np.ndarray):                  # a member that is not an .npy: numpy gives its bytes
            raise InputError(f"{path}: the .npz member {key!r} is not a numpy array (.npy) file")
        return array
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise InputError(pickled) from None
        raise InputError(f"{path}: not a readable numpy array file ({first_line(e)})") from None
    # truncated, an .npz whose data fails its CRC, a header numpy cannot parse (SyntaxError, tokenize's TokenError)
    # or one whose shape cannot be mapped (a negative dimension: OverflowError)
    except (OSError, EOFError, zipfile.BadZipFile, SyntaxError, tokenize.TokenError, OverflowError) as e:
        raise InputError(f"{path}: not a readable .npy/.npz file ({type(e).__name__}: {first_line(e)})") from None


def validate_voxels(arr: np.ndarray, name: str, expected_voxels: int | None = None) -> np.ndarray:
    """Check dtype, rank, emptiness, finiteness and length; return a float32 (N, V) array."""
    if arr.dtype.kind not in "fiub" or arr.dtype == np.bool_:
        raise InputError(f"{name}: voxels must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InputError(f"{name}: voxels must have shape (V,) or (N, V), got {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{name}: voxel array is empty (shape {arr.shape})")
    if expected_voxels is not None and arr.shape[1] != expected_voxels:
        raise InputError(f"{name}: {arr.shape[1]} voxels per trial, the subject's decoder expects {expected_voxels}")
    with np.errstate(over="ignore"):                  # float64 beyond float32's range becomes Inf: refused below
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).any(axis=1).sum())
        raise InputError(f"{name}: {bad} trial(s) contain NaN or Inf")
    return out


def scan_voxels(path: str | Path, rows: slice | None = None, expected_voxels: int | None = None,
                chunk: int = 256) -> tuple[list[int], int]:
    """Check the selected rows of a voxel file as load_voxels does, `chunk` rows at a time, keeping none of them:
    (row numbers, voxels per trial). A driver that hands rows to workers checks a whole file this way. An .npy is
    memory-mapped; an .npz (a zip: no memory map) is decompressed once here."""
    path = Path(path)
    start = (rows.start or 0) if rows is not None else 0
    try:                                     # header, dtype, rank and length, on the first selected row
        first = load_voxels(path, expected_voxels, rows=slice(start, start + 1))
    except InputError as e:
        if "select nothing" in str(e):
            load_voxels(path, expected_voxels, rows=rows)                # the same error, naming the user's range
        raise
    arr = np.load(path, allow_pickle=False, mmap_mode="r")
    if isinstance(arr, np.lib.npyio.NpzFile):
        with arr:
            arr = arr[arr.files[0]]
    if arr.ndim == 1:
        arr = arr[None, :]
    stop = min(len(arr), rows.stop if rows is not None and rows.stop is not None else len(arr))
    for lo in range(start, stop, chunk):
        hi = min(lo + chunk, stop)
        validate_voxels(arr[lo:hi], f"{path} (rows {lo}:{hi})", expected_voxels)
    return list(range(start, stop)), first.shape[1]
