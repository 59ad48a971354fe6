"""The seven math benchmarks (local data directory or the Hugging Face Hub) and the problem specs
(`load_problems`: a benchmark name, ``arith:<split>:<n>``, or a JSONL/Parquet file)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ReasonMaxxerError, first_line
from ..verify import last_boxed
from .problems import (
    DATA_DIR_ENV,
    Problem,
    check_limit,
    gsm8k_final,
    load_problem_file,
    normalise_answer,
    read_rows,
    row_field,
    text_value,
)


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


Adapter = Callable[[dict, str], "tuple[str, str, dict]"]


def _gsm8k(row: dict, where: str) -> tuple[str, str, dict]:
    q = text_value(row_field(row, "question", where), "question", where)
    sol = str(row_field(row, "answer", where))
    gold = gsm8k_final(sol)
    if gold is None:
        raise ReasonMaxxerError(f"{where}: GSM8K answer has no '#### N' final line")
    return q, gold, {}


def _math500(row: dict, where: str) -> tuple[str, str, dict]:
    q = text_value(row_field(row, ("problem", "question"), where), "question", where)
    a = normalise_answer(row_field(row, "answer", where))
    meta = {k: row[k] for k in ("subject", "unique_id") if row.get(k) is not None}
    if row.get("level") is not None:
        meta["level"] = int(row["level"]) if str(row["level"]).isdigit() else row["level"]
    return q, a, meta


def _aime_amc(row: dict, where: str) -> tuple[str, str, dict]:
    q = text_value(row_field(row, ("problem", "question"), where), "question", where)
    a = normalise_answer(row_field(row, "answer", where))
    meta = {k: row[k] for k in ("url",) if row.get(k) is not None}
    if row.get("id") is not None:
        meta["source_id"] = str(row["id"])
    return q, a, meta


def _olympiadbench(row: dict, where: str) -> tuple[str, str, dict]:
    q = text_value(row_field(row, "question", where), "question", where)
    context = row.get("context")
    if isinstance(context, str) and context.strip() and context.strip() != "None":
        q = context.strip() + "\n" + q
    a = _olympiad_answer(row_field(row, "final_answer", where))
    meta = {k: row[k] for k in ("unit", "answer_type", "subfield") if row.get(k) is not None}
    if row.get("id") is not None:
        meta["source_id"] = str(row["id"])
    return q, a, meta


def _minerva(row: dict, where: str) -> tuple[str, str, dict]:
    q = text_value(row_field(row, ("problem", "question"), where), "question", where)
    if row.get("answer") not in (None, ""):  # Hub mirror: answer already extracted
        a = normalise_answer(row["answer"])
    else:
        a = last_boxed(str(row_field(row, "solution", where)))
        if a is None:
            raise ReasonMaxxerError(f"{where}: no \\boxed{{...}} with balanced braces in 'solution'")
    meta = {"subject": row["type"]} if row.get("type") is not None else {}
    if row.get("idx") is not None:
        meta["source_id"] = str(row["idx"])
    return q, a, meta


def _simplerl(row: dict, where: str) -> tuple[str, str, dict]:
    """SimpleRL-Zoo's MATH parquet: ``question``, ``gt_answer`` (else ``answer``/``target``,
    the order of the official scripts/sample_simplerl_records.py), ``level``."""
    q = text_value(row_field(row, "question", where), "question", where)
    a = normalise_answer(row_field(row, ("gt_answer", "answer", "target"), where))
    meta = {k: row[k] for k in ("subject", "data_source") if row.get(k) not in (None, "")}
    if row.get("level") is not None:
        meta["level"] = int(row["level"]) if str(row["level"]).isdigit() else row["level"]
    return q, a, meta


@dataclass(frozen=True)
class _Benchmark:
    """Where a benchmark lives locally and on the Hub, and how its rows become Problems."""

    folders: tuple[str, ...]  # local folder names tried in order
    splits: tuple[str, ...]
    adapter: Adapter
    hub_path: str
    hub_config: str | None = None
    hub_split: dict = field(default_factory=dict)  # our split -> Hub split (default: same)
    hub_filter: Callable[[dict], bool] | None = None
    hub_files: str | None = None  # a file in a Hub dataset repo, "{split}" filled in (datasets' data_files)


def _amc23_filter(row: dict) -> bool:
    """AI-MO/aimo-validation-amc holds AMC 12 2022 and 2023; amc23 is the 2023 part."""
    url = row.get("url")
    return url is None or "2023" in str(url)


_SOURCES: dict[str, _Benchmark] = {
    "gsm8k": _Benchmark(("gsm8k",), ("test", "train"), _gsm8k, "openai/gsm8k", "main"),
    "math500": _Benchmark(("math500", "MATH-500"), ("test",), _math500, "HuggingFaceH4/MATH-500"),
    "aime24": _Benchmark(("aime24",), ("test",), _aime_amc, "HuggingFaceH4/aime_2024", hub_split={"test": "train"}),
    "aime25": _Benchmark(("aime25",), ("test",), _aime_amc, "yentinglin/aime_2025", hub_split={"test": "train"}),
    "amc23": _Benchmark(
        ("amc23",),
        ("test",),
        _aime_amc,
        "AI-MO/aimo-validation-amc",
        hub_split={"test": "train"},
        hub_filter=_amc23_filter,
    ),
    "olympiadbench": _Benchmark(
        ("olympiadbench",),
        ("test",),
        _olympiadbench,
        "Hothan/OlympiadBench",
        "OE_TO_maths_en_COMP",
        hub_split={"test": "train"},
    ),
    "minerva": _Benchmark(("minerva_math", "minerva"), ("test",), _minerva, "math-ai/minervamath"),
    # the paper's training pool: MATH levels 3-5 as published by SimpleRL-Zoo (the official
    # scripts/download_simplerl_data.py: repo hkust-nlp/SimpleRL-Zoo-Data, file
    # simplelr_abel_level3to5/<split>.parquet); local: <data_dir>/simplerl/<split>.parquet
    "simplerl": _Benchmark(
        ("simplerl", "simplelr_abel_level3to5"),
        ("train", "test"),
        _simplerl,
        "hkust-nlp/SimpleRL-Zoo-Data",
        hub_files="simplelr_abel_level3to5/{split}.parquet",
    ),
}


BENCHMARKS: tuple[str, ...] = ("gsm8k", "math500", "aime24", "aime25", "amc23", "olympiadbench", "minerva")
# problem pools that are not evaluation benchmarks (loadable by name, not in BENCHMARKS)
TRAINING_POOLS: tuple[str, ...] = ("simplerl",)


_ALIASES = {"minerva_math": "minerva", "math-500": "math500", "math_500": "math500"}


def default_data_dir() -> Path | None:
    """``$REASONMAXXER_DATA_DIR`` as a Path, or None when unset or empty."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def _benchmark_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _SOURCES:
        raise ReasonMaxxerError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS + TRAINING_POOLS)}")
    return key


