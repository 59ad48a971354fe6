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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .errors import ReasonMaxxerError
from .models import model_device
from .sampling import SamplingConfig
from .store import RolloutStore, atomic_write_json, atomic_write_table, config_hash
from .train import TrainConfig, TrainExample
from .vllm_backend import VLLMOptions


def score_tokens(rows: Sequence[dict], model, tokenizer, *, batch_size: int = 4,
                 on_batch=None) -> list[tuple[list[float], list[float]]]:
    """Teacher-forced (entropies, logprobs) in nats of each row's completion tokens (`token_ids`
    after `prompt_ids`), `batch_size` rows a forward pass; `on_batch(k)` after each batch."""
    from .scoring import score_sequences

    out = []
    pad = tokenizer.pad_token_id or 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        seqs = [list(r["prompt_ids"]) + list(r["token_ids"]) for r in chunk]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), T), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            att[j, : len(s)] = 1
        dev = next(model.parameters()).device
        ent, lp = score_sequences(model, ids.to(dev), att.to(dev))
        for j, r in enumerate(chunk):
            p, c = len(r["prompt_ids"]), len(r["token_ids"])
            out.append((ent[j, p : p + c].tolist(), lp[j, p : p + c].tolist()))
        if on_batch:
            on_batch(len(chunk))
    return out


def score_rows(rows: list[dict], model, tokenizer, *, batch_size: int = 4, progress: bool = True) -> list[list[float]]:
    """Teacher-forced base entropies (nats) of each row's completion tokens."""
    from tqdm.auto import tqdm

    with tqdm(total=len(rows), desc="score", unit="row", disable=not progress, dynamic_ncols=True) as bar:
        return [e for e, _ in score_tokens(rows, model, tokenizer, batch_size=batch_size, on_batch=bar.update)]


def examples_from_selection(rows: Sequence[dict], truncated_policy: str) -> list[TrainExample]:
    return [TrainExample(prompt_ids=tuple(r["prompt_ids"]), completion_ids=tuple(r["token_ids"]),
                         entropies=tuple(r["base_entropies"]), advantage=float(r["advantage"]),
                         correct=bool(r["strict_correct"]),
                         mask_decision=bool(truncated_policy == "mask" and r["truncated"]),
                         key=(r["problem_id"], r["sample_index"]))
            for r in rows]


def attach_scores(store: RolloutStore, rows: list[dict], out_path: Path, model_spec: str, model, tokenizer,
                  *, rescore: bool = False, progress: bool = True, engine=None) -> tuple[list[dict], dict]:
    """Add `base_entropies` to rows (scored or reused, see module docstring); cache in out_path.
    `engine` (`engines.EngineConfig`) scores on Ray workers when it says so (same numbers)."""
    from .models import model_fingerprint

    man = store.manifest()
    conf = man.get("config", {})
    same = (conf.get("model") == model_fingerprint(model_spec) and conf.get("backend", "hf") == "hf"
            and all(r.get("entropies") is not None for r in rows))   # vLLM records no entropies
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
    if engine is None or engine.engine == "local":
        ents = score_rows(rows, model, tokenizer, progress=progress)
    else:
        from .stages import score_rows_on

        ents = [r["entropies"] for r in score_rows_on(rows, model_spec, engine, progress=progress)]
    for r, e in zip(rows, ents):
        r["base_entropies"] = e
    table = pa.table({"problem_id": [k[0] for k in keys], "sample_index": [k[1] for k in keys],
                      "base_entropies": ents}).replace_schema_metadata({"config_hash": h})
    atomic_write_table(out_path, table)
    info["score_seconds"] = round(time.time() - t0, 2)
    return rows, info


