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
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .errors import ReasonMaxxerError

__all__ = [
    "Problem",
    "BENCHMARKS",
    "default_data_dir",
    "load_benchmark",
    "load_problem_file",
    "load_problems",
    "problems_hash",
    "normalise_answer",
    "last_boxed",
    "gsm8k_final",
]

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
        return {"id": self.id, "question": self.question, "answer": self.answer,
                "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        """Inverse of `to_dict`."""
        return cls(str(d["id"]), str(d["question"]), str(d["answer"]), dict(d.get("metadata") or {}))


# ----------------------------------------------------------------------------- normalisation

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


_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in text, braces balanced.

    Returns None when there is no such box or its braces never close.
    """
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for k in range(start, len(text)):
            ch = text[k]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:k].strip()
    return None


def _olympiad_answer(items: Any) -> str:
    """OlympiadBench ``final_answer`` (list of ``$..$`` strings) -> ``"a, b"``."""
    if isinstance(items, str):
        items = [items]
    out: list[str] = []
    for item in items or []:
        text = str(item).strip()
        pieces = text.split("$")
        inside = [p.strip() for p in pieces[1::2]]
        outside = pieces[0::2]
        sep_only = all(re.fullmatch(r"[\s,;.]*", p) for p in outside)
        if "$" not in text:
            out.append(text)
        elif sep_only or text.count("$") % 2:
            # "$69$,$84$" -> 69, 84; an unbalanced "$221,$8$" -> 221, 8 (best effort)
            segs = [p.strip().strip(",;").strip() for p in pieces]
            out.extend(s for s in (inside if sep_only else segs) if s)
        else:  # prose with inline maths: keep the words, drop the dollars
            out.append(re.sub(r"\s+", " ", text.replace("$", "")).strip())
    return ", ".join(out)


# ----------------------------------------------------------------------------- row access

def _available(row: dict) -> str:
    return ", ".join(sorted(map(str, row))) or "none"


def _get(row: dict, names: str | Sequence[str], where: str) -> Any:
    """First present, non-null field among names; error naming the field(s) otherwise."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if row.get(name) is not None:
            return row[name]
    shown = " or ".join(repr(n) for n in names)
    what = "null field" if any(n in row for n in names) else "missing field"
    raise ReasonMaxxerError(f"{where}: {what} {shown} (available: {_available(row)})")


def _text(value: Any, what: str, where: str) -> str:
    text = value.strip() if isinstance(value, str) else normalise_answer(value)
    if not text:
        raise ReasonMaxxerError(f"{where}: empty {what}")
    return text


# ----------------------------------------------------------------------------- benchmarks

Adapter = Callable[[dict, str], "tuple[str, str, dict]"]


def _gsm8k(row: dict, where: str) -> tuple[str, str, dict]:
    q = _text(_get(row, "question", where), "question", where)
    sol = str(_get(row, "answer", where))
    gold = gsm8k_final(sol)
    if gold is None:
        raise ReasonMaxxerError(f"{where}: GSM8K answer has no '#### N' final line")
    return q, gold, {}


def _math500(row: dict, where: str) -> tuple[str, str, dict]:
    q = _text(_get(row, ("problem", "question"), where), "question", where)
    a = normalise_answer(_get(row, "answer", where))
    meta = {k: row[k] for k in ("subject", "unique_id") if row.get(k) is not None}
    if row.get("level") is not None:
        meta["level"] = int(row["level"]) if str(row["level"]).isdigit() else row["level"]
    return q, a, meta


def _aime_amc(row: dict, where: str) -> tuple[str, str, dict]:
    q = _text(_get(row, ("problem", "question"), where), "question", where)
    a = normalise_answer(_get(row, "answer", where))
    meta = {k: row[k] for k in ("url",) if row.get(k) is not None}
    if row.get("id") is not None:
        meta["source_id"] = str(row["id"])
    return q, a, meta


def _olympiadbench(row: dict, where: str) -> tuple[str, str, dict]:
    q = _text(_get(row, "question", where), "question", where)
    context = row.get("context")
    if isinstance(context, str) and context.strip() and context.strip() != "None":
        q = context.strip() + "\n" + q
    a = _olympiad_answer(_get(row, "final_answer", where))
    meta = {k: row[k] for k in ("unit", "answer_type", "subfield") if row.get(k) is not None}
    if row.get("id") is not None:
        meta["source_id"] = str(row["id"])
    return q, a, meta


def _minerva(row: dict, where: str) -> tuple[str, str, dict]:
    q = _text(_get(row, ("problem", "question"), where), "question", where)
    if row.get("answer") not in (None, ""):  # Hub mirror: answer already extracted
        a = normalise_answer(row["answer"])
    else:
        a = last_boxed(str(_get(row, "solution", where)))
        if a is None:
            raise ReasonMaxxerError(f"{where}: no \\boxed{{...}} with balanced braces in 'solution'")
    meta = {"subject": row["type"]} if row.get("type") is not None else {}
    if row.get("idx") is not None:
        meta["source_id"] = str(row["idx"])
    return q, a, meta


@dataclass(frozen=True)
class _Benchmark:
    """Where a benchmark lives locally and on the Hub, and how its rows become Problems."""

    folders: tuple[str, ...]               # local folder names tried in order
    splits: tuple[str, ...]
    adapter: Adapter
    hub_path: str
    hub_config: str | None = None
    hub_split: dict = field(default_factory=dict)  # our split -> Hub split (default: same)
    hub_filter: Callable[[dict], bool] | None = None


def _amc23_filter(row: dict) -> bool:
    """AI-MO/aimo-validation-amc holds AMC 12 2022 and 2023; amc23 is the 2023 part."""
    url = row.get("url")
    return url is None or "2023" in str(url)


_SOURCES: dict[str, _Benchmark] = {
    "gsm8k": _Benchmark(("gsm8k",), ("test", "train"), _gsm8k, "openai/gsm8k", "main"),
    "math500": _Benchmark(("math500", "MATH-500"), ("test",), _math500, "HuggingFaceH4/MATH-500"),
    "aime24": _Benchmark(("aime24",), ("test",), _aime_amc, "HuggingFaceH4/aime_2024",
                         hub_split={"test": "train"}),
    "aime25": _Benchmark(("aime25",), ("test",), _aime_amc, "yentinglin/aime_2025",
                         hub_split={"test": "train"}),
    "amc23": _Benchmark(("amc23",), ("test",), _aime_amc, "AI-MO/aimo-validation-amc",
                        hub_split={"test": "train"}, hub_filter=_amc23_filter),
    "olympiadbench": _Benchmark(("olympiadbench",), ("test",), _olympiadbench,
                                "Hothan/OlympiadBench", "OE_TO_maths_en_COMP",
                                hub_split={"test": "train"}),
    "minerva": _Benchmark(("minerva_math", "minerva"), ("test",), _minerva, "math-ai/minervamath"),
}
BENCHMARKS: tuple[str, ...] = ("gsm8k", "math500", "aime24", "aime25", "amc23", "olympiadbench",
                               "minerva")
_ALIASES = {"minerva_math": "minerva", "math-500": "math500", "math_500": "math500"}


def default_data_dir() -> Path | None:
    """``$REASONMAXXER_DATA_DIR`` as a Path, or None when unset or empty."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def _benchmark_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _SOURCES:
        raise ReasonMaxxerError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    return key


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ReasonMaxxerError(f"limit must be a non-negative integer or None, got {limit!r}")


