"""Side-by-side comparison of ReasonMaxxer runs and RL baselines (method.md s.5): `compare`.

Reads the artifacts the runs already wrote (nothing is re-run):

- a ReasonMaxxer run dir (`run`/`demo`): ``run_config.json``, ``timings.json``,
  ``rollouts/`` (the sampled base rollouts), ``train/metrics.jsonl``, ``train/result.json``,
  ``eval/{base,trained}/eval.json``, ``train/merged`` (for the parameter count);
- a baseline dir (`baseline`): ``result.json`` and ``curve.jsonl``.

Compute is counted the same way for every method (`baselines.flops`: 2N per token through a
forward pass, 6N per token trained), on the method's own work only: for ReasonMaxxer the
base rollouts (every prompt and completion token, as if no prefix were shared), the
reference forward of the anchor, the training tokens, and the greedy validation decodes of
checkpoint selection (an upper bound: prompt + max_new_tokens per problem); for a baseline
its generation, training and (beta > 0) reference forwards. Held-out evaluation is
measurement, not method, and is excluded on both sides (its wall-clock is shown apart).

Compute-to-match: the compute at which a baseline's held-out curve first reaches the
reference run's held-out accuracy, divided by the reference run's compute; when the curve
never gets there, the ratio at the end of the curve is a lower bound (">= x").
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from ..errors import ReasonMaxxerError
from ..io import atomic_write_bytes, atomic_write_json, read_jsonl
from .baselines import flops


# -- pure ----------------------------------------------------------------------------------
def compute_to_match(curve: Sequence[dict], target: float, metric: str, ref_flops: float, ref_seconds: float) -> dict:
    """Where a baseline curve first reaches `target` (same metric, same held-out problems).

    curve: rows with `metric`, "flops", "train_seconds", "step", in step order. Returns
    {"reached": bool, "step", "flops_ratio", "wall_ratio", "lower_bound": not reached}; the
    ratios are the baseline's compute at that point (or at the curve's end) divided by the
    reference's. An empty curve gives reached False and ratios None.
    """
    rows = [r for r in curve if r.get(metric) is not None]
    if not rows:
        return {"reached": False, "step": None, "flops_ratio": None, "wall_ratio": None, "lower_bound": True}
    hit = next((r for r in rows if r[metric] >= target - 1e-12), None)
    r = hit or rows[-1]
    return {
        "reached": hit is not None,
        "step": r["step"],
        "flops_ratio": r["flops"] / ref_flops if ref_flops else None,
        "wall_ratio": r["train_seconds"] / ref_seconds if ref_seconds else None,
        "lower_bound": hit is None,
    }


def _ratio_text(m: dict, key: str) -> str:
    x = m.get(key)
    if x is None:
        return "-"
    return f">= {x:.1f}x (not reached)" if m["lower_bound"] else f"{x:.1f}x"


# -- reading runs -------------------------------------------------------------------------------
def _json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ReasonMaxxerError(f"{p}: missing (is the run finished?)") from None
    except json.JSONDecodeError as e:
        raise ReasonMaxxerError(f"{p}: invalid JSON ({e})") from None


def _jsonl(p: Path) -> list[dict]:
    """The rows of a JSON Lines file ([] for an empty one); a bad line is a one-line error."""
    return [r for _, r in read_jsonl(p, allow_empty=True)]


def _n_params_from_checkpoint(d: Path) -> int:
    from safetensors import safe_open

    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ReasonMaxxerError(f"{d}: no .safetensors files to count parameters from")
    n = 0
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                n += math.prod(fh.get_slice(k).get_shape())
    return n


def _eval_fields(path: Path) -> dict:
    """An eval.json's strict avg@n and greedy (value, 95% CI) and its mean completion length."""
    rep = _json(path)
    s = rep["strict"]
    out = {} if rep.get("mean_tokens") is None else {"mean_tokens": rep["mean_tokens"]}
    if s.get("avg_at_n"):
        out.update(
            avg_at_n=s["avg_at_n"]["value"], avg_at_n_low=s["avg_at_n"]["low"], avg_at_n_high=s["avg_at_n"]["high"]
        )
    if s.get("greedy"):
        out.update(greedy=s["greedy"]["value"], greedy_low=s["greedy"]["low"], greedy_high=s["greedy"]["high"])
    return out


