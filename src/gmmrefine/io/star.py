"""RELION STAR files: read every block, write them back value for value.

Reading gives ``{block name: DataFrame}`` in file order, the block name without ``data_`` (RELION 3.0
particle files have a single block named ``""``; 3.1+ files ``"optics"`` and ``"particles"``). Column
names lose the leading underscore (``rlnImageName``). Each column gets the narrowest type that
reproduces its text: integers stay ``int64`` (only when the text is the canonical integer, so
``"0001"`` stays a string), other numbers become ``float64``, anything else stays a string
(``"000001@Particles/a.mrcs"`` untouched). A key-value block (no ``loop_``) becomes a one-row
DataFrame with ``df.attrs["star_loop"] = False``; :func:`write_star` writes it back as key-value pairs.

Writing prints integers as integers and floats with Python's shortest round-trip representation, so a
file read and written back has identical values (floats to the last bit), the same columns in the same
order, unknown columns included, and the same row order.

The parser is our own rather than the ``starfile`` package: it tolerates what RELION tolerates
(comments, ``# version 30001``, blank lines, key-value and loop blocks, several blocks) and keeps
integer/string columns exactly, which the round-trip guarantee needs.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from gmmrefine.errors import InputError
from gmmrefine.io.atomic import atomic_path

RELION_31_VERSION_LINE = "# version 30001"

_TOKEN = re.compile(r"\"[^\"]*\"|'[^']*'|\S+")
_INT_TEXT = re.compile(r"^[+-]?(0|[1-9][0-9]*)$")


def _tokens(line: str) -> list[str]:
    out = []
    for tok in _TOKEN.findall(line):
        if len(tok) >= 2 and tok[0] == tok[-1] and tok[0] in "\"'":
            tok = tok[1:-1]
        out.append(tok)
    return out


def _typed_column(text: pd.Series) -> pd.Series:
    """Narrowest dtype (int64, float64, str) that reproduces the column's text values."""
    values = text.to_numpy(dtype=object)
    if len(values) == 0:
        return text.astype(object)
    as_text = pd.Series(values, index=text.index, dtype=object)
    if all(_INT_TEXT.match(v) for v in values):
        as_int = pd.to_numeric(as_text, errors="coerce")
        if as_int.dtype.kind == "i":
            return as_int.astype(np.int64)
    as_float = pd.to_numeric(as_text, errors="coerce")
    if as_float.dtype.kind == "f" and not (as_float.isna() & ~as_text.str.lower().isin(["nan", "-nan", "+nan"])).any():
        return as_float.astype(np.float64)
    # Fresh string objects: the parsed tokens sit among millions of short-lived ones (the numeric
    # columns' text), and keeping them would pin that memory (measured: a 200,000-row particle table
    # kept 280 MB resident instead of 60 MB).
    return pd.Series(np.array(values, dtype=str).astype(object), index=text.index, dtype=object)


def _parse_loop(path: Path, block: str, columns: list[str], rows: list[str], first_line: int) -> pd.DataFrame:
    if not columns:
        raise InputError(f"{path}: loop in block data_{block} (line {first_line}) has no column names.",
                         path=str(path), field=f"data_{block}")
    if not rows:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})
    if any(('"' in r) or ("'" in r) for r in rows):
        table = [_tokens(r) for r in rows]
    else:
        table = [r.split() for r in rows]
    n = len(columns)
    for i, toks in enumerate(table):
        if len(toks) != n:
            raise InputError(
                f"{path}: row {i + 1} of block data_{block} has {len(toks)} values but the loop declares "
                f"{n} columns.", path=str(path), field=f"data_{block}")
    arr = np.array(table, dtype=object).reshape(len(table), n)
    df = pd.DataFrame({c: _typed_column(pd.Series(arr[:, j], dtype=object)) for j, c in enumerate(columns)})
    return df


