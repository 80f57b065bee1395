"""A user's texts, read in order and in bounded blocks: one text a line (.txt), JSON Lines
(.jsonl, .ndjson), CSV (.csv, .tsv) and Parquet (.parquet), or a directory of such files (taken in
name order). Rows are numbered across the files from 0; a row's problem names its file and its
line (or row) there.

Every format is checked before any work (the file opens, the column is there, an id column where
one is asked for), so that a wrong column name costs one line and exit 2, not a half-done run.
Parquet is read in record batches of the columns asked for, never whole.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from trtforge.errors import TrtforgeError

FORMATS = {".txt": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet"}
PARQUET_BATCH_ROWS = 8192


class InputError(TrtforgeError):
    """Input that cannot be read as asked (missing, unknown format, no such column, a bad row)."""


@dataclass
class Row:
    """One input row as read: its text (or what stood there), its id, where it came from."""

    value: Any
    id: Any
    file: int  # index into Source.files
    line: int  # 1-based line (text formats) or 0-based row (Parquet) in its file
    pair: Any = None  # the second text, where the input holds pairs (--pair-column)


@dataclass
class Source:
    """The input files, the column read from each, and what identifies them for a resume."""

    files: list[Path]
    formats: list[str]
    column: str
    id_column: str | None
    max_chars: int  # texts are cut here, far past what the tokenizer keeps
    pair_column: str | None = None  # a second text per row: (text, pair) for cross-encoders
    sizes: list[int] = field(default_factory=list)
    read_bytes: int = 0  # how much of the input has been read (Parquet: its share of the size), for an ETA
    rows_read: int = 0  # rows read when read_bytes was last set
    _rows: int = 0  # rows read so far (before `skip` included)

    @classmethod
    def open(cls, path: Path, *, column: str = "text", id_column: str | None = None, max_chars: int,
             pair_column: str | None = None) -> Source:
        files = _files(path)
        source = cls(files, [FORMATS[f.suffix.lower()] for f in files], column, id_column, max_chars, pair_column)
        source.sizes = [f.stat().st_size for f in files]
        for file, kind in zip(files, source.formats):
            source._check(file, kind)
        return source

    def identity(self) -> list[dict[str, Any]]:
        """What a resumed run must find unchanged: each file's path, size and modification time."""
        return [{"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
                for f in self.files]

    def known_rows(self) -> int | None:
        """The number of rows where the formats say it without reading (Parquet), else None."""
        counts = self.parquet_rows()
        return None if counts is None else sum(counts)

    def parquet_rows(self) -> list[int] | None:
        """Each file's rows, from the Parquet metadata; None unless every file is Parquet."""
        if any(kind != "parquet" for kind in self.formats):
            return None
        import pyarrow.parquet as pq

        return [pq.ParquetFile(f).metadata.num_rows for f in self.files]

    def rows(self, skip: int = 0) -> Iterator[Row]:
        """Every row in order, from global row `skip` on (the rows before are counted off, not
        parsed; Parquet's row groups before are not read)."""
        for index, (file, kind) in enumerate(zip(self.files, self.formats)):
            for row in _READERS[kind](self, file, index, skip):
                self._rows += 1
                if row is None:
                    skip -= 1
                    continue
                yield row
            self.read_bytes, self.rows_read = sum(self.sizes[:index + 1]), self._rows

    def estimated_rows(self) -> int | None:
        """The input's rows: counted where read to the end, else from the bytes per row so far."""
        if not self.read_bytes or not self.rows_read:
            return None
        return round(self.rows_read * sum(self.sizes) / self.read_bytes)

    def _read(self, index: int, done: int) -> None:
        self.read_bytes, self.rows_read = sum(self.sizes[:index]) + done, self._rows

    def where(self, row: Row) -> str:
        unit = "row" if self.formats[row.file] == "parquet" else "line"
        return f"{self.files[row.file]}, {unit} {row.line}"

    def text_of(self, row: Row) -> tuple[Any, str | None]:
        """(the text, cut at max_chars; a (text, pair) tuple with a pair column) or (None, what is
        wrong with the row)."""
        text, problem = self._one_text(row.value, self.column)
        if problem is None and self.pair_column:
            pair, problem = self._one_text(row.pair, self.pair_column)
            return ((text, pair), None) if problem is None else (None, problem)
        return text, problem

    def _one_text(self, value: Any, column: str) -> tuple[str | None, str | None]:
        return checked_text(value, column, self.max_chars)

    # --- checks before any work --------------------------------------------------------------------
    def _check(self, file: Path, kind: str) -> None:
        wanted = [self.column] + [c for c in (self.pair_column, self.id_column) if c]
        if kind == "text":
            if self.pair_column:
                raise InputError(f"{file}: a text file has one text a line, so --pair-column {self.pair_column!r} "
                                 "cannot be read; give pairs as JSON Lines, CSV or Parquet")
            if self.id_column:
                raise InputError(f"{file}: a text file has one text a line and no columns, so --id-column "
                                 f"{self.id_column!r} cannot be read; drop --id-column (rows are numbered) or use "
                                 "JSON Lines, CSV or Parquet")
            return
        if kind == "parquet":
            names = _parquet_columns(file)
        elif kind == "jsonl":
            names = _first_json_keys(file)
        else:
            names = _csv_header(file, kind)
        if names is None:  # an empty file: no rows, nothing to check
            return
        for name in wanted:
            if name not in names:
                option = {self.column: "--column", self.pair_column: "--pair-column"}.get(name, "--id-column")
                shown = ", ".join(repr(n) for n in list(names)[:12])
                raise InputError(f"{file} has no column {name!r} (it has {shown}); name the right one with {option}")


def _files(path: Path) -> list[Path]:
    if not os.path.exists(path):
        raise InputError(f"input {path} does not exist; give a file or a directory of files")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in FORMATS)
        if not files:
            raise InputError(f"input directory {path} holds no {', '.join(sorted(FORMATS))} files; point INPUT at "
                             "a file or a directory of them")
        return files
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"input {path}: unknown format {path.suffix or '(no extension)'!r}; trtforge run reads "
                         f"{', '.join(sorted(FORMATS))} (one text a line for .txt)")
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise InputError(f"input {path} cannot be read ({e.strerror}); fix its permissions or the path") from None
    return [path]