def read_reasonmaxxer_run(d: Path) -> dict:
    """A ReasonMaxxer run dir -> one comparison row (see module docstring for what is counted)."""
    import pyarrow.compute as pc

    from ..store import RolloutStore

    cfg = _json(d / "run_config.json")
    timings = _json(d / "timings.json")
    tres = _json(d / "train" / "result.json")
    metrics = _jsonl(d / "train" / "metrics.jsonl")
    n_params = _n_params_from_checkpoint(d / "train" / "merged")
    store = RolloutStore(d / "rollouts")
    man = store.manifest()
    rollouts = store.read_table(["prompt_ids", "token_ids"])
    prompt_tokens = pc.sum(pc.list_value_length(rollouts.column("prompt_ids"))).as_py() or 0
    sample_tokens = prompt_tokens + (pc.sum(pc.list_value_length(rollouts.column("token_ids"))).as_py() or 0)
    # every token of every trained sequence goes through the forward and backward pass (runs
    # written before "tokens" was logged: tokens/s x seconds, the same count rounded)
    trained = sum(m["tokens"] if "tokens" in m else round(m["tokens_per_s"] * m["seconds"]) for m in metrics)
    lam = cfg.get("train", {}).get("lam", 0.2)
    variant = cfg.get("train", {}).get("variant", "reasonmaxxer")
    reference_fwd = trained if lam and variant not in ("no_anchor", "rft") else 0
    val_tokens = 0
    if cfg.get("validation_problems") and tres.get("history"):
        from ..data.benchmarks import load_problems

        try:
            n_val = len(load_problems(cfg["validation_problems"], data_dir=cfg.get("data_dir")))
        except ReasonMaxxerError:
            n_val = 0
        max_new = cfg.get("eval", {}).get("max_new_tokens", 256)
        mean_prompt = prompt_tokens / rollouts.num_rows if rollouts.num_rows else 0.0
        val_tokens = round(len(tres["history"]) * n_val * (mean_prompt + max_new))
    forward = sample_tokens + reference_fwd + val_tokens
    sample_key, sample_s = "sample", timings.get("sample", 0.0)
    reuse = Path(cfg["reuse"]) if cfg.get("reuse") else None
    if reuse is not None and not reuse.is_absolute():
        reuse = d.parent / reuse if (d.parent / reuse).is_dir() else Path.cwd() / reuse
    if (
        reuse is not None
        and (reuse / "timings.json").is_file()
        and _json(reuse / "rollouts" / "manifest.json").get("config_hash") == man.get("config_hash")
    ):
        # the base rollouts were copied from `reuse`: charge their sampling time as measured there
        sample_key, sample_s = f"sample (in {reuse})", _json(reuse / "timings.json").get("sample", sample_s)
    seconds = {sample_key: sample_s, **{k: v for k, v in timings.items() if k != "sample"}}
    method_seconds = sample_s + timings.get("select + score", 0.0) + timings.get("train", 0.0)
    label = variant if cfg.get("train", {}).get("gate", "entropy") == "entropy" else f"{variant} (random gate)"
    row = {
        "kind": "reasonmaxxer",
        "dir": str(d),
        "method": label if label != "reasonmaxxer" else "ReasonMaxxer",
        "n_params": n_params,
        "seconds": seconds,
        "method_seconds": round(method_seconds, 1),
        "eval_seconds": round(sum(v for k, v in timings.items() if k.startswith("eval")), 1),
        "generated_tokens": man.get("generated_tokens", 0),
        "trained_tokens": trained,
        "forward_tokens": forward,
        "flops": flops(n_params, forward, trained),
        "steps": tres.get("total_steps"),
        **_eval_fields(d / "eval" / "trained" / "eval.json"),
    }
    base_eval = d / "eval" / "base" / "eval.json"
    if base_eval.is_file():
        row["base"] = _eval_fields(base_eval)
    return row


