"""GPU path check: every stage of the library on one GPU, in bf16, with peak memory per stage.

    bash benchmarks/gpu_check.sh                  # on a CUDA machine (checks the Python, then runs this)
    python benchmarks/gpu_check.py --tiny         # the same code on a tiny CPU model (tests/test_gpu_check.py)

No Hub access is needed: the model is Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads,
2 KV heads, intermediate 4864, vocab 151936, tied embeddings) built from a config with random
weights, and the tokenizer is a word-level one built in code whose vocabulary covers every
model id ("w4", "w5", ...). A random model puts ~1/151936 on EOS, so every completion runs to
`--max-new-tokens`: the token counts are fixed and the figures compare across runs.

The workload runs the library's own code paths, in pipeline order; each stage is timed, its
peak GPU memory recorded (`torch.cuda.max_memory_allocated`, reset per stage), and a stage
that fails is reported (one line) without stopping the others:

1. sample: `HFSampler` on `--problems` x `--samples` requests (prompts of `--shared-prefix`
   shared + `--unique` own tokens, as few-shot prompts are), T=0.7, batch `--batch-size`;
2. score: `stages.score.score_rows` (teacher-forced full-vocabulary entropy, fp32 head) on those rollouts;
3. score_long: the same on `--long-rows` sequences of `--long-len` tokens (4096: real reasoning lengths);
4. train_lora: `stages.train.train` (LoRA r32 on q/k/v/o, the chunked ReasonMaxxer loss) for
   `--train-steps` optimizer steps of `--micro-batch` sequences of `--train-len` tokens, random
   +-1 advantages, then the export (adapter + merged, fp32 merge rounded once to bf16);
5. merge_agreement: teacher-forced argmax on the training sequences of the adapter served by
   PEFT on the bf16 base, of the bf16 merged checkpoint, and of the fp32 reference (fp32 base +
   adapter): agreement with the reference, and how many of its changes from the base each keeps;
6. train_lora_logits: the same steps through the [B, T, V] logits (for the memory beside 4.);
7. train_full: a full fine-tune of the bf16 model for `--train-steps` steps at lr 1e-5 (fp32
   master weights): the fraction of a weight matrix that moved;
8. oom: a deliberate out-of-memory becomes the library's one-line message;
9. pipeline: `reasonmaxxer run` end to end on a small random model in the device's default
   dtype (a coin instead of grading, since a random model never answers right);
10. vllm (only if vllm imports): `VLLMSampler` on the same requests, from the model saved to
   a temp dir; engine start-up is timed apart from generation.

Prints one table (figure and peak GPU memory per stage) and writes JSON with `--json` after
every stage (a run cut short keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling gpu_check_workload
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gpu_check_workload import (  # noqa: E402
    QWEN2_05B,
    SMALL,
    TINY,
    build_model,
    fake_grade_many,
    make_requests,
    sync,
    train_examples,
    word_tokenizer,
)

from reasonmaxxer.backends.hf import HFSampler, SamplingConfig  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model and a small workload (CPU smoke test)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="default: bf16 on cuda, else fp32")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--samples", type=int, default=2, help="completions per problem")
    ap.add_argument("--shared-prefix", type=int, default=192, help="prompt tokens shared by all problems")
    ap.add_argument("--unique", type=int, default=64, help="prompt tokens of each problem")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--score-batch", type=int, default=8)
    ap.add_argument("--long-len", type=int, default=4096, help="sequence length of the long scoring stage")
    ap.add_argument("--long-rows", type=int, default=8)
    ap.add_argument("--long-batch", type=int, default=2)
    ap.add_argument("--train-len", type=int, default=4096, help="tokens per training sequence")
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="for the training stages")
    ap.add_argument("--stages", default="all", help="comma-separated subset of: " + ",".join(STAGES))
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM measurement")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None, help="for the vLLM engine")
    ap.add_argument("--json", default=None, help="also write the results here (after every stage)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.problems, a.samples, a.shared_prefix, a.unique = 4, 2, 12, 6
        a.max_new_tokens, a.batch_size, a.score_batch, a.micro_batch = 8, 4, 4, 2
        a.long_len, a.long_rows, a.long_batch, a.train_len, a.train_steps = 96, 2, 2, 40, 2
    return a


STAGES = (
    "sample",
    "score",
    "score_long",
    "train_lora",
    "merge_agreement",
    "train_lora_logits",
    "train_full",
    "oom",
    "pipeline",
    "vllm",
)


def bench_sample(ctx, a) -> dict:
    sampler = HFSampler(ctx["model"], ctx["tok"])
    cfg = SamplingConfig(n=a.samples, temperature=0.7, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    sampler.generate(ctx["reqs"][:2], SamplingConfig(n=1, max_new_tokens=4, batch_size=2))  # warm-up
    sync(ctx["device"])
    t0 = time.perf_counter()
    ctx["comps"] = comps = sampler.generate(ctx["reqs"], cfg)
    sync(ctx["device"])
    dt = time.perf_counter() - t0
    n = sum(len(c.token_ids) for c in comps)
    return {
        "what": f"HFSampler, {len(ctx['reqs'])} requests, batch {a.batch_size}",
        "tokens": n,
        "seconds": round(dt, 2),
        "tokens_per_s": round(n / dt, 1),
        "figure": f"{n / dt:.1f} tokens/s ({n} tokens in {dt:.2f} s)",
    }


def _score(ctx, rows, batch) -> tuple[list, float, int]:
    from reasonmaxxer.stages.score import score_rows

    score_rows(rows[:1], ctx["model"], ctx["tok"], batch_size=1, progress=False)  # warm-up
    sync(ctx["device"])
    t0 = time.perf_counter()
    ents = score_rows(rows, ctx["model"], ctx["tok"], batch_size=batch, progress=False)
    sync(ctx["device"])
    return ents, time.perf_counter() - t0, sum(len(r["prompt_ids"]) + len(r["token_ids"]) for r in rows)


def bench_score(ctx, a) -> dict:
    rows = [{"prompt_ids": list(r.prompt_ids), "token_ids": c.token_ids} for r, c in zip(ctx["reqs"], ctx["comps"])]
    ents, dt, n = _score(ctx, rows, a.score_batch)
    ctx["ents"] = ents
    finite = all(math.isfinite(h) for e in ents for h in e)
    return {
        "what": f"score_rows, {len(rows)} sequences, batch {a.score_batch} (all tokens counted)",
        "tokens": n,
        "seconds": round(dt, 2),
        "tokens_per_s": round(n / dt, 1),
        "all_finite": finite,
        "figure": f"{n / dt:.1f} tokens/s ({n} tokens in {dt:.2f} s); entropies finite: {finite}",
    }


def bench_score_long(ctx, a) -> dict:
    rng = random.Random(2)
    V = ctx["vocab"]
    P = min(256, a.long_len // 4)
    rows = [
        {
            "prompt_ids": [rng.randrange(4, V) for _ in range(P)],
            "token_ids": [rng.randrange(4, V) for _ in range(a.long_len - P)],
        }
        for _ in range(a.long_rows)
    ]
    ents, dt, n = _score(ctx, rows, a.long_batch)
    mean_h = statistics.fmean(h for e in ents for h in e)
    return {
        "what": f"score_rows, {a.long_rows} sequences of {a.long_len} tokens, batch {a.long_batch}",
        "tokens": n,
        "seconds": round(dt, 2),
        "tokens_per_s": round(n / dt, 1),
        "mean_entropy": round(mean_h, 4),
        "figure": f"{n / dt:.1f} tokens/s; mean entropy {mean_h:.3f} nats (log V = {math.log(V):.3f})",
    }


def _train(ctx, a, work: Path, model, **cfg_kw) -> tuple[dict, list[float]]:
    from reasonmaxxer.stages.train import TrainConfig, train

    kw = {"warmup_steps": 1, "gradient_checkpointing": a.gradient_checkpointing, **cfg_kw}
    cfg = TrainConfig(
        micro_batch=a.micro_batch, grad_accum=1, max_steps=a.train_steps, checkpoint_every=a.train_steps, **kw
    )
    res = train(ctx["examples"], cfg, work, model, ctx["tok"], progress=False, shuffle=False)
    sync(ctx["device"])
    steps = [json.loads(l)["seconds"] for l in (work / "metrics.jsonl").read_text().splitlines()]
    return res, steps


def bench_train_lora(ctx, a) -> dict:
    ctx["examples"] = train_examples(ctx, a)
    work = ctx["work"] / "train_lora"
    res, steps = _train(ctx, a, work, ctx["model"], lora_rank=32, lora_alpha=64, lr=1e-3, loss_impl="chunked")
    ctx["lora_dir"] = work
    later = steps[1:] or steps
    base_intact = all(type(m).__name__ != "Linear" or not hasattr(m, "base_layer") for m in ctx["model"].modules())
    return {
        "what": f"train, LoRA r32 q/k/v/o, chunked loss, {len(steps)} steps of {a.micro_batch} x {a.train_len} tokens, + export",
        "steps": len(steps),
        "first_step_s": round(steps[0], 3),
        "s_per_step": round(statistics.median(later), 3),
        "export_dtype": res.get("export_dtype"),
        "base_handed_back": base_intact,
        "figure": (
            f"{statistics.median(later):.3f} s/step (first {steps[0]:.2f} s); export {res.get('export_dtype')}; "
            f"base handed back without adapter: {base_intact}"
        ),
    }


def bench_train_lora_logits(ctx, a) -> dict:
    """train_lora's steps with the [B, T, V] logits path, for its peak memory beside the chunked loss."""
    work = ctx["work"] / "train_lora_logits"
    res, steps = _train(ctx, a, work, ctx["model"], lora_rank=32, lora_alpha=64, lr=1e-3, loss_impl="logits")
    later = steps[1:] or steps
    return {
        "what": f"train_lora with loss_impl = logits ([{a.micro_batch}, {a.train_len}, V] logits), for comparison",
        "s_per_step": round(statistics.median(later), 3),
        "figure": f"{statistics.median(later):.3f} s/step",
    }