def load_benchmark(
    name: str, split: str = "test", data_dir: str | Path | None = None, limit: int | None = None
) -> list[Problem]:
    """Load a benchmark split as Problems with ids ``<name>/<split>/<row index>``.

    data_dir (else ``$REASONMAXXER_DATA_DIR``) holds ``<name>/<split>.jsonl`` (or ``.parquet``);
    with neither set, the split comes from the Hugging Face Hub (needs ``pip install datasets``).
    limit keeps the first rows only. Metadata always carries ``source`` (the benchmark name).
    """
    key = _benchmark_name(name)
    src = _SOURCES[key]
    if split not in src.splits:
        raise ReasonMaxxerError(f"benchmark {key!r} has no split {split!r}; available: {', '.join(src.splits)}")
    check_limit(limit)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root is not None:
        path = _local_file(root, key, src, split)
        rows: Iterable[tuple[str, dict]] = read_rows(path)
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
        f"{DATA_DIR_ENV}; unset both to load from the Hugging Face Hub)"
    )


def _hub_rows(key: str, src: _Benchmark, split: str) -> Iterator[tuple[str, dict]]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise ReasonMaxxerError(
            f"benchmark {key!r}: no local data dir (--data-dir or {DATA_DIR_ENV}) and loading "
            f"from the Hugging Face Hub needs `datasets`: pip install datasets"
        ) from None
    hub_split = src.hub_split.get(split, split)
    kw = {"data_files": {hub_split: src.hub_files.format(split=split)}} if src.hub_files else {}
    try:
        ds = datasets.load_dataset(src.hub_path, src.hub_config, split=hub_split, **kw)
    except Exception as exc:  # network, auth, renamed dataset: one actionable line
        first = first_line(exc, empty="")
        raise ReasonMaxxerError(
            f"could not load {src.hub_path} ({hub_split}) from the Hugging Face Hub: "
            f"{type(exc).__name__}: {first}; pass --data-dir with local files instead"
        ) from None
    label = f"{src.hub_path}:{hub_split}"
    for i, row in enumerate(ds):
        if src.hub_filter is None or src.hub_filter(row):
            yield f"{label}:row {i}", dict(row)


@dataclass(frozen=True)
class Pick:
    """Options after ``<benchmark>:<split>:`` (``key=value`` joined by ``:``): ``levels=3,4,5``
    (or ``3-5``: keep these MATH levels), ``per_level=N`` (a seeded sample of N problems per
    level), ``n=N`` (a seeded sample of N problems), ``seed=S`` (default 42). Samples keep
    the source order; ids stay ``<name>/<split>/<row index>``."""

    levels: tuple[int, ...] | None = None
    per_level: int | None = None
    n: int | None = None
    seed: int = 42

    def count(self) -> int | None:
        """Problems this pick yields when the source has enough of them (None: the source's)."""
        if self.per_level is not None and self.levels:
            return self.per_level * len(self.levels)
        return self.n