def load_benchmark(name: str, split: str = "test", data_dir: str | Path | None = None,
                   limit: int | None = None) -> list[Problem]:
    """Load a benchmark split as Problems with ids ``<name>/<split>/<row index>``.

    data_dir (else ``$REASONMAXXER_DATA_DIR``) holds ``<name>/<split>.jsonl`` (or ``.parquet``);
    with neither set, the split comes from the Hugging Face Hub (needs ``pip install datasets``).
    limit keeps the first rows only. Metadata always carries ``source`` (the benchmark name).
    """
    key = _benchmark_name(name)
    src = _SOURCES[key]
    if split not in src.splits:
        raise ReasonMaxxerError(
            f"benchmark {key!r} has no split {split!r}; available: {', '.join(src.splits)}")
    _check_limit(limit)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root is not None:
        path = _local_file(root, key, src, split)
        rows: Iterable[tuple[str, dict]] = _read_rows(path)
    else:
        rows = _hub_rows(key, src, split)
    problems: list[Problem] = []
    for where, row in rows:
        if limit is not None and len(problems) >= limit:
            break
        q, a, meta = src.adapter(row, where)
        if not a:
            raise ReasonMaxxerError(f"{where}: empty answer")
        meta = {"source": key, **meta}
        problems.append(Problem(f"{key}/{split}/{len(problems)}", q, a, meta))
    return problems


def _local_file(root: Path, key: str, src: _Benchmark, split: str) -> Path:
    for folder in src.folders:
        for ext in (".jsonl", ".parquet"):
            path = root / folder / f"{split}{ext}"
            if path.is_file():
                return path
    expected = root / src.folders[0] / f"{split}.jsonl"
    raise ReasonMaxxerError(
        f"{expected}: no such file for benchmark {key!r} (data dir from --data-dir or "
        f"{DATA_DIR_ENV}; unset both to load from the Hugging Face Hub)")


def _hub_rows(key: str, src: _Benchmark, split: str) -> Iterator[tuple[str, dict]]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise ReasonMaxxerError(
            f"benchmark {key!r}: no local data dir (--data-dir or {DATA_DIR_ENV}) and loading "
            f"from the Hugging Face Hub needs `datasets`: pip install datasets") from None
    hub_split = src.hub_split.get(split, split)
    try:
        ds = datasets.load_dataset(src.hub_path, src.hub_config, split=hub_split)
    except Exception as exc:  # network, auth, renamed dataset: one actionable line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ReasonMaxxerError(
            f"could not load {src.hub_path} ({hub_split}) from the Hugging Face Hub: "
            f"{type(exc).__name__}: {first}; pass --data-dir with local files instead") from None
    label = f"{src.hub_path}:{hub_split}"
    for i, row in enumerate(ds):
        if src.hub_filter is None or src.hub_filter(row):
            yield f"{label}:row {i}", dict(row)


