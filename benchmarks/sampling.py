"""Sampler throughput vs HF `generate` and vs a teacher-forced forward pass, in one run.

    python benchmarks/sampling.py [--model smollm2-135m] [--problems 64] [--batch-size 32]

Realistic workload: the few-shot chat prompt on built-in arithmetic problems (mixed
prompt lengths), `--samples` completions per problem (as the sample stage draws them),
T=0.7, completions that end at different lengths (EOS) or at max_new_tokens. All three
measurements use the same model, prompts, settings and batch size:

- HF generate: `model.generate` on the first `--hf-requests` requests in batches of
  `batch_size` left-padded prompts; tokens/s counts generated tokens up to each row's EOS.
  (Only a subset: on 2 CPU cores HF generate is very slow with these ~290-token prompts.)
- ours: `HFSampler.generate` on all requests; tokens/s counts generated tokens, and the
  time includes everything (prefix encoding, prompt prefill, decoding, compaction).
- forward: teacher-forced `model(...)` over the first `--hf-requests` sequences our
  sampler produced (prompt + completion, batches of `batch_size`); tokens/s counts every
  token processed: the model's compute throughput on this machine.

Prints both ratios: ours / HF generate (goal >= 2x) and ours / forward (goal >= 60%).
"""

import argparse
import time

import torch

from reasonmaxxer.backends.hf import HFSampler, Request, SamplingConfig
from reasonmaxxer.data.arith import generate as arith_problems
from reasonmaxxer.data.prompts import get_template, render_prompt
from reasonmaxxer.models import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4, help="completions per problem")
    ap.add_argument("--hf-requests", type=int, default=32, help="requests given to HF generate and to the forward pass")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    tmpl = get_template("fewshot")
    problems = arith_problems("test", args.problems, seed=1)
    prompts = [render_prompt(tmpl, p.question, tok) for p in problems]
    enc = [tuple(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    S = args.samples
    prompts = [p for p in prompts for _ in range(S)]
    enc = [e for e in enc for _ in range(S)]
    B, T, M = args.batch_size, args.temperature, args.max_new_tokens
    eos = tok.eos_token_id
    print(
        f"model {args.model}, {len(prompts)} requests ({args.problems} problems x {S}) ({min(map(len, enc))}-{max(map(len, enc))} tokens), "
        f"batch {B}, T={T}, max_new_tokens {M}, torch threads {torch.get_num_threads()}"
    )

    # HF generate
    torch.manual_seed(0)
    t0 = time.perf_counter()
    hf_tokens = 0
    with torch.no_grad():
        for i in range(0, min(len(prompts), args.hf_requests), B):
            batch = tok(
                prompts[i : min(i + B, args.hf_requests)], return_tensors="pt", padding=True, add_special_tokens=False
            )
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=T,
                top_p=1.0,
                top_k=0,
                max_new_tokens=M,
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos,
            )
            gen = out[:, batch["input_ids"].shape[1] :]
            for row in gen.tolist():
                hf_tokens += (row.index(eos) + 1) if eos in row else len(row)
    hf_s = time.perf_counter() - t0

    # ours
    sampler = HFSampler(model, tok)
    reqs = [Request((problems[i // S].id, i % S), e) for i, e in enumerate(enc)]
    cfg = SamplingConfig(n=1, temperature=T, max_new_tokens=M, batch_size=B, seed=0)
    t0 = time.perf_counter()
    comps = sampler.generate(reqs, cfg)
    ours_s = time.perf_counter() - t0
    ours_tokens = sum(len(c.token_ids) for c in comps)

    # teacher-forced forward over the same (prompt + completion) sequences
    seqs = [list(e) + c.token_ids for e, c in zip(enc, comps)][: args.hf_requests]
    fwd_tokens = sum(map(len, seqs))
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(seqs), B):
            chunk = seqs[i : i + B]
            L = max(map(len, chunk))
            ids = torch.full((len(chunk), L), tok.pad_token_id)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, L - len(s) :] = torch.tensor(s)
                mask[j, L - len(s) :] = 1
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    fwd_s = time.perf_counter() - t0

    hf_tps, ours_tps, fwd_tps = hf_tokens / hf_s, ours_tokens / ours_s, fwd_tokens / fwd_s
    trunc = sum(c.truncated for c in comps)
    print(f"HF generate : {hf_tokens:6d} tokens in {hf_s:7.1f} s = {hf_tps:7.1f} tok/s")
    print(
        f"ours        : {ours_tokens:6d} tokens in {ours_s:7.1f} s = {ours_tps:7.1f} tok/s "
        f"({trunc}/{len(comps)} hit max_new_tokens)"
    )
    print(
        f"forward     : {fwd_tokens:6d} tokens in {fwd_s:7.1f} s = {fwd_tps:7.1f} tok/s (teacher-forced, all tokens counted)"
    )
    print(f"ratio ours / HF generate = {ours_tps / hf_tps:.2f}x (goal >= 2x)")
    print(f"ratio ours / forward     = {ours_tps / fwd_tps:.0%} (goal >= 60%)")


if __name__ == "__main__":
    main()