@torch.no_grad()
def _argmax(model, examples, device) -> torch.Tensor:
    out = []
    for e in examples:
        ids = torch.tensor([e.prompt_ids + e.completion_ids], device=device)
        out.append(model(input_ids=ids).logits[0, len(e.prompt_ids) - 1 : -1].argmax(-1).cpu())
    return torch.cat(out)


def bench_merge_agreement(ctx, a) -> dict:
    """Argmax of what a user can deploy vs the fp32 reference (fp32 base + the fp32 adapter)."""
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dev, exs = ctx["device"], ctx["examples"][: max(2, a.micro_batch)]
    base = ctx["model"]
    arg_base = _argmax(base, exs, dev)
    ref = PeftModel.from_pretrained(copy.deepcopy(base).float(), str(ctx["lora_dir"] / "adapter")).eval()
    arg_ref = _argmax(ref, exs, dev)
    del ref
    served = PeftModel.from_pretrained(base, str(ctx["lora_dir"] / "adapter")).eval()
    arg_served = _argmax(served, exs, dev)
    served.unload()
    merged = AutoModelForCausalLM.from_pretrained(str(ctx["lora_dir"] / "merged"), dtype=torch.bfloat16).to(dev).eval()
    arg_merged = _argmax(merged, exs, dev)
    del merged
    changed = arg_ref != arg_base
    n_changed = int(changed.sum())

    def stats(arg):
        return {
            "agree_with_fp32": round(float((arg == arg_ref).float().mean()), 4),
            "changes_kept": int((arg == arg_ref)[changed].sum()),
        }

    r = {"positions": int(arg_ref.numel()), "fp32_changes_from_base": n_changed}
    r["adapter_on_bf16_base"] = stats(arg_served)
    r["bf16_merged"] = stats(arg_merged)
    r["what"] = f"teacher-forced argmax on {r['positions']} positions; fp32 reference changes {n_changed} from the base"
    r["figure"] = (
        f"adapter on bf16 base {r['adapter_on_bf16_base']['agree_with_fp32']:.2%} "
        f"(keeps {r['adapter_on_bf16_base']['changes_kept']}/{n_changed} changes); bf16 merged "
        f"{r['bf16_merged']['agree_with_fp32']:.2%} (keeps {r['bf16_merged']['changes_kept']}/{n_changed})"
    )
    return r


