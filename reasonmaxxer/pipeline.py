"""The one-command pipeline: sample -> grade -> select -> score -> train -> evaluate -> report.

Each stage writes its artifact under the run directory and is skipped when re-run with
the same inputs (the stage's config hash matches), so `reasonmaxxer run` after a crash
resumes where it stopped:

    run_dir/rollouts/        rollout store of the training problems (sample + grade)
    run_dir/scores.parquet   base entropies of the selected rollouts (score)
    run_dir/train/           adapter/, merged/, checkpoints/, metrics.jsonl (train)
    run_dir/eval/base/, run_dir/eval/trained/   held-out evaluation (eval)
    run_dir/report.md, report.html, summary.json

Scoring. The gate needs the frozen base model's full-vocabulary entropy at each completion
token. When the rollouts were sampled by the HF backend from the same base weights (the
store's manifest says so), those entropies were already computed from the very logits the
sampler drew from, so the scoring pass is skipped (`rescore=True` forces it; it agrees to
~1e-5). Rollouts from another model or from vLLM (top-k log-probs only) are always scored.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .errors import ReasonMaxxerError
from .sampling import SamplingConfig
from .store import RolloutStore, atomic_write_json, atomic_write_table, config_hash
from .train import TrainConfig, TrainExample


def score_rows(rows: list[dict], model, tokenizer, *, batch_size: int = 4, progress: bool = True) -> list[list[float]]:
    """Teacher-forced base entropies (nats) of each row's completion tokens."""
    from tqdm.auto import tqdm

    from .scoring import score_sequences

    out: list[list[float]] = []
    pad = tokenizer.pad_token_id or 0
    for i in tqdm(range(0, len(rows), batch_size), desc="score", disable=not progress, dynamic_ncols=True):
        chunk = rows[i : i + batch_size]
        seqs = [list(r["prompt_ids"]) + list(r["token_ids"]) for r in chunk]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), T), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            att[j, : len(s)] = 1
        ent, _ = score_sequences(model, ids, att)
        for j, r in enumerate(chunk):
            p, c = len(r["prompt_ids"]), len(r["token_ids"])
            out.append(ent[j, p : p + c].tolist())
    return out


def examples_from_selection(rows: Sequence[dict], truncated_policy: str) -> list[TrainExample]:
    return [TrainExample(prompt_ids=tuple(r["prompt_ids"]), completion_ids=tuple(r["token_ids"]),
                         entropies=tuple(r["base_entropies"]), advantage=float(r["advantage"]),
                         correct=bool(r["strict_correct"]),
                         mask_decision=bool(truncated_policy == "mask" and r["truncated"]),
                         key=(r["problem_id"], r["sample_index"]))
            for r in rows]


def attach_scores(store: RolloutStore, rows: list[dict], out_path: Path, model_spec: str, model, tokenizer,
                  *, rescore: bool = False, progress: bool = True) -> tuple[list[dict], dict]:
    """Add `base_entropies` to rows (scored or reused, see module docstring); cache in out_path."""
    from .models import model_fingerprint

    man = store.manifest()
    same = man.get("config", {}).get("model") == model_fingerprint(model_spec)
    info = {"rows": len(rows), "reused_sampler_entropies": bool(same and not rescore)}
    if same and not rescore:
        for r in rows:
            r["base_entropies"] = list(r["entropies"])
        return rows, info
    keys = [(r["problem_id"], r["sample_index"]) for r in rows]
    h = config_hash({"store": man.get("config_hash"), "model": model_fingerprint(model_spec), "keys": keys})
    if out_path.is_file():
        t = pq.read_table(out_path)
        if t.schema.metadata and t.schema.metadata.get(b"config_hash", b"").decode() == h:
            ents = t.column("base_entropies").to_pylist()
            for r, e in zip(rows, ents):
                r["base_entropies"] = e
            info["cached"] = True
            return rows, info
    t0 = time.time()
    ents = score_rows(rows, model, tokenizer, progress=progress)
    for r, e in zip(rows, ents):
        r["base_entropies"] = e
    table = pa.table({"problem_id": [k[0] for k in keys], "sample_index": [k[1] for k in keys],
                      "base_entropies": ents}).replace_schema_metadata({"config_hash": h})
    atomic_write_table(out_path, table)
    info["score_seconds"] = round(time.time() - t0, 2)
    return rows, info