# ----------------------------------------------------------------------------- files

def _read_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, row) pairs of a JSON Lines or Parquet file; malformed input raises."""
    if path.suffix.lower() == ".parquet":
        yield from _read_parquet(path)
    else:
        yield from _read_jsonl(path)


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a JSON Lines file located as ``path:line``; blank lines are skipped."""
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise ReasonMaxxerError(f"{path}: cannot open: {exc.strerror or exc}") from None
    seen = 0
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = " (a JSON array file? use one object per line)" if line.lstrip()[:1] == "[" else ""
                raise ReasonMaxxerError(f"{where}: invalid JSON: {exc.msg}{hint}") from None
            if not isinstance(row, dict):
                raise ReasonMaxxerError(f"{where}: expected a JSON object, got {type(row).__name__}")
            seen += 1
            yield where, row
    if not seen:
        raise ReasonMaxxerError(f"{path}:1: empty file (no records)")


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a Parquet file located as ``path:row i`` (0-based row index)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ReasonMaxxerError(f"{path}: cannot read Parquet: {type(exc).__name__}: {first}") from None
    if table.num_rows == 0:
        raise ReasonMaxxerError(f"{path}:row 0: empty file (no rows)")
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def load_problem_file(path: str | Path, question_field: str = "question",
                      answer_field: str = "answer", id_field: str | None = None,
                      limit: int | None = None) -> list[Problem]:
    """Problems from a ``.jsonl``/``.json`` (JSON Lines) or ``.parquet`` file with a field mapping.

    Ids are ``str(row[id_field])`` (must be unique) or ``<file stem>/<index>``. Answers go
    through `normalise_answer`; a GSM8K-style solution ending in ``#### N`` is reduced to N.
    Errors name ``path:line`` (``path:row i`` for Parquet) and the field at fault.
    """
    path = Path(path).expanduser()
    _check_limit(limit)
    if not path.is_file():
        raise ReasonMaxxerError(f"{path}: no such file")
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}
    for where, row in _read_rows(path):
        if limit is not None and len(problems) >= limit:
            break
        q = _text(_get(row, question_field, where), f"question (field {question_field!r})", where)
        raw = _get(row, answer_field, where)
        gold = gsm8k_final(raw) if isinstance(raw, str) and re.search(r"(^|\n)####", raw) else None
        a = gold or normalise_answer(raw)
        if not a:
            raise ReasonMaxxerError(f"{where}: empty answer (field {answer_field!r})")
        if id_field is not None:
            pid = str(_get(row, id_field, where))
            if pid in first_seen:
                raise ReasonMaxxerError(f"{where}: duplicate id {pid!r} (first at {first_seen[pid]})")
            first_seen[pid] = where
        else:
            pid = f"{path.stem}/{len(problems)}"
        problems.append(Problem(pid, q, a, {"source": str(path)}))
    return problems


# ----------------------------------------------------------------------------- specs

def load_problems(spec: str, *, data_dir: str | Path | None = None, question_field: str = "question",
                  answer_field: str = "answer", limit: int | None = None, seed: int = 0) -> list[Problem]:
    """Problems from a spec string.

    - ``arith:<split>:<n>[:<tier>,<tier>...]``: procedural arithmetic (`reasonmaxxer.arith`),
      seeded by seed; a tier may carry a weight (``add1=3,word1=1``).
    - ``<benchmark>`` or ``<benchmark>:<split>`` (e.g. ``gsm8k:train``): `load_benchmark`.
    - anything else: a JSONL/Parquet file for `load_problem_file` with the field mapping.
    limit keeps the first problems only.
    """
    _check_limit(limit)
    spec = spec.strip()
    head, _, rest = spec.partition(":")
    if head.lower() == "arith":
        from . import arith

        parts = rest.split(":") if rest else []
        if len(parts) not in (2, 3) or not parts[1].strip().isdigit():
            raise ReasonMaxxerError(
                f"bad arith spec {spec!r}; expected arith:<split>:<n>[:<tier>,<tier>...]")
        tiers = [t.strip() for t in parts[2].split(",") if t.strip()] if len(parts) == 3 else None
        problems = arith.generate(parts[0].strip(), int(parts[1]), seed=seed, tiers=tiers)
        return problems[:limit] if limit is not None else problems
    key = _ALIASES.get(head.strip().lower(), head.strip().lower())
    if key in _SOURCES:
        return load_benchmark(key, rest.strip() or "test", data_dir=data_dir, limit=limit)
    path = Path(spec).expanduser()
    if path.is_file():
        return load_problem_file(path, question_field=question_field, answer_field=answer_field,
                                 limit=limit)
    raise ReasonMaxxerError(
        f"{spec}: not a benchmark ({', '.join(BENCHMARKS)}), not arith:<split>:<n>, and no such file")


def problems_hash(problems: Iterable[Problem]) -> str:
    """sha256 hex digest over the (id, question, answer) of each problem, in order.

    Metadata is excluded; the same problems in a different order hash differently.
    """
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.question, p.answer], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