def bench_train_full(ctx, a) -> dict:
    model = build_model(ctx["dims"], ctx["device"], ctx["dtype"])
    key = "model.layers.0.mlp.down_proj.weight"
    init = model.state_dict()[key].detach().float().cpu().clone()
    work = ctx["work"] / "train_full"
    res, steps = _train(ctx, a, work, model, full_finetune=True, lr=1e-5, warmup_steps=0, loss_impl="chunked")
    st = torch.load(work / "checkpoints" / f"step-{a.train_steps:06d}" / "state.pt", weights_only=False)["model"]
    moved_master = float((st[key].float().cpu() != init).float().mean())
    later = steps[1:] or steps
    del model, st
    return {
        "what": f"train, full fine-tune (fp32 master weights, chunked loss), {len(steps)} steps at lr 1e-5, + export",
        "master_dtype": "float32",
        "moved_fraction": round(moved_master, 4),
        "s_per_step": round(statistics.median(later), 3),
        "export_dtype": res.get("export_dtype"),
        "figure": f"{moved_master:.2%} of {key} moved (bf16 updates: ~10%); {statistics.median(later):.3f} s/step",
    }


def bench_oom(ctx, a) -> dict:
    from reasonmaxxer.errors import out_of_memory_error

    try:
        torch.empty(2**40 if ctx["device"].startswith("cuda") else 2**62, dtype=torch.uint8, device=ctx["device"])
        msg = "no out-of-memory raised"
    except Exception as e:  # noqa: BLE001 - the point is to see what the device raises
        err = out_of_memory_error("train", e)
        msg = str(err) if err is not None else f"NOT recognised: {type(e).__name__}: {e}"
    return {"what": "a 1 TiB allocation, through errors.out_of_memory_error", "message": msg[:300], "figure": msg[:140]}


