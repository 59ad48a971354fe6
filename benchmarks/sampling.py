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

Prompt sharing (``--share-only`` runs just this part, e.g. with the demo's settings:
``--share-only --problems 8 --max-new-tokens 96``): `HFSampler.generate` on the same requests
with ``share_prompts=False`` (old: every sample's prompt encoded) and ``True`` (new: a prompt
shared by rows admitted together encoded once); prints the new/old wall-time ratio, the prompt
positions encoded by each (rows x padded width of every prefill, the global prefix included)
and their FLOPs (~2 x parameters per position, attention excluded), and checks that both drew
the same tokens. It samples with the template's stop strings, as the sample stage does.
"""

import argparse
import time
from dataclasses import replace

import torch

from reasonmaxxer.backends.hf import HFSampler, Request, SamplingConfig
from reasonmaxxer.data.arith import generate as arith_problems
from reasonmaxxer.data.prompts import get_template, render_prompt
from reasonmaxxer.models import load_model
from reasonmaxxer.stages.sample import resolve_stop


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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--share-only", action="store_true", help="only the prompt-sharing comparison")
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
    print(
        f"model {args.model}, {len(prompts)} requests ({args.problems} problems x {S}) ({min(map(len, enc))}-{max(map(len, enc))} tokens), "
        f"batch {B}, T={T}, max_new_tokens {M}, torch threads {torch.get_num_threads()}"
    )

    reqs = [Request((problems[i // S].id, i % S), e) for i, e in enumerate(enc)]
    cfg = SamplingConfig(n=S, temperature=T, max_new_tokens=M, batch_size=B, seed=args.seed)
    # the sample stage's stop strings (the template's) in the sharing comparison, as in the demo
    share_comparison(model, tok, reqs, replace(cfg, stop=resolve_stop((), tmpl)))
    if not args.share_only:
        compare_hf_generate(args, model, tok, prompts, enc, reqs, cfg)


def share_comparison(model, tok, reqs, cfg):
    """Wall time and prompt positions encoded, share_prompts False (old) vs True (new)."""
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    HFSampler(model, tok).generate(reqs[:2], replace(cfg, max_new_tokens=2))  # warm-up, not timed
    res = {}
    for share in (False, True):
        shapes = []

        def hook(module, args, kwargs, shapes=shapes):
            if kwargs["input_ids"].shape[1] > 1:  # a prefill (decode steps feed one position per row)
                shapes.append(tuple(kwargs["input_ids"].shape))

        handle = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
        try:
            t0 = time.perf_counter()
            comps = HFSampler(model, tok, share_prompts=share).generate(reqs, cfg)
            wall = time.perf_counter() - t0
        finally:
            handle.remove()
        positions = sum(r * w for r, w in shapes)
        res[share] = (wall, positions, comps)
        gen = sum(len(c.token_ids) for c in comps)
        print(
            f"share_prompts={share!s:5}: {wall:7.1f} s, {len(shapes)} prefills, {positions} prompt positions encoded "
            f"(~{2 * n_params * positions / 1e12:.2f} TFLOP), {gen} tokens generated "
            f"(~{2 * n_params * gen / 1e12:.2f} TFLOP)"
        )
    (old_s, old_p, old_c), (new_s, new_p, new_c) = res[False], res[True]
    same = all(a.token_ids == b.token_ids for a, b in zip(old_c, new_c))
    dlp = max((abs(x - y) for a, b in zip(old_c, new_c) for x, y in zip(a.logprobs, b.logprobs)), default=0.0)
    print(
        f"ratio new / old: wall {new_s / old_s:.2f}, prompt positions {new_p / old_p:.2f}; "
        f"same tokens: {same}, max |log-prob diff| {dlp:.1e}"
    )


def compare_hf_generate(args, model, tok, prompts, enc, reqs, cfg):
    """HF generate vs ours vs a teacher-forced forward (see the module docstring)."""
    B, T, M = args.batch_size, args.temperature, args.max_new_tokens
    eos = tok.eos_token_id
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
