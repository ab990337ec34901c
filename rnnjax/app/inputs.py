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
import warnings
from pathlib import Path

import numpy as np

from rnnjax.core.checks import InputError

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
    """Returns the float that ``text`` spells as a plain decimal number that rounds to a finite
    float32.

    Raises ``InputError`` saying why not, e.g. ``'1_000' is not a number``.

    Example:
      >>> parse_number("-2.5e3")
      -2500.0
    """
    if not _NUMBER.fullmatch(text):
        kind = "a finite number" if text.lower().lstrip("+-") in ("nan", "inf", "infinity") else "a number"
        raise InputError(f"{_show(text)} is not {kind}", "text")
    value = float(text)
    if not _finite_in_float32(value):
        raise InputError(f"{_cut(text)} is beyond float32's range (largest magnitude {FLOAT32_MAX:.4g})", "text")
    return value


def _finite_in_float32(values) -> np.ndarray:
    """True where a value rounds to a finite float32 (3.4028235e38, float32's largest as NumPy
    prints it, does)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.isfinite(np.asarray(values, np.float64).astype(np.float32))


def read_sequence(path: str | os.PathLike, *, bits: bool = False, max_values: int | None = None) -> np.ndarray:
    """Reads one sequence of numbers from a ``.npy``, ``.csv`` (commas) or ``.txt`` (spaces or
    tabs) file.

    Args:
      path: the file.
      bits: accept only 0 and 1 (the input of the running-count network).
      max_values: refuse a file of more numbers than this (None: any number).

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
        raise InputError(f"{path}: expected a .npy, .csv or .txt file; received '{suffix or path.name}'", "path")
    try:
        limit = math.inf if max_values is None else max_values
        values = _read_npy(path, bits, limit) if suffix == ".npy" else _read_text(path, suffix, bits, limit)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file", "path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; expected a file", "path") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})", "path") from None
    if values.size == 0:
        raise InputError(f"{path}: holds no numbers", "path")
    return values


def _too_many(path: Path, limit: float) -> ValueError:
    return InputError(f"{path}: holds more than {limit:,} numbers, the most one sequence may have", "path")


def _read_text(path: Path, suffix: str, bits: bool, limit: float) -> np.ndarray:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})", "path") from None
    rows, count = [], 0  # per non-blank line: (line number, [values]); how many values in all
    for line_number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip(" \t"):
            continue
        row = []
        for token, column in _fields(line, suffix):
            where = f"{path}: line {line_number}, column {column}"
            if not token:
                raise InputError(f"{where}: empty field; expected a number between the commas", "path")
            try:
                value = parse_number(token)
            except ValueError as e:
                raise InputError(f"{where}: {e}", "path") from None
            if abs(value) < FLOAT32_TINY and re.search(r"[1-9]", token.lower().split("e")[0]):
                raise InputError(f"{where}: {_cut(token)} is below float32's range (smallest normal magnitude "
                                 f"{FLOAT32_TINY:.4g}, where it would be read as 0); write 0, or scale the sequence", "path")
            if bits and value not in (0.0, 1.0):
                raise InputError(f"{where}: {_cut(token)} is not 0 or 1 (the count network reads bits)", "path")
            row.append(value)
            count += 1
            if count > limit:
                raise _too_many(path, limit)
        rows.append((line_number, row))
    if len(rows) > 1:
        for line_number, row in rows:
            if len(row) > 1:
                raise InputError(f"{path}: line {line_number}: {len(row)} numbers on one line of a "
                                 f"{len(rows)}-line file; expected one sequence: all on one line, "
                                 "or one number per line", "path")
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


def _read_npy(path: Path, bits: bool, limit: float) -> np.ndarray:
    with open(path, "rb") as f:
        signature = f.read(6)
        if signature.startswith(b"PK"):
            raise InputError(f"{path}: holds an .npz archive; expected one array (np.save)", "path")
        if signature != b"\x93NUMPY":
            raise InputError(f"{path}: not a .npy file (it does not start with the .npy signature)", "path")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                version, np.lib.format.read_array_header_2_0)  # 2.0 and 3.0 differ only in encoding
            with warnings.catch_warnings():  # numpy's notes on Python 2 headers ("3L") stay off stderr
                warnings.simplefilter("ignore")
                shape, _, dtype = read_header(f)
        except Exception as e:  # noqa: BLE001 -- numpy parses the header with tokenize and ast, which raise many kinds
            raise InputError(f"{path}: damaged .npy header ({_first_line(e)})", "path") from None
        data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    if not all(type(n) is int and n >= 0 for n in shape):
        raise InputError(f"{path}: damaged .npy header (shape {shape}; expected non-negative integers)", "path")
    if dtype.hasobject:
        raise InputError(f"{path}: holds Python objects (dtype {dtype}); expected an array of numbers", "path")
    if dtype.kind not in "biuf":
        raise InputError(f"{path}: expected real numbers; received dtype {dtype}", "path")
    if sum(n > 1 for n in shape) > 1:
        raise InputError(f"{path}: expected one sequence; received an array of shape {shape}", "path")
    if math.prod(shape) > limit:
        raise _too_many(path, limit)
    needed = math.prod(shape) * dtype.itemsize
    if data_bytes < needed:
        raise InputError(f"{path}: cut short: its header promises {needed} bytes of data; "
                         f"it holds {data_bytes}", "path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise InputError(f"{path}: damaged .npy file ({_first_line(e)})", "path") from None
    values = values.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        as_float = values.astype(np.float64)
    magnitude = np.abs(as_float)
    below = (values != 0) & (magnitude < FLOAT32_TINY)  # also a long double that float64 flushes to 0
    bad = ~_finite_in_float32(as_float) | below
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        what = ("NaN" if np.isnan(as_float[index]) else
                f"{str(values[index])} is {'below' if below[index] else 'beyond'} float32's range")
        raise InputError(f"{path}: index {index}: {what}; expected finite numbers within "
                         f"float32's range, 0 or {FLOAT32_TINY:.4g} to {FLOAT32_MAX:.4g} in magnitude "
                         f"({int(bad.sum())} such values)", "path")
    if bits and not np.isin(as_float, (0.0, 1.0)).all():
        index = int(np.flatnonzero(~np.isin(as_float, (0.0, 1.0)))[0])
        raise InputError(f"{path}: index {index}: {str(values[index])} is not 0 or 1 (the count network reads bits)", "path")
    return as_float
