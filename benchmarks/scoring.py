"""Benchmark: chunked `score_sequences` vs the naive full-logits computation.

    python benchmarks/scoring.py                   # seq 512 and 2048, batch 1, SmolLM2-135M
    python benchmarks/scoring.py --batch 2 --seqs 2048 --repeats 2
    python benchmarks/scoring.py --random          # SmolLM2-135M-shaped random weights

Three variants on the same inputs (real MATH-500 text when ../shared/data is found, else
random token ids; with batch 2 the second row is left-padded by 1/8 of its length):

- forward: ``model(ids, attention_mask).logits`` only (the throughput to match);
- naive:   forward, then fp32 log_softmax, entropy and the token's log-prob over [B, T, V];
- ours:    ``reasonmaxxer.scoring.score_sequences`` (decoder once + chunked head).

Reported: max |naive - ours| over scored positions (entropy and log-prob), tokens/s of
each (best of interleaved, order-rotated rounds after a warm-up, in one process, so
background load hits all alike; and the median over rounds of the paired time ratio to
the plain forward pass, which cancels slow drifts in other processes' load), the error of
naive and ours against a float64 computation from the same logits, and peak extra memory
of each, measured in a fresh subprocess per variant as the peak resident set (VmHWM,
reset through /proc/self/clear_refs) minus the resident set before the call, after a
16-token warm-up, with glibc's mmap threshold pinned so freed buffers really leave the
process. Not part of the test suite; about 5 minutes on 2 CPU cores. On shared cores the
wall times swing several-fold with other processes' load: read the paired ratios, and
rerun with more --repeats when the rounds disagree.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reasonmaxxer.stages.score import position_ids_from_mask, score_sequences  # noqa: E402 (after the sys.path insert)

# ------------------------------------------------------------------------------ setup


def load(random_weights: bool):
    """(model, tokenizer or None, description)."""
    if not random_weights:
        try:
            from reasonmaxxer.models import load_model

            model, tok = load_model("smollm2-135m")
            return model.eval(), tok, "SmolLM2-135M-Instruct (real weights, fp32)"
        except Exception as e:  # the module or the embedded model is missing
            print(f"[real model unavailable: {type(e).__name__}: {e}; using random weights]", file=sys.stderr)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval(), None, "SmolLM2-135M-shaped LlamaConfig, random weights, fp32"


def make_inputs(tok, vocab: int, batch: int, seq: int):
    """input_ids, attention_mask [batch, seq]; row 1+ left-padded by seq // 8."""
    ids = None
    if tok is not None:
        for data in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data"):
            f = data / "math500" / "test.jsonl"
            if f.exists():
                text = ""
                for line in f.read_text().splitlines():
                    row = json.loads(line)
                    text += f"Problem: {row['problem']}\nSolution: {row['solution']}\n\n"
                    if len(text) > 8 * seq * batch:
                        break
                all_ids = torch.tensor(tok(text)["input_ids"])
                if all_ids.numel() >= seq * batch:
                    ids = all_ids[: seq * batch].reshape(batch, seq)
                break
    if ids is None:
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        pad = seq // 8
        ids[b] = torch.cat([torch.zeros(pad, dtype=ids.dtype), ids[b, : seq - pad]])
        mask[b, :pad] = 0
    return ids, mask


# ------------------------------------------------------------------------------ variants


@torch.no_grad()
def run_forward(model, ids, mask, chunk):
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


@torch.no_grad()
def run_naive(model, ids, mask, chunk):
    logits = run_forward(model, ids, mask, chunk).float()  # [B, T, V]
    logp = logits.log_softmax(-1)[:, :-1]  # [B, T-1, V]
    entropy = -(logp.exp() * logp).sum(-1)  # [B, T-1]
    logprob = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    return entropy, logprob


@torch.no_grad()
def run_ours(model, ids, mask, chunk):
    ent, lp = score_sequences(model, ids, mask, chunk_tokens=chunk)
    return ent[:, 1:], lp[:, 1:]


VARIANTS = {"forward": run_forward, "naive": run_naive, "ours": run_ours}


# ------------------------------------------------------------------------------ memory worker


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_worker(args) -> None:
    model, tok, _ = load(args.random)
    ids, mask = make_inputs(tok, model.config.vocab_size, args.batch, args.seq)
    # warm-up on 16 tokens (lazy library init, ours' once-per-model head check) outside the measurement
    VARIANTS[args.variant](model, ids[:1, :16], mask[:1, :16], args.chunk)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    out = VARIANTS[args.variant](model, ids, mask, args.chunk)
    peak = _status_kb("VmHWM")
    del out
    print(json.dumps({"extra_mb": (peak - before) / 1024, "before_mb": before / 1024}))


