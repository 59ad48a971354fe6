"""Peak extra memory of each stage: our bounded path vs the naive [B, T, V] fp32 logits.

    python benchmarks/memory.py                    # CPU, T = 4096 and 8192 (2 cores: a few minutes)
    python benchmarks/memory.py --T 4096 --exact   # real matmuls too (slow: hours of FLOPs on 2 cores)

Model: a randomly initialised Qwen2 with Qwen2.5-1.5B's shapes (vocabulary 151,936, hidden
1536, intermediate 8960, 12 heads, 2 KV heads, tied embeddings) but 2 layers, fp32, batch 1
(one prompt of `--prompt` tokens, the rest of T a completion). Stages, each ours vs naive:

  score     `stages.score.score_sequences`  vs  model(ids).logits.float().log_softmax(-1) (+ gather)
  train     `chunked_micro_batch_loss` vs `micro_batch_loss` (logits), decision + anchor
            (5% gated, every completion token anchored, lam 0.1), forward + backward; the head
            and embeddings frozen, the attention q/v projections trained (LoRA-like)
  analyze   `analysis.tokens.completion_stats` (two models) vs both models' [1, T, V] logits,
            then `compare_distributions` + `top_probs` on the completion rows (the old analyze)
  forks     `analysis.forks.fork_changes` vs both models' logits + `argmax_change`
  examples  `analysis.forks.report_examples` (5% gated) vs the logits + softmax top-5

Measurement: each (stage, impl, T) runs in a fresh subprocess; after the model and inputs are
built and the stage has run once on a 64-token slice (lazy imports, one-time library set-up,
the trained weights' .grad), it resets the peak RSS (writes 5 to /proc/self/clear_refs), runs the stage once and
reads VmHWM from /proc/self/status: peak extra = VmHWM - VmRSS before the stage (MB).

Matmul stub (default, said in the output): on 2 cores one [8192, 1536] x [1536, 151936] matmul
is 3.8 TFLOP (~80 s), and the stages need ~30 of them per T. Without --exact every aten mm /
addmm / bmm / baddbmm returns a zero-filled tensor of the true shape and dtype instead (a
TorchDispatchMode): the same tensors are allocated and touched, with the same lifetimes, so
the memory profile is the real one up to the BLAS library's packing buffers (a few MB); the
FLOPs are skipped. Attention (SDPA) and everything else run for real.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time

STAGES = ("score", "train", "analyze", "forks", "examples")
GOAL = 0.3


def rss_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def build(T: int, prompt: int, vocab: int, hidden: int, inter: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=max(32768, T),
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("q_proj.weight", "v_proj.weight")))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (1, T), generator=g)
    return model, ids


class Tok:
    """What `fork_changes` / `report_examples` need of a tokenizer."""

    pad_token_id = 0

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def stage_fn(stage: str, impl: str, model, ids, prompt: int):
    """A closure running one (stage, impl) once on the 1-row batch `ids` [1, T]."""
    import torch

    from reasonmaxxer.analysis.forks import fork_changes, report_examples
    from reasonmaxxer.analysis.tokens import argmax_change, compare_distributions, completion_stats, top_probs
    from reasonmaxxer.core.losses import LossMasks
    from reasonmaxxer.stages.batch_loss import chunked_micro_batch_loss, micro_batch_loss
    from reasonmaxxer.stages.score import score_sequences
    from reasonmaxxer.stages.train import TrainExample

    T = ids.shape[1]
    att = torch.ones_like(ids)
    c = T - prompt
    g = torch.Generator().manual_seed(2)
    gated = torch.rand(c, generator=g) < 0.05  # [c]
    naive = impl == "naive"

    def logits():  # the naive [1, T, V] logits (model dtype: fp32 here)
        return model(input_ids=ids, attention_mask=att).logits

    if stage == "score":

        def run():
            with torch.no_grad():
                if naive:
                    lp = logits().float().log_softmax(-1)  # [1, T, V]
                    return lp[:, :-1].gather(-1, ids[:, 1:, None])
                return score_sequences(model, ids, att)

    elif stage == "train":
        dec = torch.zeros(1, T, dtype=torch.bool)
        dec[0, prompt:] = gated
        anc = torch.zeros(1, T, dtype=torch.bool)
        anc[0, prompt:] = True
        m = LossMasks(torch.tensor([0.5]), dec, anc, 0.1)
        fn = micro_batch_loss if naive else chunked_micro_batch_loss

        def run():
            loss, _ = fn(model, model, ids, att, m, 0, float(dec.sum()), float(anc.sum()))
            loss.backward()

    elif stage == "analyze":
        spans = [(prompt, c)]

        def run():
            with torch.no_grad():
                if not naive:
                    return completion_stats(model, model, ids, att, 0, spans, k=5, top_n=5)
                lb, lt = logits(), logits()  # base, tuned: [1, T, V] each
                b, t = lb[0, prompt - 1 : T - 1], lt[0, prompt - 1 : T - 1]
                d = compare_distributions(b, t, k=5)
                d["b"], d["t"] = top_probs(b), top_probs(t)
                return d

    else:
        ex = TrainExample(
            tuple(ids[0, :prompt].tolist()), tuple(ids[0, prompt:].tolist()), (1.0,) * c, 0.5, True, key=("p0", 0)
        )
        gates = gated[None]  # [1, c]

        def run():
            with torch.no_grad():
                if stage == "forks":
                    if not naive:
                        return fork_changes(model, model, Tok(), [ex], gates, limit=1, batch=1)
                    lb, lt = logits(), logits()
                    return argmax_change(lb[0, prompt - 1 : T - 1].float(), lt[0, prompt - 1 : T - 1].float())
                if not naive:
                    return report_examples(model, Tok(), [ex], gates, k=1)
                lb = logits()[0, prompt - 1 : T - 1]  # [c, V]
                return lb[gated].float().softmax(-1).topk(5)

    return run


def stub_mode():
    """A TorchDispatchMode answering matmuls with zero-filled tensors of the true shape/dtype."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    shapes = {  # (operands) -> output shape
        aten.mm: lambda a, b: (a.shape[0], b.shape[1]),
        aten.addmm: lambda c, a, b: (a.shape[0], b.shape[1]),
        aten.bmm: lambda a, b: (a.shape[0], a.shape[1], b.shape[2]),
        aten.baddbmm: lambda c, a, b: (a.shape[0], a.shape[1], b.shape[2]),
    }

    class Stub(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            shape = shapes.get(func.overloadpacket)
            if shape is None:
                return func(*args, **kwargs)
            if "out" in kwargs:  # mm.out etc.: the caller's buffer, zeroed
                return kwargs["out"].zero_()
            x = args[-1]
            return torch.zeros(
                shape(*args[: 3 if func.overloadpacket in (aten.addmm, aten.baddbmm) else 2]),
                dtype=x.dtype,
                device=x.device,
            )

    return Stub()


def one(a) -> dict:
    """Child process: build, reset the peak, run the stage once, report MB."""
    import torch

    torch.set_num_threads(a.threads)
    model, ids = build(a.T[0], a.prompt, a.vocab, a.hidden, a.inter)
    run = stage_fn(a.stage, a.impl, model, ids, a.prompt)
    warm = stage_fn(a.stage, a.impl, model, ids[:, :64], 32)  # lazy imports, one-time init, the q/v .grad
    with contextlib.nullcontext() if a.exact else stub_mode():
        warm()
    del warm
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before = rss_mb("VmRSS")
    t0 = time.perf_counter()
    with contextlib.nullcontext() if a.exact else stub_mode():
        out = run()
    secs = time.perf_counter() - t0
    peak = rss_mb("VmHWM")
    del out
    return {"stage": a.stage, "impl": a.impl, "T": a.T[0], "extra_mb": peak - before, "base_mb": before, "s": secs}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (the rest of T is the completion)")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--inter", type=int, default=8960)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-gb", type=int, default=21, help="address-space limit of each child (GiB)")
    ap.add_argument("--naive-train-max-t", type=int, default=4096, help="longer: the naive train step is not run")
    ap.add_argument("--exact", action="store_true", help="run the real matmuls (no stub): very slow on CPU")
    ap.add_argument("--one", nargs=2, metavar=("STAGE", "IMPL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        a.stage, a.impl = a.one
        print(json.dumps(one(a)))
        return
    t_all = time.perf_counter()
    res = {}
    for T in a.T:
        for stage in a.stages:
            for impl in ("naive", "ours"):
                cmd = [sys.executable, __file__, "--one", stage, impl, "--T", str(T)]
                cmd += ["--prompt", str(a.prompt), "--vocab", str(a.vocab), "--hidden", str(a.hidden)]
                cmd += ["--inter", str(a.inter), "--threads", str(a.threads)] + (["--exact"] if a.exact else [])
                if impl == "naive" and stage == "train" and T > a.naive_train_max_t:
                    print(f"# {stage:9s} {impl:5s} T={T}: not run (does not fit in ~20 GB at batch 1)", flush=True)
                    continue
                limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (a.max_gb << 30, a.max_gb << 30))
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, preexec_fn=limit)
                if out.returncode != 0:
                    print(f"# {stage:9s} {impl:5s} T={T}: FAILED ({out.stderr.strip()[-300:]})", flush=True)
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                res[stage, impl, T] = r
                print(f"# {stage:9s} {impl:5s} T={T}: +{r['extra_mb']:.0f} MB ({r['s']:.1f} s)", flush=True)
    fp32 = lambda T: T * a.vocab * 4 / 2**20
    print(
        f"\nPeak extra RSS (MB) per stage, batch 1, vocab {a.vocab}, hidden {a.hidden}, 2 layers, fp32, CPU; "
        f"{'real matmuls' if a.exact else 'matmuls stubbed by zero-filled outputs (memory exact, FLOPs skipped)'}; "
        "each in a fresh process: VmHWM - VmRSS after building (peak reset via /proc/self/clear_refs)"
    )
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores, {a.threads} threads")
    print(f"(one fp32 [T, V] tensor: {', '.join(f'T={T}: {fp32(T):.0f} MB' for T in a.T)})\n")
    print(f"{'stage':9s} {'T':>5s} {'naive MB':>9s} {'ours MB':>8s} {'ratio':>6s}")
    worst = ("", -1.0)
    for T in a.T:
        for stage in a.stages:
            if (stage, "naive", T) not in res or (stage, "ours", T) not in res:
                o = res.get((stage, "ours", T), {}).get("extra_mb", math.nan)
                print(
                    f"{stage:9s} {T:5d} {'> 20000':>9s} {o:8.0f} {'< ' + format(o / 20000, '.3f'):>6s}  (naive not run)"
                )
                continue
            n, o = res[stage, "naive", T]["extra_mb"], res[stage, "ours", T]["extra_mb"]
            ratio = o / n
            flag = "" if ratio <= GOAL else f"  MISSES goal {GOAL}"
            print(f"{stage:9s} {T:5d} {n:9.0f} {o:8.0f} {ratio:6.3f}{flag}")
            if ratio > worst[1]:
                worst = (f"{stage} (T={T})", ratio)
    print(f"\n(total {time.perf_counter() - t_all:.0f} s)")
    print(f"worst stage: {worst[0]}, peak extra / naive = {worst[1]:.3f} (goal <= {GOAL})")


if __name__ == "__main__":
    main()
