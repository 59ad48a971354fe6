"""`reasonmaxxer distill`: how many dimensions does a fine-tune need? A rank sweep of KL-LoRA
students of any tuned teacher (a PEFT adapter, a merged or full fine-tune, a public RL model).

    out/rollouts/             the teacher's own rollouts on --problems (sampled once; or --rollouts)
    out/rank-<r>/             one `stages.distill.distill_rank` run dir per rank (resumable; a
                              finished rank is skipped)
    out/eval/<name>/          held-out evaluation (avg@n, greedy) of teacher, base and each student
    out/distill.json, .md     per rank: accuracy, fraction of the teacher's gain recovered (95%
                              bootstrap interval over problems), trainable parameters (% of the
                              model), KL(teacher || student) on the teacher's held-out rollouts,
                              argmax agreement with the teacher where the teacher's argmax differs
                              from the base's
    out/recovery_vs_rank.png
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ..analysis.delta import recovery_bootstrap
from ..analysis.forks import completion_rows
from ..analysis.positions import position_logits
from ..analysis.tokens import argmax_change
from ..errors import ReasonMaxxerError
from ..io import atomic_write_bytes, atomic_write_json
from ..stages.distill import DistillConfig, distill_rank
from ..stages.train import TrainExample, batch_tensors
from .run_summary import per_problem_accuracy


def vocab_digest(tok) -> str:
    """sha256 (12 hex digits) of a tokenizer's token -> id map."""
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:12]


def check_same_vocab(teacher_spec: str, teacher, ttok, base_spec: str, base, btok) -> None:
    """One ReasonMaxxerError line naming both models unless their tokenizers and output vocabularies agree."""
    vt, vb = teacher.get_output_embeddings().weight.shape[0], base.get_output_embeddings().weight.shape[0]
    dt, db = vocab_digest(ttok), vocab_digest(btok)
    if vt != vb or dt != db:
        raise ReasonMaxxerError(
            f"distill: teacher {teacher_spec!r} ({vt} logits, {len(ttok)} tokens, vocab {dt}) and base "
            f"{base_spec!r} ({vb} logits, {len(btok)} tokens, vocab {db}) have different vocabularies; "
            "a KL over the vocabulary needs the base's tokenizer"
        )


def examples_of(rows: Sequence[dict], entropies: Sequence[Sequence[float]] | None = None) -> list[TrainExample]:
    """Rollout rows (prompt_ids, token_ids) as `TrainExample`s; empty completions are dropped.
    entropies: the base's per completion token (for --positions gated), else zeros."""
    out = []
    for i, r in enumerate(rows):
        c = tuple(r["token_ids"])
        if not c:
            continue
        h = tuple(entropies[i]) if entropies is not None else (0.0,) * len(c)
        out.append(
            TrainExample(
                tuple(r["prompt_ids"]),
                c,
                h,
                0.0,
                bool(r.get("strict_correct")),
                key=(r["problem_id"], r["sample_index"]),
            )
        )
    return out


@torch.no_grad()
def teacher_agreement(teacher, base, student, examples: Sequence[TrainExample], pad: int, batch: int = 8) -> dict:
    """Teacher-forced on `examples` (the teacher's held-out rollouts): mean KL(teacher || student)
    (nats, over every completion position) and the student's argmax agreement with the teacher
    at the positions where the teacher's argmax differs from the base's (`argmax_change` cls != 0).
    student = base gives the base's own KL (and agreement 0)."""
    kl_sum, n, agree, changed = 0.0, 0, 0, 0
    for s in range(0, len(examples), batch):
        ex = examples[s : s + batch]
        ids, att, *_ = batch_tensors(ex, pad)
        rows = completion_rows(ex)
        for lt, lb, ls in zip(*(position_logits(m, ids, att, rows) for m in (teacher, base, student))):
            lpt, lps = torch.log_softmax(lt, -1), torch.log_softmax(ls, -1)  # [c, V] fp32
            kl_sum += float((lpt.exp() * (lpt - lps)).sum())
            n += lt.shape[0]
            _, ta, _, cls = argmax_change(lb, lt)
            m = cls != 0
            changed += int(m.sum())
            agree += int((ls.argmax(-1) == ta)[m].sum())
    return {
        "kl": kl_sum / max(1, n),
        "positions": n,
        "changed_positions": changed,
        "argmax_agreement": agree / changed if changed else None,
    }