def bench_pipeline(ctx, a) -> dict:
    """`reasonmaxxer run` end to end on the device's defaults (bf16, HF backend) with a small
    random model and a coin for a grader: sample, select + score, train (validation), eval
    base and trained (merged, bf16), fork analysis, report."""
    import reasonmaxxer.verify as verify
    from reasonmaxxer.config import load_run_config
    from reasonmaxxer.recipes.run import run_pipeline

    d = ctx["work"] / "pipe_model"
    build_model(SMALL, ctx["device"], ctx["dtype"]).save_pretrained(d)
    word_tokenizer(SMALL["vocab_size"]).save_pretrained(d)
    cfg = ctx["work"] / "pipe.toml"
    n = 4 if a.tiny else 24
    cfg.write_text(
        f'model = "{d}"\ntemplate = "raw"\nout = "{ctx["work"] / "pipe_run"}"\ntrain_problems = "arith:train:{n}"\n'
        f'validation_problems = "arith:validation:{n // 2}"\ntest_problems = "arith:test:{n}"\n'
        '[sampling]\nn = 4\nmax_new_tokens = 32\nbatch_size = 32\n[selection]\nmax_problems = 64\ntruncated = "keep"\n'
        "[train]\nmicro_batch = 4\ngrad_accum = 1\nepochs = 1.0\ncheckpoint_every = 2\nwarmup_steps = 1\n"
        "[eval]\nn = 2\nmax_new_tokens = 32\nbatch_size = 32\n"
    )
    import transformers

    real, real_tok = verify.grade_many, transformers.AutoTokenizer.from_pretrained

    def auto_tok(path, *args, **kw):  # transformers maps a qwen2 config to Qwen2Tokenizer, which
        # rebuilds a byte-level pre-tokenizer over our word-level vocabulary: load it as saved
        if str(path) == str(d):
            return transformers.PreTrainedTokenizerFast.from_pretrained(path)
        return real_tok(path, *args, **kw)

    verify.grade_many, transformers.AutoTokenizer.from_pretrained = fake_grade_many, auto_tok
    try:
        summary = run_pipeline(load_run_config(cfg), progress=False)
    finally:
        verify.grade_many, transformers.AutoTokenizer.from_pretrained = real, real_tok
    ev = json.loads((ctx["work"] / "pipe_run" / "eval" / "trained" / "eval.json").read_text())["weights"]
    acc = summary["accuracy"]
    return {
        "what": f"reasonmaxxer run, small random model, {n} train problems, coin grader",
        "steps": summary["summary"]["steps"],
        "trained_eval_weights": ev,
        "fork_positions": summary["fork_changes"]["positions"],
        "figure": (
            f"all stages ran; {summary['summary']['steps']} steps; trained eval on {ev['kind']} in {ev['dtype']}; "
            f"fork analysis over {summary['fork_changes']['positions']} positions; "
            f"greedy {acc['base']['greedy']} -> {acc['trained']['greedy']} (coin)"
        ),
    }