def prepare_training_data(store: RolloutStore, model_spec: str, model, tokenizer, selection: dict,
                          train_cfg: TrainConfig, scores_path: Path, *, rescore: bool = False, progress: bool = True,
                          engine=None):
    """select -> score (-> clarity order). Returns (Selection, rows with base_entropies, score info)."""
    from .selection import SelectionConfig, select
    from .train import resolve_tau

    rows = [r for r in store.read_rows() if r["sample_index"] >= 0]
    scfg = SelectionConfig(**selection)
    clarity = scfg.order == "clarity"
    sel = select(rows, SelectionConfig(**{**selection, "order": "none"}) if clarity else scfg)
    if progress:
        st = sel.stats
        print(f"kept {st['problems_kept']} of {st['problems_total']} problems ({st['problems_mixed']} with mixed "
              f"success), {st['rollouts_kept']} rollouts", flush=True)
    srows, info = attach_scores(store, list(sel.rows), scores_path, model_spec, model, tokenizer,
                                rescore=rescore, progress=progress, engine=engine)
    if clarity:
        tau0, _ = resolve_tau(examples_from_selection(srows, scfg.truncated), train_cfg)
        first = sel
        sel = select(srows, scfg, tau=tau0)
        sel = type(sel)(rows=sel.rows, problems=first.problems, stats=first.stats)   # stats of the real selection
        srows = sel.rows
    return sel, srows, info


# -- the run config ------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig:
    n: int = 4                       # samples per problem for avg@n (0 = greedy only)
    temperature: float = 0.7
    greedy: bool = True
    max_new_tokens: int = 256
    batch_size: int = 32
    seed: int = 1234


@dataclass(frozen=True)
class RunConfig:
    """A whole run, as read from a TOML file (see configs/demo.toml); flags override it."""

    model: str = "smollm2-135m"
    template: str = "fewshot"
    out: str = "runs/run"
    train_problems: str = "arith:train:64"
    validation_problems: str = "arith:validation:24"
    test_problems: str = "arith:test:64"
    data_dir: str | None = None
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=8, max_new_tokens=256))
    selection: dict = field(default_factory=dict)       # selection.SelectionConfig fields
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rescore: bool = False
    threads: int = 0                 # torch threads (0 = torch's default); per Ray worker: this or 1
    engine: str = "local"            # where sample, score and eval run: "local" | "ray" (see engines.py)
    workers: int = 2                 # Ray workers
    ray_address: str | None = None   # None: a local Ray instance; "auto"/host:port: a running cluster
    reuse: str | None = None         # a run dir whose base rollouts and base eval to reuse when their inputs match
    backend: str = "hf"              # sampling + eval backend: hf | vllm (training and scoring are HF)
    vllm: VLLMOptions = field(default_factory=VLLMOptions)   # [vllm] engine options (backend = "vllm")

    def engine_config(self):
        from .engines import EngineConfig

        return EngineConfig(engine=self.engine, workers=self.workers, threads=self.threads, ray_address=self.ray_address)


def _build(cls, d: dict, where: str):
    names = {f.name for f in fields(cls)}
    bad = sorted(set(d) - names)
    if bad:
        raise ReasonMaxxerError(f"{where}: unknown key(s) {bad}; valid: {sorted(names)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d)


def read_toml(path: str | Path | None) -> dict:
    """The tables of a TOML config file ({} for None); a missing or invalid file is a one-line error."""
    import tomllib

    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ReasonMaxxerError(f"{p}: no such config file")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ReasonMaxxerError(f"{p}: invalid TOML ({e})") from None


def _with_extends(raw: dict, path, depth: int = 0) -> dict:
    """Resolve ``extends = "other.toml"`` (relative to the file): the other file's keys, then
    this file's on top (tables merged key by key)."""
    parent = raw.pop("extends", None)
    if not parent:
        return raw
    if depth > 8:
        raise ReasonMaxxerError(f"{path}: 'extends' nests too deep (a cycle?)")
    ppath = Path(path).parent / parent
    base = _with_extends(read_toml(ppath), ppath, depth + 1)
    for k, v in raw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def load_run_config(path: str | Path | None = None, **overrides) -> RunConfig:
    """Read a TOML run config (sections [sampling], [selection], [train], [eval]); flags win."""
    raw = _with_extends(read_toml(path), path)
    where = str(path or "config")
    for k, v in overrides.items():
        if v is None:
            continue
        sec, _, key = k.partition(".")
        if key:
            raw.setdefault(sec, {})[key] = v
        else:
            raw[k] = v
    sub = {"sampling": SamplingConfig, "train": TrainConfig, "eval": EvalConfig, "vllm": VLLMOptions}
    top = {}
    for k, v in raw.items():
        if k in sub:
            if not isinstance(v, dict):
                raise ReasonMaxxerError(f"{where}: [{k}] must be a table")
            top[k] = _build(sub[k], v, f"{where} [{k}]")
        elif k == "selection":
            from .selection import SelectionConfig

            _build(SelectionConfig, v, f"{where} [selection]")   # validate early
            top[k] = dict(v)
        else:
            top[k] = v
    return _build(RunConfig, top, where)


def _greedy_accuracy_fn(problems, template, tokenizer, max_new_tokens: int, batch_size: int):
    """validate(model) -> strict greedy accuracy on `problems` (used to pick the checkpoint)."""
    from .prompts import render_prompt
    from .sampling import HFSampler, Request
    from .verify import grade_many

    enc = [tuple(tokenizer(render_prompt(template, p.question, tokenizer), add_special_tokens=False)["input_ids"])
           for p in problems]
    cfg = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)

    def validate(model) -> float:
        comps = HFSampler(model, tokenizer).generate([Request((p.id, -1), e) for p, e in zip(problems, enc)], cfg)
        grades = grade_many([p.answer for p in problems], [c.text for c in comps], workers=0)
        return sum(g.strict.correct for g in grades) / len(grades)

    return validate


