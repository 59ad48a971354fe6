"""How low-dimensional is a fine-tune's change? The spectrum of its weight delta, and how much of
its accuracy gain a low-rank student recovers.

A LoRA adapter's delta of one module is dW = scaling * B @ A (B [out, r], A [r, in]); a full
fine-tune's is tuned - base. Per layer and module we report the singular values of dW and its
effective rank: the fewest singular values holding a given share of the energy sum(s_i^2)
(the squared Frobenius norm), at 90% and 99%.

`recovery_bootstrap`: the fraction of the teacher's gain a student recovers,
(student - base) / (teacher - base) on per-problem accuracies, with a 95% interval from
resampling the problems (the same resample for the three models: a paired ratio).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ReasonMaxxerError

ENERGIES = (0.9, 0.99)
_LAYER = re.compile(r"layers\.(\d+)\.(.+)$")


def effective_rank(singular_values, energy: float) -> int:
    """The fewest leading singular values whose squares hold at least `energy` (0 < energy <= 1)
    of sum(s^2); 0 for an all-zero spectrum. Order of the input does not matter."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s = np.sort(np.abs(np.asarray(singular_values, dtype=np.float64)))[::-1]
    e = s**2
    total = e.sum()
    if total <= 0:
        return 0
    frac = np.cumsum(e) / total
    # a 1e-12 slack so that exactly-reached shares (e.g. 0.9 of a hand-made spectrum) count
    return int(np.searchsorted(frac, energy - 1e-12) + 1)