def read_baseline_run(d: Path) -> dict:
    """A baseline dir -> one comparison row (final held-out accuracy = the curve's last point)."""
    curve = _jsonl(d / "curve.jsonl") if (d / "curve.jsonl").is_file() else []
    last = curve[-1] if curve else {}
    if (d / "result.json").is_file():
        res = _json(d / "result.json")
    elif curve:  # still running (or stopped): the last evaluated point stands for the run so far
        bcfg = _json(d / "baseline_config.json")["baseline"]
        res = {
            "method": f"{bcfg['method']} (partial)",
            "n_params": last.get("n_params", 0),
            "steps": last["step"],
            "train_seconds": last["train_seconds"],
            "eval_seconds": last.get("eval_seconds", 0.0),
            "generated_tokens": last["generated_tokens"],
            "trained_tokens": last["trained_tokens"],
            "forward_tokens": last["forward_tokens"],
            "flops": last["flops"],
            "max_train_seconds": bcfg.get("max_train_seconds"),
        }
    else:
        raise ReasonMaxxerError(f"{d}: a baseline with no evaluated step yet (no curve.jsonl rows)")
    acc = {
        k: last[k]
        for k in ("avg_at_n", "avg_at_n_low", "avg_at_n_high", "greedy", "greedy_low", "greedy_high")
        if last.get(k) is not None
    }
    return {
        "kind": "baseline",
        "dir": str(d),
        "method": res["method"],
        "n_params": res["n_params"],
        "seconds": {"train": res["train_seconds"], "eval (held-out curve)": res["eval_seconds"]},
        "method_seconds": res["train_seconds"],
        "eval_seconds": res["eval_seconds"],
        "generated_tokens": res["generated_tokens"],
        "trained_tokens": res["trained_tokens"],
        "forward_tokens": res["forward_tokens"],
        "flops": res["flops"],
        "steps": res["steps"],
        "curve": curve,
        "max_train_seconds": res.get("max_train_seconds"),
        **acc,
    }


def read_run(d: str | Path) -> dict:
    d = Path(d)
    if (d / "baseline_config.json").is_file():
        return read_baseline_run(d)
    if (d / "run_config.json").is_file():
        return read_reasonmaxxer_run(d)
    raise ReasonMaxxerError(f"{d}: not a run dir (no run_config.json or baseline_config.json)")


# -- the table ----------------------------------------------------------------------------------
def _acc(r: dict, metric: str) -> str:
    v = r.get(metric)
    if v is None:
        return "-"
    lo, hi = r.get(f"{metric}_low"), r.get(f"{metric}_high")
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{v:.3f}"


def compare(rows: list[dict], *, reference: int = 0, metric: str = "avg_at_n", gpu_hour_price: float = 2.0) -> dict:
    """Add cost and compute-to-match (against rows[reference]) to each row. Returns the comparison."""
    ref = rows[reference]
    if ref["kind"] != "reasonmaxxer":
        raise ReasonMaxxerError(f"compare: the reference {ref['dir']} is not a ReasonMaxxer run")
    if ref.get(metric) is None:
        raise ReasonMaxxerError(f"compare: the reference run has no held-out {metric}")
    for r in rows:
        r["cost_usd"] = r["method_seconds"] / 3600 * gpu_hour_price
        r["flops_vs_reference"] = r["flops"] / ref["flops"]
        r["wall_vs_reference"] = r["method_seconds"] / ref["method_seconds"] if ref["method_seconds"] else None
        if r["kind"] == "baseline":
            r["compute_to_match"] = compute_to_match(
                r["curve"], ref[metric], metric, ref["flops"], ref["method_seconds"]
            )
    return {
        "reference": ref["dir"],
        "metric": metric,
        "target": ref[metric],
        "gpu_hour_price": gpu_hour_price,
        "base": ref.get("base"),
        "rows": rows,
    }