def _per_problem(store: RolloutStore, col: str = "strict_correct") -> dict[str, float]:
    acc: dict[str, list] = {}
    for r in store.read_rows(["problem_id", col]):
        acc.setdefault(r["problem_id"], []).append(float(r[col]))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def _examples_for_report(model, tokenizer, examples: Sequence[TrainExample], gates, k: int = 4) -> list[dict]:
    """A few training rollouts token by token, with the base top-5 at gated positions."""
    picks, seen = [], set()
    for i, e in enumerate(examples):
        if e.key and e.key[0] in seen:
            continue
        if int(gates[i].sum()) == 0:
            continue
        picks.append(i)
        seen.add(e.key[0] if e.key else i)
        if len(picks) >= k:
            break
    out = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for i in picks:
        e = examples[i]
        ids = torch.tensor([list(e.prompt_ids) + list(e.completion_ids)], device=model_device(base))
        with torch.no_grad():
            logits = base(input_ids=ids).logits[0, len(e.prompt_ids) - 1 : -1].float().cpu()   # [C, V]
        probs = logits.softmax(-1)
        toks = []
        for t, tid in enumerate(e.completion_ids):
            item = {"text": tokenizer.decode([tid]), "entropy": round(float(e.entropies[t]), 4), "gated": bool(gates[i][t])}
            if item["gated"]:
                pv, pi = probs[t].topk(5)
                item["top5"] = [[tokenizer.decode([int(j)]), round(float(p), 4)] for p, j in zip(pv, pi)]
            toks.append(item)
        out.append({"problem_id": e.key[0] if e.key else str(i), "correct": e.correct,
                    "advantage": round(e.advantage, 4), "tokens": toks})
    return out



def fork_changes(base, tuned, tokenizer, examples: Sequence[TrainExample], gates, *, limit: int = 32,
                 batch: int = 8, top: int = 12) -> dict:
    """Where the trained model's argmax differs from the base's, teacher-forced on training rollouts.

    Over the completion tokens of up to `limit` rollouts: the % of positions whose argmax
    changed, the % of those whose new token is in the base top-5, the mean base entropy
    (nats) at changed vs unchanged positions, how many changes sit at gated positions, and
    the most frequent (base token -> tuned token) changes with their counts.
    """
    from .train import batch_tensors, shared_prefix_len, split_prefix_logits

    pad = tokenizer.pad_token_id or 0
    n_pos = n_changed = n_top5 = n_gated_changed = 0
    ent_changed, ent_same = [], []
    pairs: dict[tuple[str, str], list] = {}
    exs = list(examples[:limit])
    for i in range(0, len(exs), batch):
        chunk = exs[i : i + batch]
        ids, att, comp, ent, _, _ = batch_tensors(chunk, pad)
        P = shared_prefix_len(ids, att, comp)
        with torch.no_grad():
            outs = []
            for mdl in (base, tuned):
                dev = model_device(mdl)
                pre, rest = split_prefix_logits(mdl, ids.to(dev), att.to(dev), P)
                full = rest if pre is None else torch.cat([pre.expand(len(chunk), -1, -1), rest], 1)
                outs.append(full[:, :-1].float().cpu())                     # column t+1 predicted at t
        b_log, t_log = outs
        b_arg, t_arg = b_log.argmax(-1), t_log.argmax(-1)                  # [B, T-1]
        top5 = b_log.topk(5, -1).indices                                   # [B, T-1, 5]
        for j, e in enumerate(chunk):
            p, c = len(e.prompt_ids), len(e.completion_ids)
            for k in range(c):
                col = p + k - 1                                            # logits index predicting completion token k
                n_pos += 1
                h = e.entropies[k]
                if int(b_arg[j, col]) != int(t_arg[j, col]):
                    n_changed += 1
                    ent_changed.append(h)
                    n_top5 += int((top5[j, col] == t_arg[j, col]).any())
                    n_gated_changed += int(bool(gates[i + j][k]))
                    key = (tokenizer.decode([int(b_arg[j, col])]), tokenizer.decode([int(t_arg[j, col])]))
                    pairs.setdefault(key, []).append(h)
                else:
                    ent_same.append(h)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    common = sorted(pairs.items(), key=lambda kv: -len(kv[1]))[:top]
    return {"positions": n_pos, "changed": n_changed, "changed_fraction": n_changed / max(1, n_pos),
            "changed_in_base_top5": n_top5, "changed_at_gated": n_gated_changed,
            "mean_entropy_changed": mean(ent_changed), "mean_entropy_unchanged": mean(ent_same),
            "most_common": [{"base": a, "tuned": b, "count": len(v), "mean_base_entropy": mean(v)} for (a, b), v in common]}


