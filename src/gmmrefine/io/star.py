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


# Rows are parsed this many at a time: a 200,000-row particle table held as Python strings (every
# line, then every token) took ~330 MB above the parsed table while reading (measured); chunks keep
# that transient to a few MB.
_CHUNK_ROWS = 8192


def _typed_values(values: np.ndarray) -> np.ndarray:
    """Narrowest dtype (int64, float64, fixed-width str) that reproduces the ``(n,)`` text values."""
    if len(values) == 0:
        return values.astype(object)
    as_text = pd.Series(values, dtype=object)
    if all(_INT_TEXT.match(v) for v in values):
        as_int = pd.to_numeric(as_text, errors="coerce")
        if as_int.dtype.kind == "i":
            return as_int.to_numpy(dtype=np.int64)
    as_float = pd.to_numeric(as_text, errors="coerce")
    if as_float.dtype.kind == "f" and not (as_float.isna() & ~as_text.str.lower().isin(["nan", "-nan", "+nan"])).any():
        return as_float.to_numpy(dtype=np.float64)
    return np.array(values, dtype=str)


def _typed_column(text: pd.Series) -> pd.Series:
    """Narrowest dtype (int64, float64, str) that reproduces the column's text values."""
    return _series(_typed_values(text.to_numpy(dtype=object)), index=text.index)


def _series(values: np.ndarray, index=None) -> pd.Series:
    """A column of ``values``; text becomes Python strings (object dtype, as pandas 3 would otherwise
    give its own string dtype)."""
    if values.dtype.kind in "OU":
        # Made once per column, after the parsed tokens are gone: strings created among the tokens
        # (many short-lived objects for the numeric columns' text) would pin their memory (measured:
        # a 200,000-row particle table kept 280 MB resident instead of 60 MB).
        return pd.Series(values.astype(object), index=index, dtype=object)
    return pd.Series(values, index=index, dtype=values.dtype)


def _row_tokens(rows: list[str]) -> list[list[str]]:
    if any(('"' in r) or ("'" in r) for r in rows):
        return [_tokens(r) for r in rows]
    return [r.split() for r in rows]


class _LoopRows:
    """The rows of one ``loop_``, typed chunk by chunk as they are read.

    A column is int64 when every chunk is, float64 when every chunk is a number, and otherwise its
    text: kept as read when every chunk was text, read again from the file when a text chunk follows
    numeric ones (:meth:`_text_column`; rare), so the types are those of the whole column.
    """

    def __init__(self, path: Path, block: str, columns: list[str], first_line: int):
        if not columns:
            raise InputError(f"{path}: loop in block data_{block} (line {first_line}) has no column names.",
                             path=str(path), field=f"data_{block}")
        self.path, self.block, self.columns = path, block, columns
        self.chunks: list[list[np.ndarray]] = [[] for _ in columns]
        self.pending: list[str] = []
        self.n_rows = 0
        self.first_row_line = 0
        self.last_row_line = 0

    def add(self, line: str, lineno: int) -> None:
        if not self.pending and not self.n_rows:
            self.first_row_line = lineno
        self.last_row_line = lineno
        self.pending.append(line)
        if len(self.pending) >= _CHUNK_ROWS:
            self._flush()

    def _split(self, rows: list[str], first_row: int) -> np.ndarray:
        table = _row_tokens(rows)
        n = len(self.columns)
        for i, toks in enumerate(table):
            if len(toks) != n:
                raise InputError(
                    f"{self.path}: row {first_row + i + 1} of block data_{self.block} has {len(toks)} values but "
                    f"the loop declares {n} columns.", path=str(self.path), field=f"data_{self.block}")
        return np.array(table, dtype=object).reshape(len(table), n)

    def _flush(self) -> None:
        if not self.pending:
            return
        arr = self._split(self.pending, self.n_rows)
        for j in range(len(self.columns)):
            self.chunks[j].append(_typed_values(arr[:, j]))
        self.n_rows += len(self.pending)
        self.pending = []

    def _text_column(self, j: int) -> np.ndarray:
        """``(n_rows,)`` text of column ``j``, from the loop's lines in the file (rows already checked)."""
        values = []
        with open(self.path) as fh:
            rows: list[str] = []
            for lineno, raw in enumerate(fh, start=1):
                if lineno < self.first_row_line:
                    continue
                if lineno > self.last_row_line:
                    break
                line = raw.strip()
                if line and not line.startswith("#"):
                    rows.append(line)
                if len(rows) >= _CHUNK_ROWS:
                    values.append(np.array(self._split(rows, 0)[:, j], dtype=str))
                    rows = []
            if rows:
                values.append(np.array(self._split(rows, 0)[:, j], dtype=str))
        return np.concatenate(values)

    def frame(self) -> pd.DataFrame:
        self._flush()
        if not self.n_rows:
            return pd.DataFrame({c: pd.Series([], dtype=object) for c in self.columns})
        data: dict[str, np.ndarray] = {}
        for j, c in enumerate(self.columns):
            kinds = {a.dtype.kind for a in self.chunks[j]}
            if kinds == {"i"}:
                data[c] = np.concatenate(self.chunks[j])
            elif kinds <= {"i", "f"}:
                data[c] = np.concatenate([a.astype(np.float64) for a in self.chunks[j]])
            elif kinds == {"U"}:
                data[c] = np.concatenate(self.chunks[j])
            else:
                data[c] = self._text_column(j)
            self.chunks[j] = []
        return pd.DataFrame({c: _series(v) for c, v in data.items()})


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
        with open(path) as fh:
            return _read_blocks(path, fh)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the STAR file as text ({exc}).", path=str(path)) from exc


