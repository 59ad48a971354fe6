"""The token-level analysis of one out_dir as written by `analysis.run_analyze`: analysis.json
(config, summaries per trajectory source, token_text) and trajectories.jsonl (one record per greedy
trajectory), read and checked by `load_analysis`; shared by the explorer and the fork atlas."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReasonMaxxerError
from ..io import read_jsonl

REQUIRED_KEYS = ("tokens", "token_ids", "base_entropy", "base_argmax", "tuned_argmax", "tuned_rank_in_base", "cls")


SOURCE_TITLES = {
    "base": "Along the base model's greedy trajectories",
    "tuned": "Along the tuned model's greedy trajectories",
}


@dataclass(frozen=True)
class Analysis:
    """analysis.json (config, summaries per trajectory source, token_text) and the trajectories.jsonl
    records of one out_dir. A record without "source" is a base trajectory."""

    config: dict
    summary: dict
    records: list[dict]
    summaries: dict = field(default_factory=dict)
    token_text: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.summary.get("k") or self.config.get("k") or 5)

    @property
    def sources(self) -> list[str]:
        """Trajectory sources present, in file order ("base", "tuned")."""
        return list(dict.fromkeys(source_of(r) for r in self.records))

    def of(self, source: str) -> list[dict]:
        """The records of one trajectory source."""
        return [r for r in self.records if source_of(r) == source]

    def summary_of(self, source: str) -> dict:
        return self.summaries.get(source) or (self.summary if source == self.sources[0] else {})


def source_of(r: dict) -> str:
    return str(r.get("source") or "base")


def load_analysis(out_dir) -> Analysis:
    """Read and check out_dir/analysis.json and out_dir/trajectories.jsonl."""
    out = Path(out_dir)
    jp, tp = out / "analysis.json", out / "trajectories.jsonl"
    for p in (jp, tp):
        if not p.is_file():
            raise ReasonMaxxerError(f"explorer: {p} not found; run `reasonmaxxer analyze ... --out {out}` first")
    try:
        meta = json.loads(jp.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReasonMaxxerError(f"explorer: {jp}: not valid JSON ({e})") from None
    records = []
    for ln, r in read_jsonl(tp, allow_empty=True):  # ln: "path:line"
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise ReasonMaxxerError(f"explorer: {ln}: missing field(s) {', '.join(missing)}")
        n = len(r["tokens"])
        bad = [k for k in REQUIRED_KEYS if len(r[k]) != n]
        if bad:
            raise ReasonMaxxerError(f"explorer: {ln}: field(s) {', '.join(bad)} do not have one entry per token ({n})")
        records.append(r)
    return Analysis(
        meta.get("config") or {},
        meta.get("summary") or {},
        records,
        meta.get("summaries") or {},
        meta.get("token_text") or {},
    )


def flat(records: Sequence[dict], key: str, dtype=float) -> np.ndarray:
    """One per-position field over all trajectories, concatenated: [N]. None (nan in JSON) -> nan / -1."""
    fill = math.nan if dtype is float else -1
    return np.array([fill if v is None else v for r in records for v in r[key]], dtype=dtype)


def vocab_of(records: Sequence[dict], token_text: dict | None = None) -> dict[int, str]:
    """token id -> text: analysis.json's token_text, then the (id, text) pairs of the completions."""
    out: dict[int, str] = {int(i): str(t) for i, t in (token_text or {}).items()}
    for r in records:
        for i, t in zip(r["token_ids"], r["tokens"]):
            out.setdefault(int(i), str(t))
    return out


def tok_text(vocab: dict[int, str], i: Any) -> str:
    return vocab[int(i)] if i is not None and int(i) in vocab else f"⟨id={i}⟩"