def tier_table(problems, stores: dict) -> dict | None:
    """Per-tier (or subject) base vs trained accuracy and format-following, from the eval stores."""
    key = next((k for k in ("tier", "subject", "source") if any(k in p.metadata for p in problems)), None)
    if key is None:
        return None
    group = {p.id: str(p.metadata.get(key, "(missing)")) for p in problems}
    rows_by = {}
    for name, (s_store, g_store) in stores.items():
        for label, st in (("greedy", g_store), ("avg", s_store)):
            if st is None:
                continue
            for r in st.read_rows(["problem_id", "strict_correct", "strict_extracted"]):
                d = rows_by.setdefault(group[r["problem_id"]], {}).setdefault((name, label), [0, 0, 0])
                d[0] += int(r["strict_correct"]); d[1] += 1; d[2] += int(r["strict_extracted"] is not None)
    rows = []
    for g in sorted(rows_by):
        d = rows_by[g]
        f = lambda n, l, i=0: (f"{d[(n, l)][i] / d[(n, l)][1]:.3f}" if (n, l) in d else "-")
        n_prob = sum(1 for v in group.values() if v == g)
        rows.append([g, n_prob, f("base", "greedy"), f("trained", "greedy"), f("base", "avg"), f("trained", "avg"),
                     f("base", "greedy", 2), f("trained", "greedy", 2)])
    return {"title": f"Held-out accuracy by {key} (strict); 'answer given' = greedy completions with a \\boxed{{}} or "
                     f"'The answer is' answer (format followed)",
            "header": [key, "problems", "greedy base", "greedy trained", "avg@n base", "avg@n trained",
                       "answer given base", "answer given trained"], "rows": rows}


def evaluate_model(model, tokenizer, spec: str, problems, template, ecfg: EvalConfig, out_dir: str | Path, *,
                   label: str = "", overwrite: bool = False, progress: bool = True, engine=None, sampler=None):
    """Held-out evaluation of one model: `ecfg.n` samples and/or one greedy completion per problem.

    Writes ``out_dir/samples``, ``out_dir/greedy`` (rollout stores; a re-run with the same
    weights is a no-op) and ``eval.json``/``eval.md``. `spec` names the weights for the
    stores' manifests. `engine` (Ray) or `sampler` (another backend serving `spec`, e.g. a
    `vllm_backend.VLLMSampler`; then `model` may be None): see `stages.sample_stage`.
    Returns (EvalReport, (sampled store | None, greedy store | None)).
    """
    from .evaluate import save_report
    from .stages import evaluate_stores, sample_stage

    d = Path(out_dir)
    scfg = SamplingConfig(n=max(ecfg.n, 1), temperature=ecfg.temperature, max_new_tokens=ecfg.max_new_tokens,
                          batch_size=ecfg.batch_size, seed=ecfg.seed)
    kw = dict(model=model, tokenizer=tokenizer, overwrite=overwrite, progress=progress, engine=engine, sampler=sampler)
    s_store = sample_stage(d / "samples", spec, problems, template, scfg, **kw) if ecfg.n > 0 else None
    g_store = sample_stage(d / "greedy", spec, problems, template, scfg, greedy=True, **kw) if ecfg.greedy else None
    rep = evaluate_stores(s_store, g_store, problems, ks=tuple(k for k in (1, 2, 4, 8) if k <= max(ecfg.n, 1)),
                          label=label or spec)
    save_report(rep, d / "eval.json", d / "eval.md")
    return rep, (s_store, g_store)