def _read_blocks(path: Path, lines) -> dict[str, pd.DataFrame]:
    tables: dict[str, pd.DataFrame] = {}
    block: str | None = None
    mode = None  # None | "pairs" | "loop-header" | "loop-rows"
    columns: list[str] = []
    loop: _LoopRows | None = None
    pairs: dict[str, str] = {}
    loop_line = 0

    def close_block():
        nonlocal mode, columns, loop, pairs
        if block is None:
            return
        if mode == "loop-header":
            tables[block] = _LoopRows(path, block, columns, loop_line).frame()
        elif mode == "loop-rows":
            tables[block] = loop.frame()
        else:
            df = pd.DataFrame({k: _typed_column(pd.Series([v], dtype=object)) for k, v in pairs.items()})
            df.attrs["star_loop"] = False
            tables[block] = df
        mode, columns, loop, pairs = None, [], None, {}

    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            # A blank line or comment ends nothing in RELION except that rows never span it.
            continue
        if mode == "loop-rows" and not line.startswith(("data_", "loop_", "_")):
            assert loop is not None  # set when mode became "loop-rows"
            loop.add(line, lineno)
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
        if mode == "loop-header":
            mode = "loop-rows"
            loop = _LoopRows(path, block, columns, loop_line)
            loop.add(line, lineno)
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


def _write_tables(out, tables: dict[str, pd.DataFrame], version_line: bool) -> None:
    """Write the STAR text of ``tables`` to the text stream ``out``, a chunk of rows at a time.

    Columns are right-aligned to their widest value, so each chunk is formatted twice (once for the
    widths, once to write) rather than the whole table held as text at once: ~250 MB for 200,000
    particle rows, measured.
    """
    for name, df in tables.items():
        out.write("\n")
        if version_line:
            out.write(f"{RELION_31_VERSION_LINE}\n\n")
        out.write(f"data_{name}\n\n")
        columns = [str(c) for c in df.columns]
        if df.attrs.get("star_loop", True) is False and len(df) == 1:
            width = max((len(c) for c in columns), default=0) + 2
            for c, col in zip(columns, df.columns):
                out.write(f"_{c:<{width}}{_format_column(df[col])[0]}\n")
            out.write("\n")
            continue
        out.write("loop_ \n")
        for j, c in enumerate(columns, start=1):
            out.write(f"_{c} #{j} \n")
        starts = range(0, len(df), _CHUNK_ROWS)
        widths = [0] * len(columns)
        for start in starts:
            chunk = df.iloc[start:start + _CHUNK_ROWS]
            for j, col in enumerate(df.columns):
                widths[j] = max(widths[j], max(map(len, _format_column(chunk[col]))))
        for start in starts:
            chunk = df.iloc[start:start + _CHUNK_ROWS]
            formatted = [_format_column(chunk[col]) for col in df.columns]
            out.write("".join(" ".join(v.rjust(w) for v, w in zip(row, widths)) + " \n" for row in zip(*formatted)))
        out.write("\n")


def format_star(tables: dict[str, pd.DataFrame], *, version_line: bool | None = None) -> str:
    """STAR text for ``tables`` (see :func:`write_star`)."""
    buf = io.StringIO()
    _write_tables(buf, tables, "optics" in tables if version_line is None else version_line)
    return buf.getvalue()


def write_star(path: str | os.PathLike, tables: dict[str, pd.DataFrame], *, version_line: bool | None = None) -> None:
    """Write ``tables`` as a RELION-readable STAR file, atomically.

    Args:
        path: output file.
        tables: ``{block name: DataFrame}`` as :func:`read_star` returns them (written in dict order).
        version_line: write ``# version 30001`` before each block (RELION 3.1+). Default: when an
            ``optics`` block is present.
    """
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        _write_tables(fh, tables, "optics" in tables if version_line is None else version_line)
