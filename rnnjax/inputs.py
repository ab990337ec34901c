"""Reading input sequences: ``.npy``, ``.csv`` and ``.txt`` files of numbers, each value checked.

A file holds one sequence: all its numbers on one line, or one number per line (a column). Every
value must be a plain decimal number (``3``, ``-0.5``, ``1e-3``; no ``1_000``, ``0x10``, ``nan``
or ``inf``) within float32's range, since the networks compute in float32: 0, or a magnitude
from its smallest normal number (1.175e-38) to its largest (3.403e38). A UTF-8 byte-order
mark, as spreadsheets write it, is skipped. Whatever is wrong is named with its line and column
(text) or index (``.npy``) in a ``ValueError``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

__all__ = ["FLOAT32_MAX", "FLOAT32_TINY", "parse_number", "read_sequence"]

FLOAT32_MAX = float(np.finfo(np.float32).max)
# The smallest normal float32 magnitude: XLA flushes smaller ones to 0 on a CPU, so a non-zero
# value below it would be read as 0 without a word; it is refused instead.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TXT_FIELD = re.compile(r"[^ \t]+")


def _cut(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _show(text: str) -> str:
    return repr(_cut(text))


def parse_number(text: str) -> float:
    """Returns the float that ``text`` spells as a plain decimal number within float32's range.

    Raises ``ValueError`` saying why not, e.g. ``'1_000' is not a number``.

    Example:
      >>> parse_number("-2.5e3")
      -2500.0
    """
    if not _NUMBER.fullmatch(text):
        kind = "a finite number" if text.lower().lstrip("+-") in ("nan", "inf", "infinity") else "a number"
        raise ValueError(f"{_show(text)} is not {kind}")
    value = float(text)
    if not abs(value) <= FLOAT32_MAX:
        raise ValueError(f"{_cut(text)} is beyond float32's range (largest magnitude {FLOAT32_MAX:.4g})")
    if abs(value) < FLOAT32_TINY and re.search(r"[1-9]", text.lower().split("e")[0]):
        raise ValueError(f"{_cut(text)} is below float32's range (smallest normal magnitude {FLOAT32_TINY:.4g}, "
                         "where it would be read as 0); write 0, or scale the sequence")
    return value


def read_sequence(path: str | os.PathLike, *, bits: bool = False) -> np.ndarray:
    """Reads one sequence of numbers from a ``.npy``, ``.csv`` (commas) or ``.txt`` (spaces or
    tabs) file.

    Args:
      path: the file.
      bits: accept only 0 and 1 (the input of the running-count network).

    Returns:
      A 1-D float64 array of at least one value, each finite and within float32's range.

    Raises:
      ValueError: naming the file and, where it applies, the line and column or the index.

    Example:
      >>> import tempfile, pathlib
      >>> path = pathlib.Path(tempfile.mkdtemp()) / "seq.csv"
      >>> _ = path.write_text("\\ufeff3,-5,7,-2\\n")  # with the byte-order mark spreadsheets write
      >>> read_sequence(path)
      array([ 3., -5.,  7., -2.])
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv", ".txt"):
        raise ValueError(f"{path}: expected a .npy, .csv or .txt file; received '{suffix or path.name}'")
    try:
        values = _read_npy(path, bits) if suffix == ".npy" else _read_text(path, suffix, bits)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder; expected a file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    if values.size == 0:
        raise ValueError(f"{path}: holds no numbers")
    return values


def _read_text(path: Path, suffix: str, bits: bool) -> np.ndarray:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    rows = []  # per non-blank line: (line number, [values])
    for line_number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip(" \t"):
            continue
        row = []
        for token, column in _fields(line, suffix):
            where = f"{path}: line {line_number}, column {column}"
            if not token:
                raise ValueError(f"{where}: empty field; expected a number between the commas")
            try:
                value = parse_number(token)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if bits and value not in (0.0, 1.0):
                raise ValueError(f"{where}: {_cut(token)} is not 0 or 1 (the count network reads bits)")
            row.append(value)
        rows.append((line_number, row))
    if len(rows) > 1:
        for line_number, row in rows:
            if len(row) > 1:
                raise ValueError(f"{path}: line {line_number}: {len(row)} numbers on one line of a "
                                 f"{len(rows)}-line file; expected one sequence: all on one line, "
                                 "or one number per line")
    return np.asarray([v for _, row in rows for v in row], np.float64)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _fields(line: str, suffix: str):
    """Yields ``(token, column)`` for each field of a line: comma-separated in a .csv (blanks
    around a field ignored), blank-separated in a .txt; columns count characters from 1."""
    if suffix == ".txt":
        for match in _TXT_FIELD.finditer(line):
            yield match.group(), match.start() + 1
        return
    start = 0
    for field in line.split(","):
        yield field.strip(" \t"), start + len(field) - len(field.lstrip(" \t")) + 1
        start += len(field) + 1


def _read_npy(path: Path, bits: bool) -> np.ndarray:
    with open(path, "rb") as f:
        signature = f.read(6)
        if signature.startswith(b"PK"):
            raise ValueError(f"{path}: holds an .npz archive; expected one array (np.save)")
        if signature != b"\x93NUMPY":
            raise ValueError(f"{path}: not a .npy file (it does not start with the .npy signature)")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                version, np.lib.format.read_array_header_2_0)  # 2.0 and 3.0 differ only in encoding
            shape, _, dtype = read_header(f)
        except Exception as e:  # noqa: BLE001 -- numpy parses the header with tokenize and ast, which raise many kinds
            raise ValueError(f"{path}: damaged .npy header ({_first_line(e)})") from None
        data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    if not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"{path}: damaged .npy header (shape {shape}; expected non-negative integers)")
    if dtype.hasobject:
        raise ValueError(f"{path}: holds Python objects (dtype {dtype}); expected an array of numbers")
    if dtype.kind not in "biuf":
        raise ValueError(f"{path}: expected real numbers; received dtype {dtype}")
    if sum(n > 1 for n in shape) > 1:
        raise ValueError(f"{path}: expected one sequence; received an array of shape {shape}")
    needed = math.prod(shape) * dtype.itemsize
    if data_bytes < needed:
        raise ValueError(f"{path}: cut short: its header promises {needed} bytes of data; "
                         f"it holds {data_bytes}")
    try:
        values = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"{path}: damaged .npy file ({_first_line(e)})") from None
    values = values.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        as_float = values.astype(np.float64)
    magnitude = np.abs(as_float)
    bad = ~(magnitude <= FLOAT32_MAX) | ((magnitude < FLOAT32_TINY) & (magnitude > 0))
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        what = ("NaN" if np.isnan(as_float[index]) else
                f"{values[index]} is {'beyond' if magnitude[index] > 1 else 'below'} float32's range")
        raise ValueError(f"{path}: index {index}: {what}; expected finite numbers within "
                         f"float32's range, 0 or {FLOAT32_TINY:.4g} to {FLOAT32_MAX:.4g} in magnitude "
                         f"({int(bad.sum())} such values)")
    if bits and not np.isin(as_float, (0.0, 1.0)).all():
        index = int(np.flatnonzero(~np.isin(as_float, (0.0, 1.0)))[0])
        raise ValueError(f"{path}: index {index}: {values[index]} is not 0 or 1 (the count network reads bits)")
    return as_float