def vllm_missing() -> str | None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return f"vllm not importable ({e})"
    return None


def bench_vllm(ctx, a) -> dict:
    import vllm

    from reasonmaxxer.backends.vllm import VLLMOptions, VLLMSampler

    d = ctx["work"] / "model"
    cfg = SamplingConfig(n=a.samples, temperature=0.7, max_new_tokens=a.max_new_tokens)
    t0 = time.perf_counter()
    s = VLLMSampler(str(d), VLLMOptions(gpu_memory_utilization=a.gpu_memory_utilization))
    s.generate(ctx["reqs"][:2], SamplingConfig(n=1, max_new_tokens=4))  # starts the engine
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    comps = s.generate(ctx["reqs"], cfg)
    dt = time.perf_counter() - t0
    s.close()
    n = sum(len(c.token_ids) for c in comps)
    return {
        "what": f"VLLMSampler (vllm {vllm.__version__}), {len(ctx['reqs'])} requests",
        "tokens": n,
        "seconds": round(dt, 2),
        "tokens_per_s": round(n / dt, 1),
        "engine_start_s": round(start, 1),
        "figure": f"{n / dt:.1f} tokens/s; engine start {start:.1f} s",
    }


def run_stage(name, fn, ctx, a) -> dict:
    """Run one stage: its result with seconds and peak GPU memory, or the error (one line + where)."""
    dev = ctx["device"]
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        r = fn(ctx, a)
    except Exception as e:  # noqa: BLE001 - a failing stage is reported, the others still run
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "reasonmaxxer" in f.filename), "")
        r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} [{where}]"[:400]}
        r["figure"] = "FAILED " + r["error"]
        traceback.print_exc()
    r["stage_seconds"] = round(time.perf_counter() - t0, 1)
    r["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.startswith("cuda") else None
    return r


def main(argv=None) -> dict:
    a = parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype) if a.dtype else torch.bfloat16 if device.startswith("cuda") else torch.float32
    dims = TINY if a.tiny else QWEN2_05B
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "model": "tiny" if a.tiny else "Qwen2-0.5B shape, random init",
    }
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    t_all = time.perf_counter()
    tok = word_tokenizer(dims["vocab_size"])
    model = build_model(dims, device, dtype)
    env["parameters_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    wanted = STAGES if a.stages == "all" else tuple(x.strip() for x in a.stages.split(","))
    skip_vllm = "--no-vllm" if a.no_vllm else vllm_missing()
    results = {}
    out = {"env": env, "results": results}

    def save():
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(out, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ctx = {"model": model, "tok": tok, "device": device, "dtype": dtype, "dims": dims, "work": Path(tmp)}
        ctx["vocab"], ctx["reqs"] = dims["vocab_size"], make_requests(a, dims["vocab_size"])
        if "vllm" in wanted and not skip_vllm:  # saved before training
            model.save_pretrained(ctx["work"] / "model")
            tok.save_pretrained(ctx["work"] / "model")
        for name in wanted:
            if name == "vllm" and skip_vllm:
                results[name] = {"what": "VLLMSampler", "skipped": skip_vllm, "figure": f"skipped: {skip_vllm}"}
            else:
                results[name] = run_stage(name, globals()[f"bench_{name}"], ctx, a)
            print(f"{name}: {results[name]}", flush=True)
            save()
    env["total_seconds"] = round(time.perf_counter() - t_all, 1)
    print("\n| stage | what | figure | peak GPU memory (GiB) | seconds |\n|---|---|---|---:|---:|")
    for k, r in results.items():
        print(f"| {k} | {r.get('what', '')} | {r['figure']} | {r.get('peak_gpu_gb')} | {r.get('stage_seconds', '')} |")
    print(f"\ntotal {env['total_seconds']} s", flush=True)
    save()
    return out


if __name__ == "__main__":
    main()