@torch.no_grad()
def lora_singular_values(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """Singular values [r] of scaling * b @ a (a [r, in], b [out, r]) without forming the
    [out, in] product: with b = Qb Rb and a^T = Qa Ra (reduced QR), b a = Qb (Rb Ra^T) Qa^T,
    whose singular values are those of the r x r matrix Rb Ra^T. fp64, descending."""
    _, rb = torch.linalg.qr(b.double())  # [r, r]
    _, ra = torch.linalg.qr(a.double().t())  # [r, r]
    return torch.linalg.svdvals(rb @ ra.t()) * abs(float(scaling))


def spectrum_record(name: str, s: Tensor, keep: int = 64) -> dict:
    """One module's record: layer, module, effective ranks, Frobenius norm, leading `keep` singular values."""
    m = _LAYER.search(name)
    s = s.double().cpu()
    rec = {
        "name": name,
        "layer": int(m.group(1)) if m else None,
        "module": m.group(2).split(".")[-1] if m else name,
        "fro_norm": float(s.pow(2).sum().sqrt()),
        "dim": int(s.numel()),
    }
    for en in ENERGIES:
        rec[f"rank_{round(100 * en)}"] = effective_rank(s.numpy(), en)
    rec["singular_values"] = [float(x) for x in s[:keep]]
    return rec


def _lora_scaling(cfg: dict, module: str) -> tuple[int, float]:
    """(r, scaling) of one module from adapter_config.json (rank_pattern / alpha_pattern / rsLoRA)."""
    r = int(next((v for k, v in (cfg.get("rank_pattern") or {}).items() if module.endswith(k)), cfg["r"]))
    alpha = float(
        next((v for k, v in (cfg.get("alpha_pattern") or {}).items() if module.endswith(k)), cfg["lora_alpha"])
    )
    return r, alpha / (r**0.5 if cfg.get("use_rslora") else r)


def lora_spectra(adapter_dir: str | Path) -> list[dict]:
    """Per-module spectrum records of a PEFT LoRA adapter dir (adapter_config.json + weights)."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ReasonMaxxerError(f"{d}: adapter type {cfg.get('peft_type')!r}; --delta reads LoRA adapters")
    files = [d / "adapter_model.safetensors", d / "adapter_model.bin"]
    f = next((p for p in files if p.is_file()), None)
    if f is None:
        raise ReasonMaxxerError(f"{d}: no adapter_model.safetensors or adapter_model.bin")
    state = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
    out = []
    for k in sorted(state):
        if ".lora_A." not in k:
            continue
        mod = k.split(".lora_A.")[0]
        kb = k.replace(".lora_A.", ".lora_B.")
        if kb not in state:
            raise ReasonMaxxerError(f"{f}: {k} has no matching lora_B weight")
        _, scaling = _lora_scaling(cfg, mod)
        out.append(
            spectrum_record(mod.removeprefix("base_model.model."), lora_singular_values(state[k], state[kb], scaling))
        )
    if not out:
        raise ReasonMaxxerError(f"{f}: no LoRA weights (lora_A/lora_B) found")
    return out


@torch.no_grad()
def full_spectra(tuned: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> list[dict]:
    """Per-module spectrum records of tuned - base for every 2-D weight inside a layer
    (`layers.<i>.`) present in both state dicts with the same shape (fp32 SVD)."""
    out = []
    for k in sorted(tuned):
        if not k.endswith(".weight") or k not in base or tuned[k].dim() != 2 or not _LAYER.search(k):
            continue
        if tuned[k].shape != base[k].shape:
            raise ReasonMaxxerError(
                f"delta: {k} has shape {tuple(tuned[k].shape)} vs {tuple(base[k].shape)} in the base"
            )
        dw = tuned[k].float() - base[k].float()
        out.append(spectrum_record(k.removesuffix(".weight"), torch.linalg.svdvals(dw)))
    if not out:
        raise ReasonMaxxerError("delta: no layer weight is shared by the tuned and base models")
    return out


def summarize(records: list[dict]) -> dict:
    """Per module type: mean/max effective rank at each energy, total Frobenius norm."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["module"], []).append(r)
    out = {}
    for mod, rs in sorted(by.items()):
        out[mod] = {"n": len(rs), "fro_norm": float(np.sqrt(sum(r["fro_norm"] ** 2 for r in rs)))}
        for en in ENERGIES:
            key = f"rank_{round(100 * en)}"
            vals = [r[key] for r in rs]
            out[mod][f"mean_{key}"] = float(np.mean(vals))
            out[mod][f"max_{key}"] = int(max(vals))
    return out


def plot_spectra(records: list[dict], path: Path, title: str) -> None:
    """Effective rank (90%, 99%) per layer for each module type, and the normalised singular
    values of every module (PNG, atomic)."""
    from ..io import atomic_write_bytes
    from ..reports.plots import new_figure, png_bytes

    fig = new_figure(10, 4)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    mods = sorted({r["module"] for r in records})
    for i, mod in enumerate(mods):
        rs = sorted((r for r in records if r["module"] == mod and r["layer"] is not None), key=lambda r: r["layer"])
        xs = [r["layer"] for r in rs]
        ax.plot(xs, [r["rank_90"] for r in rs], "o-", color=f"C{i}", label=f"{mod} 90%", ms=3)
        ax.plot(xs, [r["rank_99"] for r in rs], "s--", color=f"C{i}", label=f"{mod} 99%", ms=3, alpha=0.6)
        for r in rs:
            s = np.asarray(r["singular_values"])
            if s.size and s[0] > 0:
                ax2.semilogy(np.arange(1, s.size + 1), s / s[0], color=f"C{i}", alpha=0.3, lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank")
    ax.set_title("Effective rank of the weight change")
    ax.legend(fontsize=7, ncol=2)
    ax2.set_xlabel("singular value index")
    ax2.set_ylabel("s_i / s_1")
    ax2.set_title(title)
    atomic_write_bytes(Path(path), png_bytes(fig))


def run_delta(delta: str, out: str | Path, base: str | None = None) -> dict:
    """`reasonmaxxer analyze --delta`: the spectrum of a LoRA adapter dir, or of a full fine-tune
    (`delta` a model spec, `base` required). Writes out/delta.json and out/delta.png."""
    from ..io import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (Path(delta) / "adapter_config.json").is_file():
        records, kind = lora_spectra(delta), "lora"
    else:
        if not base:
            raise ReasonMaxxerError(
                f"analyze --delta {delta}: not a LoRA adapter dir; pass --base for a full fine-tune"
            )
        from ..models import load_model

        tuned_m, _ = load_model(delta, device="cpu", dtype=torch.float32)
        base_m, _ = load_model(base, device="cpu", dtype=torch.float32)
        records, kind = full_spectra(tuned_m.state_dict(), base_m.state_dict()), "full"
    res = {"delta": str(delta), "base": base, "kind": kind, "summary": summarize(records), "modules": records}
    atomic_write_json(out / "delta.json", res)
    plot_spectra(records, out / "delta.png", f"{kind} delta spectra ({len(records)} modules)")
    return res


def recovery_bootstrap(
    student: Mapping[str, float],
    base: Mapping[str, float],
    teacher: Mapping[str, float],
    *,
    n_boot: int = 10_000,
    seed: int = 0,
) -> dict:
    """Fraction of the teacher's gain recovered, (mean student - mean base) / (mean teacher -
    mean base), over the problems all three have (per-problem accuracies in [0, 1]), with a 95%
    percentile interval: the problems are resampled (numpy's seeded generator, as
    `core.stats.paired_bootstrap`) and the ratio of the resampled means taken; resamples where
    the teacher's gain is 0 are dropped. "value" is None when the teacher gains nothing."""
    common = sorted(set(student) & set(base) & set(teacher))
    if not common:
        raise ReasonMaxxerError(
            "recovery: student, base and teacher share no problem ids; evaluate them on the same problems"
        )
    s, b, t = (np.array([float(m[p]) for p in common]) for m in (student, base, teacher))
    gain = t.mean() - b.mean()
    value = None if gain == 0 else float((s.mean() - b.mean()) / gain)
    idx = np.random.default_rng(seed).integers(0, len(common), size=(n_boot, len(common)))  # [n_boot, n]
    num, den = (s[idx] - b[idx]).mean(1), (t[idx] - b[idx]).mean(1)
    ok = den != 0
    ratios = num[ok] / den[ok]
    low, high = (float(np.quantile(ratios, q)) for q in (0.025, 0.975)) if ratios.size else (None, None)
    return {
        "n": len(common),
        "value": value,
        "low": low,
        "high": high,
        "teacher_gain": float(gain),
        "n_boot": int(ok.sum()),
    }
