"""GPU path check: sampling, scoring and ReasonMaxxer training steps on one GPU, in bf16.

    bash benchmarks/gpu_check.sh                  # on a CUDA machine (checks the Python, then runs this)
    python benchmarks/gpu_check.py --tiny         # the same code on a tiny CPU model (tests/test_gpu_check.py)

No Hub access is needed: the model is Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads,
2 KV heads, intermediate 4864, vocab 151936, tied embeddings) built from a config with random
weights, and the tokenizer is a word-level one built in code whose vocabulary covers every
model id ("w4", "w5", ...). A random model puts ~1/151936 on EOS, so every completion runs to
`--max-new-tokens`: the token counts are fixed and the figures compare across runs.

The workload runs the library's own code paths, in pipeline order:

1. sample: `HFSampler` on `--problems` x `--samples` requests (prompts of `--shared-prefix`
   shared + `--unique` own tokens, as few-shot prompts are), T=0.7, batch `--batch-size`;
2. score: `pipeline.score_rows` (teacher-forced full-vocabulary entropy) on those rollouts;
3. train: `train.train` (LoRA r32 on q/k/v/o, the ReasonMaxxer loss) for `--train-steps`
   optimizer steps of `--micro-batch` rollouts, entropies from step 2, random +-1 advantages;
4. vllm (only if vllm imports): `VLLMSampler` on the same requests, from the model saved to
   a temp dir; engine start-up is timed apart from generation.

Prints one table (tokens/s, s/step, peak GPU memory) and writes it as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reasonmaxxer.backends.hf import HFSampler, Request, SamplingConfig

QWEN2_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model and a small workload (CPU smoke test)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--samples", type=int, default=2, help="completions per problem")
    ap.add_argument("--shared-prefix", type=int, default=192, help="prompt tokens shared by all problems")
    ap.add_argument("--unique", type=int, default=64, help="prompt tokens of each problem")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--score-batch", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM measurement")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6, help="for the vLLM engine")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    if a.tiny:
        a.problems, a.samples, a.shared_prefix, a.unique = 4, 2, 12, 6
        a.max_new_tokens, a.batch_size, a.score_batch, a.train_steps, a.micro_batch = 8, 4, 4, 2, 2
    return a


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over "<pad> <s> </s> <unk> w4 ... w{V-1}": every model id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.padding_side = "left"
    return fast


def build_model(dims: dict, device: str, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**dims, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    return model.eval()


def make_requests(a, vocab: int) -> list[Request]:
    rng = random.Random(0)
    prefix = [rng.randrange(4, vocab) for _ in range(a.shared_prefix)]
    reqs = []
    for i in range(a.problems):
        own = tuple(prefix + [rng.randrange(4, vocab) for _ in range(a.unique)])
        reqs += [Request((f"p{i}", s), own) for s in range(a.samples)]
    return reqs


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def bench_sample(model, tok, reqs, a, device) -> tuple[dict, list]:
    sampler = HFSampler(model, tok)
    cfg = SamplingConfig(n=a.samples, temperature=0.7, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    sampler.generate(reqs[:2], SamplingConfig(n=1, max_new_tokens=4, batch_size=2))  # warm-up (kernels, allocator)
    sync(device)
    t0 = time.perf_counter()
    comps = sampler.generate(reqs, cfg)
    sync(device)
    dt = time.perf_counter() - t0
    n = sum(len(c.token_ids) for c in comps)
    return {
        "what": f"HFSampler, {len(reqs)} requests, batch {a.batch_size}",
        "tokens": n,
        "seconds": round(dt, 2),
        "tokens_per_s": round(n / dt, 1),
    }, comps


def bench_score(model, tok, reqs, comps, a, device) -> tuple[dict, list]:
    from reasonmaxxer.stages.score import score_rows

    rows = [{"prompt_ids": list(r.prompt_ids), "token_ids": c.token_ids} for r, c in zip(reqs, comps)]
    score_rows(rows[:1], model, tok, batch_size=1, progress=False)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    ents = score_rows(rows, model, tok, batch_size=a.score_batch, progress=False)
    sync(device)
    dt = time.perf_counter() - t0
    n = sum(len(r["prompt_ids"]) + len(r["token_ids"]) for r in rows)
    return {
        "what": f"pipeline.score_rows, {len(rows)} sequences, batch {a.score_batch} (all tokens counted)",
        "tokens": n,
        "seconds": round(dt, 2),
        "tokens_per_s": round(n / dt, 1),
    }, ents


def bench_train(model, tok, reqs, comps, ents, a, device, workdir: Path) -> dict:
    from reasonmaxxer.stages.train import TrainConfig, TrainExample, train

    rng = random.Random(1)
    examples = [
        TrainExample(
            prompt_ids=r.prompt_ids,
            completion_ids=tuple(c.token_ids),
            entropies=tuple(e),
            advantage=rng.choice([-1.0, 1.0]),
            correct=False,
            key=r.key,
        )
        for r, c, e in zip(reqs, comps, ents)
    ]
    cfg = TrainConfig(
        lora_rank=32,
        lora_alpha=64,
        micro_batch=a.micro_batch,
        grad_accum=1,
        max_steps=a.train_steps,
        warmup_steps=1,
        checkpoint_every=10_000,
        skip_ungated=False,
    )
    t0 = time.perf_counter()
    train(examples, cfg, workdir / "train", model, tok, progress=False, export=False, shuffle=False)
    sync(device)
    total = time.perf_counter() - t0
    steps = [json.loads(l)["seconds"] for l in (workdir / "train" / "metrics.jsonl").read_text().splitlines()]
    toks = sum(len(e.prompt_ids) + len(e.completion_ids) for e in examples[: a.micro_batch])
    later = steps[1:] or steps
    return {
        "what": f"train, LoRA r32 q/k/v/o, {len(steps)} steps of {a.micro_batch} rollouts (~{toks} tokens)",
        "steps": len(steps),
        "first_step_s": round(steps[0], 3),
        "s_per_step": round(statistics.median(later), 3),
        "total_seconds": round(total, 2),
    }


def vllm_missing() -> str | None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return f"vllm not importable ({e})"
    return None


def bench_vllm(d: Path, reqs, a) -> dict:
    import vllm

    from reasonmaxxer.backends.vllm import VLLMOptions, VLLMSampler

    cfg = SamplingConfig(n=a.samples, temperature=0.7, max_new_tokens=a.max_new_tokens)
    t0 = time.perf_counter()
    s = VLLMSampler(str(d), VLLMOptions(gpu_memory_utilization=a.gpu_memory_utilization))
    s.generate(reqs[:2], SamplingConfig(n=1, max_new_tokens=4))  # starts the engine
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    comps = s.generate(reqs, cfg)
    dt = time.perf_counter() - t0
    s.close()
    n = sum(len(c.token_ids) for c in comps)
    return {
        "what": f"VLLMSampler (vllm {vllm.__version__}), {len(reqs)} requests",
        "tokens": n,
        "seconds": round(dt, 2),
        "tokens_per_s": round(n / dt, 1),
        "engine_start_s": round(start, 1),
    }


def main(argv=None) -> dict:
    a = parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
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
    reqs = make_requests(a, dims["vocab_size"])
    results = {}
    skip_vllm = "--no-vllm" if a.no_vllm else vllm_missing()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        if not skip_vllm:  # saved before training wraps the model in LoRA layers
            model.save_pretrained(work / "model")
            tok.save_pretrained(work / "model")
        results["sample"], comps = bench_sample(model, tok, reqs, a, device)
        print(f"sample: {results['sample']}", flush=True)
        results["score"], ents = bench_score(model, tok, reqs, comps, a, device)
        print(f"score: {results['score']}", flush=True)
        results["train"] = bench_train(model, tok, reqs, comps, ents, a, device, work)
        results["train"]["peak_gpu_gb"] = peak_gb(device)
        print(f"train: {results['train']}", flush=True)
        if skip_vllm:
            results["vllm"] = {"what": "VLLMSampler", "skipped": skip_vllm}
        else:
            del model, comps, ents
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            results["vllm"] = bench_vllm(work / "model", reqs, a)
    env["total_seconds"] = round(time.perf_counter() - t_all, 1)
    print("\n| stage | what | figure |\n|---|---|---:|")
    for k in ("sample", "score", "train", "vllm"):
        r = results[k]
        if k == "train":
            fig = (
                f"{r['s_per_step']} s/step (median after the first, which took {r['first_step_s']} s); "
                f"peak GPU memory {r['peak_gpu_gb']} GB"
            )
        else:
            fig = r.get("skipped") or f"{r['tokens_per_s']} tokens/s ({r['tokens']} tokens in {r['seconds']} s)"
        if "engine_start_s" in r:
            fig += f"; engine start {r['engine_start_s']} s"
        print(f"| {k} | {r['what']} | {fig} |")
    print(f"\ntotal {env['total_seconds']} s", flush=True)
    out = {"env": env, "results": results}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