def markdown_table(rows: list[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    def rec(r):
        v = r.get("recovery") or {}
        if v.get("value") is None:
            return "-"
        return f"{100 * v['value']:.0f}% [{100 * v['low']:.0f}, {100 * v['high']:.0f}]"

    lines = [
        "| model | rank | trainable % | avg@n % | greedy % | gain recovered (avg@n, 95% CI) | KL to teacher (nats) "
        "| argmax agreement where teacher != base % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kl = "-" if r.get("kl") is None else f"{r['kl']:.4f}"
        tp = "-" if r.get("trainable_pct") is None else f"{r['trainable_pct']:.3f}"
        lines.append(
            f"| {r['name']} | {r.get('rank') or '-'} | {tp} | {pct(r.get('avg_at_n'))} | {pct(r.get('greedy'))} | "
            f"{rec(r)} | {kl} | {pct(r.get('argmax_agreement'))} |"
        )
    return "\n".join(lines) + "\n"


def plot_recovery(rows: list[dict], path: Path) -> None:
    """Gain recovered (with its interval) and KL to the teacher, against the rank (PNG, atomic)."""
    from ..reports.plots import new_figure, png_bytes

    st = [r for r in rows if r.get("rank")]
    fig = new_figure(10, 4)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    pts = [r for r in st if (r.get("recovery") or {}).get("value") is not None]
    if pts:
        xs = [r["rank"] for r in pts]
        ys = [100 * r["recovery"]["value"] for r in pts]
        lo = [y - 100 * r["recovery"]["low"] for y, r in zip(ys, pts)]
        hi = [100 * r["recovery"]["high"] - y for y, r in zip(ys, pts)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color="C2", capsize=3, label="student")
    ax.axhline(100, color="C1", ls="--", label="teacher")
    ax.axhline(0, color="C0", ls="--", label="base")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("teacher's gain recovered (%, avg@n)")
    ax.set_title("Gain recovered vs rank")
    ax.legend(fontsize=8)
    kl = [r for r in st if r.get("kl") is not None]
    if kl:
        ax2.plot([r["rank"] for r in kl], [r["kl"] for r in kl], "o-", color="C3", label="student")
        ax2.set_xscale("log", base=2)
    base_kl = next((r["kl"] for r in rows if r["name"] == "base" and r.get("kl") is not None), None)
    if base_kl:
        ax2.axhline(base_kl, color="C0", ls="--", label="base")
    ax2.set_yscale("log")
    ax2.set_xlabel("LoRA rank")
    ax2.set_ylabel("KL(teacher || model), nats / token")
    ax2.set_title("Held-out KL to the teacher")
    ax2.legend(fontsize=8)
    atomic_write_bytes(Path(path), png_bytes(fig))


def load_models(teacher_spec: str, base_spec: str):
    """(teacher, base, tokenizer): both loaded (`models.load_model`), their vocabularies checked."""
    from ..models import load_model

    base, btok = load_model(base_spec)
    teacher, ttok = load_model(teacher_spec)
    check_same_vocab(teacher_spec, teacher, ttok, base_spec, base, btok)
    return teacher, base, btok


def teacher_rows(out: Path, teacher_spec, teacher, tok, problems, tmpl, scfg, rollouts: str | None, progress: bool):
    """The teacher's rollouts: --rollouts STORE, else sampled once into out/rollouts (resumable)."""
    from ..stages.sample import sample_stage
    from ..store import RolloutStore

    if rollouts:
        store = RolloutStore(rollouts)
        store.manifest()  # one line if it is not a store
    else:
        store = sample_stage(
            out / "rollouts", teacher_spec, problems, tmpl, scfg, model=teacher, tokenizer=tok, progress=progress
        )
    return store.read_rows()


def run_distill(
    teacher_spec: str,
    base_spec: str,
    ranks: Sequence[int],
    problems_spec: str,
    out: str | Path,
    *,
    cfg: DistillConfig = DistillConfig(),
    rollouts: str | None = None,
    test_problems: str | None = None,
    template: str = "fewshot",
    data_dir: str | None = None,
    limit: int | None = None,
    n: int = 4,
    temperature: float = 0.7,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    eval_n: int = 4,
    heldout_rollouts: int = 64,
    progress: bool = True,
) -> dict:
    """Distill `teacher_spec` into LoRA students of `base_spec` at each rank; evaluate on
    `test_problems` (when given). Writes the files of the module docstring; returns distill.json."""
    from ..backends.hf import SamplingConfig
    from ..data.benchmarks import load_problems
    from ..data.prompts import get_template
    from ..stages.score import score_rows

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not ranks or min(ranks) < 1:
        raise ReasonMaxxerError(f"distill: --ranks must be >= 1, got {list(ranks)}")
    teacher, base, tok = load_models(teacher_spec, base_spec)
    tmpl = get_template(template)
    problems = load_problems(problems_spec, data_dir=data_dir, limit=limit)
    scfg = SamplingConfig(n=n, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = teacher_rows(out, teacher_spec, teacher, tok, problems, tmpl, scfg, rollouts, progress)
    ents = score_rows(rows, base, tok, progress=progress) if cfg.positions == "gated" else None
    examples = examples_of(rows, ents)
    students = {}
    for r in sorted(set(ranks)):
        if progress:
            print(f"[distill] rank {r}", flush=True)
        students[r] = distill_rank(
            examples,
            r,
            cfg,
            out / f"rank-{r}",
            base,
            teacher,
            tok,
            base_spec=base_spec,
            teacher_spec=teacher_spec,
            progress=progress,
        )
    table = [
        {"name": f"rank-{r}", "rank": r, **{k: res[k] for k in ("trainable_params", "trainable_pct", "final_kl")}}
        for r, res in students.items()
    ]
    if test_problems:
        table = evaluate_all(
            out, teacher_spec, teacher, base_spec, base, tok, students, table, test_problems, tmpl, data_dir,
            eval_n, temperature, max_new_tokens, batch_size, heldout_rollouts, progress,
        )  # fmt: skip
    result = {
        "teacher": teacher_spec,
        "base": base_spec,
        "config": json.loads(json.dumps(asdict(cfg))),
        "rows": table,
    }
    atomic_write_json(out / "distill.json", result)
    atomic_write_bytes(out / "distill.md", markdown_table(table).encode())
    plot_recovery(table, out / "recovery_vs_rank.png")
    return result


def evaluate_all(
    out, teacher_spec, teacher, base_spec, base, tok, students, table, test_spec, tmpl, data_dir,
    eval_n, temperature, max_new_tokens, batch_size, heldout_rollouts, progress,
) -> list[dict]:  # fmt: skip
    """Held-out accuracy of teacher, base, students; gain recovered; KL and argmax agreement on
    the teacher's held-out samples (its first `heldout_rollouts` rows). Returns the table rows."""
    from ..data.benchmarks import load_problems
    from ..models import load_model
    from ..stages.evaluate import EvalConfig, evaluate_model

    problems = load_problems(test_spec, data_dir=data_dir)
    ecfg = EvalConfig(n=max(1, eval_n), temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size)

    def run_eval(name, model, spec):
        rep, (s_store, g_store) = evaluate_model(
            model, tok, spec, problems, tmpl, ecfg, out / "eval" / name, progress=progress
        )
        g = rep.strict.greedy
        return (
            rep,
            per_problem_accuracy(s_store),
            per_problem_accuracy(g_store),
            s_store,
            (None if g is None else g.value),
        )

    t_rep, t_acc, t_gacc, t_store, t_greedy = run_eval("teacher", teacher, teacher_spec)
    b_rep, b_acc, b_gacc, _, b_greedy = run_eval("base", base, base_spec)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    held = examples_of(t_store.read_rows()[:heldout_rollouts])
    rows = [
        {"name": "teacher", "avg_at_n": t_rep.strict.avg_at_n.value, "greedy": t_greedy, "kl": 0.0},
        {
            "name": "base",
            "avg_at_n": b_rep.strict.avg_at_n.value,
            "greedy": b_greedy,
            **teacher_agreement(teacher, base, base, held, pad),
        },
    ]
    for row in table:
        student, _ = load_model(students[row["rank"]]["adapter"])
        rep, acc, gacc, _, greedy = run_eval(row["name"], student, students[row["rank"]]["adapter"])
        row = {**row, "avg_at_n": rep.strict.avg_at_n.value, "greedy": greedy}
        row["recovery"] = recovery_bootstrap(acc, b_acc, t_acc)
        row["recovery_greedy"] = recovery_bootstrap(gacc, b_gacc, t_gacc)
        row.update(teacher_agreement(teacher, base, student, held, pad))
        rows.append(row)
        del student
    return rows