def _parquet_columns(file: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file).schema_arrow.names
    except Exception as e:  # pyarrow's errors for a file that is not Parquet
        raise InputError(f"{file} is not a readable Parquet file ({str(e).splitlines()[0]}); check the file") from None


def _first_json_keys(file: Path) -> list[str] | None:
    with file.open("rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    raise InputError(f"{file}, line {number} is not JSON; JSON Lines has one JSON object a line") from None
                if not isinstance(record, dict):
                    raise InputError(f"{file}, line {number} is not a JSON object; JSON Lines for trtforge run "
                                     "has one object a line, with the text in a field (--column)")
                return list(record)
    return None


def _csv_header(file: Path, kind: str) -> list[str] | None:
    with _text_stream(file) as f:
        header = next(csv.reader(f, delimiter="\t" if kind == "tsv" else ","), None)
    return header


def _text_stream(file: Path) -> io.TextIOWrapper:
    return open(file, encoding="utf-8", errors="strict", newline="")


def _decode_error(source: Source, index: int, line: int, error: UnicodeDecodeError) -> InputError:
    return InputError(f"{source.files[index]}, line {line} is not UTF-8 ({error.reason}); convert the file to UTF-8")


# --- readers: yield Row, or None for a row before `skip` (so the caller counts it off) -------------
def _read_text(source: Source, file: Path, index: int, skip: int) -> Iterator[Row | None]:
    with file.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if number <= skip:
                yield None
                continue
            if number % 4096 == 0:
                source._read(index, f.tell())
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise _decode_error(source, index, number, e) from None
            yield Row(text, None, index, number)


def _read_jsonl(source: Source, file: Path, index: int, skip: int) -> Iterator[Row | None]:
    with file.open("rb") as f:
        number = 0
        for raw in f:
            if not raw.strip():
                continue  # blank lines are not records in JSON Lines
            number += 1
            if number <= skip:
                yield None
                continue
            if number % 4096 == 0:
                source._read(index, f.tell())
            try:
                record = json.loads(raw)
            except ValueError:
                yield Row(_Unreadable("not a JSON object"), None, index, number)
                continue
            if not isinstance(record, dict) or source.column not in record:
                problem = "not a JSON object" if not isinstance(record, dict) else f"has no field {source.column!r}"
                yield Row(_Unreadable(problem), None, index, number)
                continue
            pair = record.get(source.pair_column, _Unreadable(f"has no field {source.pair_column!r}")) \
                if source.pair_column else None
            yield Row(record[source.column], _id_text(record.get(source.id_column)) if source.id_column else None,
                      index, number, pair)


def _read_csv(source: Source, file: Path, index: int, skip: int) -> Iterator[Row | None]:
    kind = source.formats[index]
    with _text_stream(file) as f:
        reader = csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",")
        number = 0
        try:
            for record in reader:
                number += 1
                if number <= skip:
                    yield None
                    continue
                if number % 4096 == 0:
                    source._read(index, f.buffer.tell())
                yield Row(record.get(source.column), _id_text(record.get(source.id_column)) if source.id_column else None,
                          index, reader.line_num, record.get(source.pair_column) if source.pair_column else None)
        except UnicodeDecodeError as e:
            raise _decode_error(source, index, reader.line_num + 1, e) from None


def _read_parquet(source: Source, file: Path, index: int, skip: int) -> Iterator[Row | None]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file)
    if skip >= parquet.metadata.num_rows:  # all of this file is before `skip`
        for _ in range(parquet.metadata.num_rows):
            yield None
        return
    groups, first = [], 0  # whole row groups before `skip` are not read at all
    for g in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(g).num_rows
        if first + rows <= skip:
            first += rows
            continue
        groups.append(g)
    for _ in range(first):
        yield None
    columns = list(dict.fromkeys(c for c in (source.column, source.id_column, source.pair_column) if c))
    number = first
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=columns):
        source._read(index, source.sizes[index] * number // max(1, parquet.metadata.num_rows))
        values = batch.column(source.column).to_pylist()
        ids = batch.column(source.id_column).to_pylist() if source.id_column else [None] * len(values)
        pairs = batch.column(source.pair_column).to_pylist() if source.pair_column else [None] * len(values)
        for value, id_, pair in zip(values, ids, pairs):
            if number < skip:
                yield None
            else:
                yield Row(value, _id_text(id_) if source.id_column else None, index, number, pair)
            number += 1


def checked_text(value: Any, column: str, max_chars: int) -> tuple[str | None, str | None]:
    """(the text cut at max_chars, None) or (None, what is wrong with the value of `column`)."""
    if isinstance(value, _Unreadable):
        return None, str(value)
    if value is None:
        return None, f"{column} is null"
    if not isinstance(value, str):
        return None, f"{column} is not a string ({type(value).__name__})"
    if not value.strip():
        return None, f"{column} is empty"
    return value[:max_chars], None


class _Unreadable(str):
    """A row that could not be read as a record: what was wrong with it."""


def _id_text(value: Any) -> str | None:
    return None if value is None else str(value)


_READERS = {"text": _read_text, "jsonl": _read_jsonl, "csv": _read_csv, "tsv": _read_csv, "parquet": _read_parquet}