def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Read every data block of a STAR file.

    Returns:
        ``{block name: DataFrame}`` in file order (name without ``data_``; column names without ``_``).
    Raises:
        InputError: missing/unreadable file, a row with the wrong number of values, or no data block.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: STAR file not found.", path=str(path))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the STAR file as text ({exc}).", path=str(path)) from exc

    tables: dict[str, pd.DataFrame] = {}
    block: str | None = None
    mode = None  # None | "pairs" | "loop-header" | "loop-rows"
    columns: list[str] = []
    rows: list[str] = []
    pairs: dict[str, str] = {}
    loop_line = 0

    def close_block():
        nonlocal mode, columns, rows, pairs
        if block is None:
            return
        if mode in ("loop-header", "loop-rows"):
            tables[block] = _parse_loop(path, block, columns, rows, loop_line)
        else:
            df = pd.DataFrame({k: _typed_column(pd.Series([v], dtype=object)) for k, v in pairs.items()})
            df.attrs["star_loop"] = False
            tables[block] = df
        mode, columns, rows, pairs = None, [], [], {}

    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            # A blank line or comment ends nothing in RELION except that rows never span it.
            continue
        if line.startswith("data_"):
            close_block()
            block = line[5:].split()[0] if len(line) > 5 else ""
            if block in tables:
                raise InputError(f"{path}: block data_{block} appears twice (line {lineno}).",
                                 path=str(path), field=f"data_{block}")
            continue
        if block is None:
            raise InputError(f"{path}: line {lineno} comes before any data_ block; is this a STAR file?",
                             path=str(path))
        if line.startswith("loop_"):
            if mode is not None:
                raise InputError(f"{path}: a second loop_ in block data_{block} (line {lineno}); RELION "
                                 f"expects one table per block.", path=str(path), field=f"data_{block}")
            mode, loop_line = "loop-header", lineno
            continue
        if line.startswith("_"):
            toks = line.split(None, 1)
            name = toks[0][1:]
            if mode == "loop-header":
                columns.append(name)
            elif mode == "loop-rows":
                raise InputError(f"{path}: column {toks[0]} at line {lineno} follows the rows of its loop.",
                                 path=str(path), field=name)
            else:
                value = _tokens(toks[1]) if len(toks) > 1 else []
                if len(value) != 1:
                    raise InputError(f"{path}: key {toks[0]} at line {lineno} needs exactly one value.",
                                     path=str(path), field=name)
                mode = "pairs"
                pairs[name] = value[0]
            continue
        if mode in ("loop-header", "loop-rows"):
            mode = "loop-rows"
            rows.append(line)
            continue
        raise InputError(f"{path}: unexpected text at line {lineno} of block data_{block}: {line[:60]!r}.",
                         path=str(path), field=f"data_{block}")
    close_block()
    if not tables:
        raise InputError(f"{path}: no data_ block found; expected a RELION STAR file.", path=str(path))
    return tables


def _format_column(col: pd.Series) -> list[str]:
    kind = col.dtype.kind
    if kind in "iu":
        return [str(v) for v in col.tolist()]
    if kind == "b":
        return [str(int(v)) for v in col.tolist()]
    if kind == "f":
        return [repr(float(v)) for v in col.tolist()]
    out = []
    for v in col.tolist():
        if isinstance(v, (float, np.floating)):
            s = repr(float(v))
        else:
            s = str(v)
        if s == "" or any(ch.isspace() for ch in s):
            s = f'"{s}"'
        out.append(s)
    return out


def format_star(tables: dict[str, pd.DataFrame], *, version_line: bool | None = None) -> str:
    """STAR text for ``tables`` (see :func:`write_star`)."""
    if version_line is None:
        version_line = "optics" in tables
    buf = io.StringIO()
    for name, df in tables.items():
        buf.write("\n")
        if version_line:
            buf.write(f"{RELION_31_VERSION_LINE}\n\n")
        buf.write(f"data_{name}\n\n")
        columns = [str(c) for c in df.columns]
        formatted = [_format_column(df[c]) for c in df.columns]
        if df.attrs.get("star_loop", True) is False and len(df) == 1:
            width = max((len(c) for c in columns), default=0) + 2
            for c, vals in zip(columns, formatted):
                buf.write(f"_{c:<{width}}{vals[0]}\n")
            buf.write("\n")
            continue
        buf.write("loop_ \n")
        for j, c in enumerate(columns, start=1):
            buf.write(f"_{c} #{j} \n")
        if formatted:
            widths = [max(len(v) for v in vals) if vals else 0 for vals in formatted]
            for row in zip(*formatted):
                buf.write(" ".join(v.rjust(w) for v, w in zip(row, widths)))
                buf.write(" \n")
        buf.write("\n")
    return buf.getvalue()


def write_star(path: str | os.PathLike, tables: dict[str, pd.DataFrame], *, version_line: bool | None = None) -> None:
    """Write ``tables`` as a RELION-readable STAR file, atomically.

    Args:
        path: output file.
        tables: ``{block name: DataFrame}`` as :func:`read_star` returns them (written in dict order).
        version_line: write ``# version 30001`` before each block (RELION 3.1+). Default: when an
            ``optics`` block is present.
    """
    text = format_star(tables, version_line=version_line)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