def measure_memory(variant: str, args, seq: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--seq",
        str(seq),
        "--batch",
        str(args.batch),
        "--chunk",
        str(args.chunk),
    ] + (["--random"] if args.random else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["extra_mb"]


# ------------------------------------------------------------------------------ main


def bench(model, tok, args, seq: int) -> dict:
    ids, mask = make_inputs(tok, model.config.vocab_size, args.batch, seq)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()  # scored positions, column t+1 of `ours`
    n_tok = int(mask.sum())
    names = list(VARIANTS)
    wall = {k: [] for k in names}
    outputs = {}
    # Rounds of all three variants, the order rotated each round so that no variant always
    # follows the same one; the first round's naive/ours outputs are the correctness check.
    for r in range(max(1, args.repeats)):
        for name in names[r % 3 :] + names[: r % 3]:
            t0 = time.perf_counter()
            out = VARIANTS[name](model, ids, mask, args.chunk)
            wall[name].append(time.perf_counter() - t0)
            if r == 0 and name != "forward":
                outputs[name] = out
            del out
    (ref_e, ref_l), (our_e, our_l) = outputs["naive"], outputs["ours"]
    diff_e = (ref_e - our_e)[valid].abs().max().item()
    diff_l = (ref_l - our_l)[valid].abs().max().item()
    # float64 truth on row 0's first 256 predictions (causal: same logits as in the full run)
    k = min(256, seq - 1)
    logp64 = run_forward(model, ids[:1, : k + 1], mask[:1, : k + 1], args.chunk).double().log_softmax(-1)[:, :-1]
    e64 = -(logp64.exp() * logp64).sum(-1)  # [1, k]
    l64 = logp64.gather(-1, ids[:1, 1 : k + 1, None]).squeeze(-1)  # [1, k]
    acc = {
        "naive": ((ref_e[:1, :k] - e64).abs().max().item(), (ref_l[:1, :k] - l64).abs().max().item()),
        "ours": ((our_e[:1, :k] - e64).abs().max().item(), (our_l[:1, :k] - l64).abs().max().item()),
    }
    # best-of: the run least disturbed by other load; paired: per round, so slow drifts in
    # background load cancel, the median over rounds of forward time / variant time
    tps = {k: n_tok / min(v) for k, v in wall.items()}
    paired = {k: statistics.median(f / t for f, t in zip(wall["forward"], wall[k])) for k in names}
    mem = {k: measure_memory(k, args, seq) for k in names}
    return {
        "seq": seq,
        "tokens": n_tok,
        "diff_entropy": diff_e,
        "diff_logprob": diff_l,
        "acc64": acc,
        "tps": tps,
        "paired": paired,
        "wall": wall,
        "mem_mb": mem,
        "mean_entropy": ref_e[valid].mean().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds per sequence length (>= 1)")
    p.add_argument("--random", action="store_true", help="random SmolLM2-135M-shaped weights")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.variant = args.worker
        memory_worker(args)
        return

    t_start = time.perf_counter()
    model, tok, desc = load(args.random)
    print(
        f"model: {desc}; vocab {model.config.vocab_size}; batch {args.batch}; chunk_tokens {args.chunk}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; inputs: "
        f"{'MATH-500 text' if tok is not None else 'random ids'}; load average {os.getloadavg()[0]:.1f}"
    )
    ids, mask = make_inputs(tok, model.config.vocab_size, 1, 16)
    for fn in VARIANTS.values():  # warm-up: lazy library init, ours' once-per-model head check
        fn(model, ids, mask, args.chunk)
    for seq in args.seqs:
        r = bench(model, tok, args, seq)
        t, q, m = r["tps"], r["paired"], r["mem_mb"]
        print(
            f"\nseq {seq} x batch {args.batch} ({r['tokens']} real tokens; mean entropy {r['mean_entropy']:.3f} nats)"
        )
        print(
            f"  max |naive - ours| over all scored positions: entropy {r['diff_entropy']:.2e}, "
            f"logprob {r['diff_logprob']:.2e}"
        )
        for k, (de, dl) in r["acc64"].items():
            print(f"  max |{k:5s} - float64| on 256 positions: entropy {de:.2e}, logprob {dl:.2e}")
        print(
            f"  tokens/s (best of {len(r['wall']['forward'])}): forward {t['forward']:7.1f}   "
            f"naive {t['naive']:7.1f}   ours {t['ours']:7.1f}"
        )
        rounds = "; ".join(f"{k} " + " ".join(f"{x:.2f}" for x in v) for k, v in r["wall"].items())
        print(f"  seconds per round: {rounds}")
        print(
            f"  peak extra memory (MB): forward {m['forward']:7.1f}   naive {m['naive']:7.1f}   ours {m['ours']:7.1f}"
        )
        print(
            f"  ratios: ours/naive memory {m['ours'] / m['naive']:.3f}; throughput vs forward (best-of, paired "
            f"median): ours {t['ours'] / t['forward']:.3f}, {q['ours']:.3f}; naive {t['naive'] / t['forward']:.3f}, "
            f"{q['naive']:.3f}"
        )
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