def _levels(text: str, spec: str) -> tuple[int, ...]:
    lo, dash, hi = text.partition("-")
    try:
        if dash:
            return tuple(range(int(lo), int(hi) + 1))
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ReasonMaxxerError(f"{spec}: levels={text!r} is not a list (3,4,5) or a range (3-5)") from None


def parse_pick(opts: str, spec: str) -> Pick | None:
    """The `Pick` in the options part of a benchmark spec (None when there is none)."""
    if not opts.strip():
        return None
    kw: dict = {}
    for part in opts.split(":"):
        k, eq, v = part.strip().partition("=")
        if not eq or k not in ("levels", "per_level", "n", "seed"):
            raise ReasonMaxxerError(
                f"{spec}: bad option {part!r}; expected levels=3,4,5 | per_level=N | n=N | seed=S, joined by ':'"
            )
        if k == "levels":
            kw[k] = _levels(v, spec)
        elif not v.strip().isdigit():
            raise ReasonMaxxerError(f"{spec}: {k}={v!r} is not a non-negative integer")
        else:
            kw[k] = int(v)
    return Pick(**kw)


def apply_pick(problems: list[Problem], pick: Pick, spec: str) -> list[Problem]:
    """`problems` filtered by level and sampled as `pick` says (the official recipe draws
    ``--per_level 100`` per level with seed 42 + offset + 1; pandas' sampler there, a
    `random.Random` here: the same design, not the same rows)."""
    import random

    if pick.levels is not None:
        problems = [p for p in problems if p.metadata.get("level") in pick.levels]
    if pick.per_level is not None:
        if not pick.levels:
            raise ReasonMaxxerError(f"{spec}: per_level needs levels=...")
        out = []
        for offset, level in enumerate(pick.levels):
            pool = [i for i, p in enumerate(problems) if p.metadata.get("level") == level]
            if len(pool) < pick.per_level:
                raise ReasonMaxxerError(f"{spec}: level {level} has {len(pool)} problems, fewer than {pick.per_level}")
            out += random.Random(pick.seed + offset + 1).sample(pool, pick.per_level)
        problems = [problems[i] for i in sorted(out)]
    if pick.n is not None:
        if len(problems) < pick.n:
            raise ReasonMaxxerError(f"{spec}: n={pick.n} but only {len(problems)} problems match")
        problems = [problems[i] for i in sorted(random.Random(pick.seed).sample(range(len(problems)), pick.n))]
    return problems


def load_problems(
    spec: str,
    *,
    data_dir: str | Path | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    limit: int | None = None,
    seed: int = 0,
) -> list[Problem]:
    """Problems from a spec string.

    - ``arith:<split>:<n>[:<tier>,<tier>...]``: procedural arithmetic (`reasonmaxxer.data.arith`),
      seeded by seed; a tier may carry a weight (``add1=3,word1=1``).
    - ``<benchmark>`` or ``<benchmark>:<split>`` (e.g. ``gsm8k:train``): `load_benchmark`;
      ``<benchmark>:<split>:levels=3-5:per_level=100`` filters and samples (`Pick`).
    - anything else: a JSONL/Parquet file for `load_problem_file` with the field mapping.
    limit keeps the first problems only.
    """
    check_limit(limit)
    spec = spec.strip()
    head, _, rest = spec.partition(":")
    if head.lower() == "arith":
        from . import arith

        parts = rest.split(":") if rest else []
        if len(parts) not in (2, 3) or not parts[1].strip().isdigit():
            raise ReasonMaxxerError(f"bad arith spec {spec!r}; expected arith:<split>:<n>[:<tier>,<tier>...]")
        tiers = [t.strip() for t in parts[2].split(",") if t.strip()] if len(parts) == 3 else None
        problems = arith.generate(parts[0].strip(), int(parts[1]), seed=seed, tiers=tiers)
        return problems[:limit] if limit is not None else problems
    key = _ALIASES.get(head.strip().lower(), head.strip().lower())
    if key in _SOURCES:
        split, _, opts = rest.partition(":")
        pick = parse_pick(opts, spec)
        problems = load_benchmark(key, split.strip() or "test", data_dir=data_dir, limit=None if pick else limit)
        if pick:
            problems = apply_pick(problems, pick, spec)
        return problems[:limit] if limit is not None else problems
    path = Path(spec).expanduser()
    if path.is_file():
        return load_problem_file(path, question_field=question_field, answer_field=answer_field, limit=limit)
    raise ReasonMaxxerError(
        f"{spec}: not a benchmark ({', '.join(BENCHMARKS)}), not arith:<split>:<n>, and no such file"
    )
