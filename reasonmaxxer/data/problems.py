"""Problems with verifiable answers: benchmark loaders, generic JSONL/Parquet files, and specs.

Every source ends up as a list of `Problem` (id, question, normalised gold answer, metadata).
The seven benchmarks load from a local data directory (``<data_dir>/<name>/<split>.jsonl``,
``--data-dir`` or ``$REASONMAXXER_DATA_DIR``) or, when none is set, from the Hugging Face
Hub through `datasets` (imported lazily; an optional dependency). Both sources go through
the same per-benchmark adapter, so a problem's question and gold are the same either way.

Gold normalisation (``normalise_answer`` plus the adapters):
- GSM8K: the text after ``####`` with thousands separators removed (``1,080`` -> ``1080``).
- AIME: integer strings lose zero padding (``"025"`` -> ``"25"``); AMC floats that are whole
  numbers print as integers (``27.0`` -> ``"27"``).
- Minerva: the last ``\\boxed{...}`` of the solution, braces balanced.
- OlympiadBench: ``final_answer`` is a list of ``$...$`` strings; the ``$`` are stripped and
  several answers (also several ``$..$`` segments in one string) are joined with ``", "``.
- MATH-500: the ``answer`` field as published (LaTeX), whitespace-stripped.
Answers stay text: comparing them with a model's output is the verifier's job.

Limitations: Problem ids of benchmarks are ``<name>/<split>/<row index>``, so they are only
stable for one ordering of the source; `problems_hash` detects a different ordering. The Hub
dataset ids below could not be checked offline for every benchmark (amc23, olympiadbench and
minerva use community mirrors); a local data directory is the reference path.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ReasonMaxxerError, first_line
from ..io import read_jsonl

DATA_DIR_ENV = "REASONMAXXER_DATA_DIR"


@dataclass(frozen=True)
class Problem:
    """One problem with a verifiable answer.

    ``id`` is unique within a set and stable across runs; ``answer`` is the normalised gold
    text (several answers joined with ``", "``); ``metadata`` is JSON-serialisable (source,
    subject, level, tier, ...). Hashing and ordering ignore ``metadata``; treat it as read-only.
    """

    id: str
    question: str
    answer: str
    metadata: dict = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict with keys id, question, answer, metadata."""
        return {"id": self.id, "question": self.question, "answer": self.answer, "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, d: dict) -> Problem:
        """Inverse of `to_dict`."""
        return cls(str(d["id"]), str(d["question"]), str(d["answer"]), dict(d.get("metadata") or {}))


_INT_RE = re.compile(r"[+-]?\d+")


_WHOLE_FLOAT_RE = re.compile(r"([+-]?\d+)\.0*")


def normalise_answer(value: Any) -> str:
    """Gold answer text from a raw field value (str, int, float or a list of those).

    Integers lose zero padding and a leading ``+``; whole floats print as integers
    (``27.0`` -> ``"27"``, also for the string ``"27.0"``); lists are joined with ``", "``;
    other strings are only whitespace-stripped. Returns ``""`` for an empty value.
    """
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        parts = [normalise_answer(v) for v in value]
        return ", ".join(p for p in parts if p)
    text = str(value).strip()
    if _INT_RE.fullmatch(text):
        return str(int(text))
    m = _WHOLE_FLOAT_RE.fullmatch(text)
    return str(int(m.group(1))) if m else text


def gsm8k_final(solution: str) -> str | None:
    """The number after the last ``####`` of a GSM8K solution, commas removed; None if absent."""
    if "####" not in solution:
        return None
    return normalise_answer(solution.rsplit("####", 1)[1].strip().replace(",", ""))


def available_fields(row: dict) -> str:
    return ", ".join(sorted(map(str, row))) or "none"


def row_field(row: dict, names: str | Sequence[str], where: str) -> Any:
    """First present, non-null field among names; error naming the field(s) otherwise."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if row.get(name) is not None:
            return row[name]
    shown = " or ".join(repr(n) for n in names)
    what = "null field" if any(n in row for n in names) else "missing field"
    raise ReasonMaxxerError(f"{where}: {what} {shown} (available: {available_fields(row)})")


def text_value(value: Any, what: str, where: str) -> str:
    text = value.strip() if isinstance(value, str) else normalise_answer(value)
    if not text:
        raise ReasonMaxxerError(f"{where}: empty {what}")
    return text


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ReasonMaxxerError(f"limit must be a non-negative integer or None, got {limit!r}")


def read_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, row) pairs of a JSON Lines or Parquet file; malformed input raises."""
    if path.suffix.lower() == ".parquet":
        yield from _read_parquet(path)
    else:
        yield from read_jsonl(path)


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a Parquet file located as ``path:row i`` (0-based row index)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        first = first_line(exc, empty="")
        raise ReasonMaxxerError(f"{path}: cannot read Parquet: {type(exc).__name__}: {first}") from None
    if table.num_rows == 0:
        raise ReasonMaxxerError(f"{path}:row 0: empty file (no rows)")
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError:
        _raise_not_utf8(table, path)
    for i, row in enumerate(rows):
        yield f"{path}:row {i}", row


def _raise_not_utf8(table, path: Path) -> None:
    """Name the first row and field of a Parquet table whose string is not UTF-8 (one line)."""
    for i in range(table.num_rows):
        for name, column in zip(table.column_names, table.columns):
            try:
                column[i].as_py()
            except UnicodeDecodeError as exc:
                raise ReasonMaxxerError(
                    f"{path}:row {i}: field {name!r} is not UTF-8 text "
                    f"(byte 0x{exc.object[exc.start]:02x} at offset {exc.start} of the value)"
                ) from None
    raise ReasonMaxxerError(f"{path}: not UTF-8 text")


def load_problem_file(
    path: str | Path,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Problems from a ``.jsonl``/``.json`` (JSON Lines) or ``.parquet`` file with a field mapping.

    Ids are ``str(row[id_field])`` (must be unique) or ``<file stem>/<index>``. Answers go
    through `normalise_answer`; a GSM8K-style solution ending in ``#### N`` is reduced to N.
    Errors name ``path:line`` (``path:row i`` for Parquet) and the field at fault.
    """
    path = Path(path).expanduser()
    check_limit(limit)
    if not path.is_file():
        raise ReasonMaxxerError(f"{path}: no such file")
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}
    for where, row in read_rows(path):
        if limit is not None and len(problems) >= limit:
            break
        q = text_value(row_field(row, question_field, where), f"question (field {question_field!r})", where)
        raw = row_field(row, answer_field, where)
        gold = gsm8k_final(raw) if isinstance(raw, str) and re.search(r"(^|\n)####", raw) else None
        a = gold or normalise_answer(raw)
        if not a:
            raise ReasonMaxxerError(f"{where}: empty answer (field {answer_field!r})")
        if id_field is not None:
            pid = str(row_field(row, id_field, where))
            if pid in first_seen:
                raise ReasonMaxxerError(f"{where}: duplicate id {pid!r} (first at {first_seen[pid]})")
            first_seen[pid] = where
        else:
            pid = f"{path.stem}/{len(problems)}"
        problems.append(Problem(pid, q, a, {"source": str(path)}))
    return problems


def problems_hash(problems: Iterable[Problem]) -> str:
    """sha256 hex digest over the (id, question, answer) of each problem, in order.

    Metadata is excluded; the same problems in a different order hash differently.
    """
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.question, p.answer], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