def render_markdown(c: dict) -> str:
    m = c["metric"]
    lines = [
        f"Held-out {m} to match: {c['target']:.3f} (reference: {c['reference']}). Compute = estimated FLOPs "
        f"(2N per forward token, 6N per trained token) of each method's own work; held-out evaluation excluded. "
        f"Cost at ${c['gpu_hour_price']:.2f} per device-hour of the method's wall-clock.",
        "",
    ]
    if c.get("base"):
        b = c["base"]
        lines += [
            f"Base model: avg@n {b.get('avg_at_n', float('nan')):.3f}, greedy {b.get('greedy', float('nan')):.3f}.",
            "",
        ]
    lines += [
        "| method | avg@n pass@1 [95% CI] | greedy [95% CI] | steps | wall-clock (s) | eval (s) | tokens generated "
        "| tokens trained | FLOPs | FLOPs vs ref | cost ($) | compute-to-match (FLOPs) | compute-to-match (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in c["rows"]:
        ctm = r.get("compute_to_match")
        lines.append(
            f"| {r['method']} | {_acc(r, 'avg_at_n')} | {_acc(r, 'greedy')} | {r.get('steps') or '-'} | "
            f"{r['method_seconds']:.0f} | {r['eval_seconds']:.0f} | {r['generated_tokens']:,} | {r['trained_tokens']:,} | "
            f"{r['flops']:.3g} | {r['flops_vs_reference']:.2f}x | {r['cost_usd']:.3f} | "
            f"{_ratio_text(ctm, 'flops_ratio') if ctm else '-'} | {_ratio_text(ctm, 'wall_ratio') if ctm else '-'} |"
        )
    lines += ["", "Wall-clock by stage (s):", ""]
    for r in c["rows"]:
        lines.append(f"- {r['method']} ({r['dir']}): " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))
    return "\n".join(lines) + "\n"


def plot(c: dict, path: Path) -> None:
    """Held-out accuracy vs FLOPs (log x): baseline curves, ReasonMaxxer runs as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = c["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in c["rows"]:
        if r["kind"] == "baseline":
            pts = [(x["flops"], x[m]) for x in r["curve"] if x.get(m) is not None and x["flops"] > 0]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=r["method"])
        elif r.get(m) is not None:
            ax.scatter([r["flops"]], [r[m]], marker="*", s=140, zorder=5, label=r["method"])
    ax.axhline(c["target"], ls="--", lw=1, color="k", label="reference accuracy")
    if c.get("base") and c["base"].get(m) is not None:
        ax.axhline(c["base"][m], ls=":", lw=1, color="grey", label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("estimated training compute (FLOPs, log scale)")
    ax.set_ylabel(f"held-out {m}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def run_compare(
    run_dirs: Sequence[str],
    out: str | Path,
    *,
    reference: str | None = None,
    metric: str = "avg_at_n",
    gpu_hour_price: float = 2.0,
) -> str:
    """Read the runs, write ``compare.json``, ``compare.md`` and ``accuracy_vs_compute.png``. Returns the Markdown."""
    rows = [read_run(d) for d in run_dirs]
    if reference is not None:
        ref_rows = [i for i, r in enumerate(rows) if Path(r["dir"]).resolve() == Path(reference).resolve()]
        if not ref_rows:
            rows.insert(0, read_run(reference))
            ref_rows = [0]
        ref = ref_rows[0]
    else:
        kinds = [i for i, r in enumerate(rows) if r["kind"] == "reasonmaxxer"]
        if not kinds:
            raise ReasonMaxxerError("compare: no ReasonMaxxer run among the dirs (needed as the reference)")
        ref = kinds[0]
    c = compare(rows, reference=ref, metric=metric, gpu_hour_price=gpu_hour_price)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(c)
    atomic_write_json(out / "compare.json", c)
    atomic_write_bytes(out / "compare.md", md.encode())
    plot(c, out / "accuracy_vs_compute.png")
    return md