def _reuse_base_stores(src: Path, out: Path) -> None:
    """Copy another run's base rollouts and base evaluation stores into `out` (when `out` has
    none yet). The stages then reopen them: identical inputs make them no-ops, different
    inputs are refused by the store's config hash, so reuse can never change a result."""
    import shutil

    if not src.is_dir():
        raise ReasonMaxxerError(f"reuse: {src} is not a run dir")
    for sub in ("rollouts", "eval/base/samples", "eval/base/greedy"):
        s, d = src / sub, out / sub
        if (s / "manifest.json").is_file() and not d.exists():
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(s, d.with_name(d.name + ".reuse-tmp"), dirs_exist_ok=True)
            (d.with_name(d.name + ".reuse-tmp")).rename(d)


def run_pipeline(cfg: RunConfig, *, progress: bool = True, overwrite: bool = False) -> dict:
    """sample -> grade -> select -> score -> train -> eval (base, trained) -> report. Returns summary."""
    from .data import load_problems
    from .evaluate import paired_difference
    from .models import load_model
    from .prompts import get_template
    from .selection import SelectionConfig
    from .stages import check_backend, sample_stage
    from .train import example_gates, train
    from .vllm_backend import make_sampler

    check_backend(cfg.backend, cfg.engine)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "run_config.json", json.loads(json.dumps(asdict(cfg), default=str)))
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def stage(name):
        class _T:
            def __enter__(s):
                s.t = time.time()
                if progress:
                    print(f"\n== {name} ==", flush=True)

            def __exit__(s, *exc):
                if exc[0] is None:
                    dt = round(time.time() - s.t, 1)
                    if dt > 1.0 or name not in timings:   # keep the first real measurement of a skipped stage
                        timings[name] = dt
                    atomic_write_json(timings_path, timings)
        return _T()

    tmpl = get_template(cfg.template)
    train_p = load_problems(cfg.train_problems, data_dir=cfg.data_dir)
    val_p = load_problems(cfg.validation_problems, data_dir=cfg.data_dir) if cfg.validation_problems else []
    test_p = load_problems(cfg.test_problems, data_dir=cfg.data_dir)
    model, tok = load_model(cfg.model)
    if cfg.reuse:
        _reuse_base_stores(Path(cfg.reuse), out)
    engine = cfg.engine_config()
    # vLLM: one engine for sampling and both evals; it serves the trained adapter as a LoRA
    vopts = cfg.vllm if cfg.train.full_finetune else replace(cfg.vllm, enable_lora=True,
                                                              max_lora_rank=cfg.vllm.max_lora_rank or cfg.train.lora_rank)
    sampler = make_sampler(cfg.backend, cfg.model, vopts, tokenizer=tok)

    with stage("sample"):
        store = sample_stage(out / "rollouts", cfg.model, train_p, tmpl, cfg.sampling, model=model, tokenizer=tok,
                             overwrite=overwrite, progress=progress, engine=engine, sampler=sampler)
    with stage("select + score"):
        sel, srows, score_info = prepare_training_data(store, cfg.model, model, tok, cfg.selection, cfg.train,
                                                       out / "scores.parquet", rescore=cfg.rescore, progress=progress,
                                                       engine=engine)
    scfg = SelectionConfig(**cfg.selection)
    examples = examples_from_selection(srows, scfg.truncated)
    validate = _greedy_accuracy_fn(val_p, tmpl, tok, cfg.eval.max_new_tokens, cfg.eval.batch_size) if val_p else None

    with stage("train"):
        import copy

        from .engines import release_workers

        release_workers()   # free the Ray workers' models while this process trains

        res = train(examples, cfg.train, out / "train", copy.deepcopy(model), tok, base_spec=cfg.model,
                    validate=validate, shuffle=False, progress=progress,  # selection already ordered the rows
                    overwrite=overwrite)
    tau = res["tau"]
    gates = example_gates(examples, cfg.train, tau)

    reports, stores = {}, {}
    trained_model = None
    for name, spec in (("base", cfg.model), ("trained", str(out / "train" / "merged"))):
        with stage(f"eval {name}"):
            if name == "trained":
                trained_model, _ = load_model(spec)
            m = model if name == "base" else trained_model
            esampler = sampler
            if sampler is not None and name == "trained":
                if cfg.train.full_finetune:    # no adapter to serve: a new engine on the merged weights
                    sampler.close()
                    sampler = esampler = make_sampler(cfg.backend, spec, cfg.vllm, tokenizer=tok)
                else:                          # the trained adapter, as a LoRA on the same engine
                    spec = str(out / "train" / "adapter")
                    esampler = sampler.for_model(spec)
            rep, stores[name] = evaluate_model(m, tok, spec, test_p, tmpl, cfg.eval, out / "eval" / name,
                                               label=f"{name}: {spec}", overwrite=overwrite, progress=progress,
                                               engine=engine, sampler=esampler)
            reports[name] = rep

    if sampler is not None:
        sampler.close()
    paired = {}
    for metric, idx in (("greedy", 1), ("avg_at_n", 0)):
        a, b = stores["trained"][idx], stores["base"][idx]
        if a is not None and b is not None:
            paired[metric] = paired_difference(_per_problem(a), _per_problem(b))

    def acc(rep, name):
        return {"avg_at_n": rep.strict.avg_at_n.value if cfg.eval.n > 0 else None,
             "greedy": rep.strict.greedy.value if rep.strict.greedy else None,
             "n_problems": rep.n_problems, "n_samples": cfg.eval.n}

    metrics = [json.loads(l) for l in (out / "train" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    tables = []
    tt = tier_table(test_p, stores)
    if tt:
        tables.append(tt)
    with stage("fork analysis"):
        fc = fork_changes(model, trained_model, tok, examples, gates)
    tables.append({
        "title": (f"Most-changed forks: on {fc['positions']} completion tokens of training rollouts (teacher-forced), the "
                  f"trained argmax differs from the base at {fc['changed_fraction']:.2%} of positions; "
                  f"{fc['changed_in_base_top5']}/{fc['changed']} of the new tokens are in the base top-5; "
                  f"{fc['changed_at_gated']}/{fc['changed']} sit at gated positions; mean base entropy "
                  f"{fc['mean_entropy_changed']:.2f} nats at changed vs {fc['mean_entropy_unchanged']:.2f} at unchanged positions."),
        "header": ["base argmax", "trained argmax", "count", "mean base entropy (nats)"],
        "rows": [[repr(r["base"]), repr(r["tuned"]), r["count"], f"{r['mean_base_entropy']:.2f}"] for r in fc["most_common"]]})
    key = "greedy" if "greedy" in paired else "avg_at_n"
    summary = {
        "title": f"ReasonMaxxer run: {cfg.model}",
        "summary": {"model": cfg.model, "train problems": cfg.train_problems, "test problems": cfg.test_problems,
                    "template": cfg.template, "method": cfg.train.variant, "gate": cfg.train.gate,
                    "lam": cfg.train.lam, "tau": round(tau, 4), "tau_source": res["tau_source"],
                    "steps": res["total_steps"], "selected step": res["selected_step"],
                    "selected val accuracy": res["selected_val_accuracy"],
                    "entropies": "reused from the sampler" if score_info.get("reused_sampler_entropies") else "scored"},
        "accuracy": {"base": acc(reports["base"], "base"), "trained": acc(reports["trained"], "trained"),
                     "paired": {"metric": key, **paired.get(key, {})}, "paired_all": paired},
        "entropy": {"values": [h for e in examples for h in e.entropies], "tau": tau, "gated_fraction": res["gated_fraction"]},
        "examples": _examples_for_report(model, tok, examples, gates),
        "curves": metrics,
        "timings": timings,
        "tables": tables,
        "fork_changes": fc,
        "selection": {k: v for k, v in sel.stats.items()},
        "artifacts": {"adapter": "train/adapter", "merged": "train/merged", "rollouts": "rollouts",
                      "eval base": "eval/base/eval.md", "eval trained": "eval/trained/eval.md",
                      "metrics": "train/metrics.jsonl"},
    }
    from .report import write_train_report

    md, html = write_train_report(out, summary)
    small = {k: v for k, v in summary.items() if k not in ("entropy", "examples", "curves", "tables")}
    small["entropy"] = {"tau": tau, "gated_fraction": res["gated_fraction"], "n_tokens": len(summary["entropy"]["values"])}
    atomic_write_json(out / "summary.json", small)
    if progress:
        print("\n== result (held-out, same problems) ==")
        b, t = small["accuracy"]["base"], small["accuracy"]["trained"]
        for metric in ("greedy", "avg_at_n"):
            if b.get(metric) is not None:
                p = paired.get(metric, {})
                ci = f" (paired diff {p['mean_diff']:+.3f}, 95% CI [{p['low']:+.3f}, {p['high']:+.3f}], n={p['n']})" if p else ""
                print(f"{metric:9s} base {b[metric]:.3f} -> trained {t[metric]:.3f}{ci}")
        print(f"tau {tau:.3f} nats, gated fraction {res['gated_fraction']:.2%}; report: {md} , {html}")
    return small


def calibrate(store: RolloutStore, model_spec: str, model, tokenizer, template, validation, *, taus: Sequence[float],
              selection: dict, train_cfg: TrainConfig, out: Path, max_steps: int = 8, max_new_tokens: int = 256,
              progress: bool = True) -> dict:
    """Sweep tau (nats) with short trainings; pick the best held-out greedy accuracy.

    Each candidate trains `max_steps` optimizer steps from the same data and is scored on the
    validation problems; tau=None rows are never produced (the gate must be non-empty).
    Writes out/calibrate.json and out/calibrate.md; returns the dict.
    """
    import copy
    from dataclasses import replace

    from .train import example_gates, train

    from .selection import SelectionConfig

    out = Path(out)
    sel, srows, _ = prepare_training_data(store, model_spec, model, tokenizer, selection, train_cfg,
                                          out / "scores.parquet", progress=progress)
    examples = examples_from_selection(srows, SelectionConfig(**selection).truncated)
    validate = _greedy_accuracy_fn(validation, template, tokenizer, max_new_tokens, 32)
    base_acc = validate(model)
    rows = []
    for tau in taus:
        tcfg = replace(train_cfg, tau=float(tau), max_steps=max_steps, checkpoint_every=max_steps)
        gates = example_gates(examples, tcfg, float(tau))
        n_comp = sum(len(e.completion_ids) for e in examples)
        frac = sum(int(g.sum()) for g in gates) / max(1, n_comp)
        if frac == 0:
            rows.append({"tau": float(tau), "gated_fraction": 0.0, "val_accuracy": None, "note": "empty gate"})
            continue
        res = train(examples, tcfg, out / f"tau-{float(tau):g}", copy.deepcopy(model), tokenizer, base_spec=model_spec,
                    validate=validate, shuffle=False, progress=progress, export=False)
        rows.append({"tau": float(tau), "gated_fraction": round(frac, 5),
                     "val_accuracy": res["history"][-1].get("val_accuracy"), "steps": res["total_steps"]})
    scored = [r for r in rows if r["val_accuracy"] is not None]
    if not scored:
        raise ReasonMaxxerError("calibrate: every candidate tau gives an empty gate; try lower values")
    best = max(scored, key=lambda r: (r["val_accuracy"], -abs(r["gated_fraction"] - 0.05)))
    result = {"base_val_accuracy": base_acc, "n_validation": len(validation), "candidates": rows, "best_tau": best["tau"],
              "max_steps": max_steps}
    md = ["| tau (nats) | gated fraction | val greedy accuracy |", "|---|---|---|",
          f"| (base, no training) | - | {base_acc:.3f} |"]
    for r in rows:
        acc = "-" if r["val_accuracy"] is None else f"{r['val_accuracy']:.3f}"
        md.append(f"| {r['tau']:g} | {r['gated_fraction']:.2%} | {acc}{' (best)' if r is best else ''} |")
    atomic_write_json(out / "calibrate.json", result)
    from .store import atomic_write_bytes

    atomic_write_bytes(out / "calibrate.md", ("\n".join(md) + "\n").encode())
    result["markdown"] = "\n".join(md)
    return result
