"""Chunked ReasonMaxxer loss from hidden states vs today's [N, V] logits path.

    python benchmarks/chunked_loss.py                       # CPU, fp32, N=512 (2 cores: about 1 min)
    python benchmarks/chunked_loss.py --device cuda --n 8192 --dtype bf16

Workload: N positions (30% gated, the rest anchored), H=1536, V=151,936 (Qwen2.5-1.5B's head),
the head weight trained too (the hardest case: a [V, H] gradient). "naive" is what
stages/batch_loss.py does without chunking: logits = hidden @ W.T and the base logits as [N, V] tensors, then
`reasonmaxxer_loss` (token_logprobs + decision_loss + lam * anchor_kl). "chunked" is
`chunked_head_loss` on the same rows. Each is run forward + backward once (after one warm-up
on CUDA). Printed per method: seconds, the largest single tensor any op created (forward and
backward, recorded by a TorchDispatchMode; [V, H]-shaped ones left out) and, on CUDA, the peak allocated memory above the
inputs; then the max abs differences (loss, grad hidden, grad weight) and the ratio line.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from reasonmaxxer.core.chunked import chunked_head_loss, head_loss_weights
from reasonmaxxer.core.entropy import token_logprobs
from reasonmaxxer.core.losses import reasonmaxxer_loss


class LargestTensor(TorchDispatchMode):
    """Largest tensor (bytes) returned by any aten op while active, leaving out the tensors
    shaped like the [V, H] head (its copies and gradient: both methods hold those)."""

    def __init__(self, head_shape):
        super().__init__()
        self.head = sorted(head_shape)
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and sorted(t.shape) != self.head:
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, n, h, generator=g) / h**0.25
    hidden_base = hidden + 0.05 * torch.randn(1, n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.25
    targets = torch.randint(0, v, (1, n), generator=g)
    gate = torch.rand(1, n, generator=g) < 0.3
    adv = torch.tensor([0.7])
    to = dict(device=device, dtype=dtype)
    return hidden.to(**to), hidden_base.to(**to), weight.to(**to), targets.to(device), gate.to(device), adv.to(device)


def naive(hidden, hidden_base, weight, targets, gate, adv, lam, dd, ad, chunk):
    logits = hidden @ weight.t()  # [1, N, V]
    with torch.no_grad():
        base = hidden_base @ weight.t()
    loss, _ = reasonmaxxer_loss(
        token_logprob=token_logprobs(logits, targets),
        logits_theta=logits,
        logits_base=base,
        advantages=adv,
        gate=gate,
        anchor_mask=~gate,
        lam=lam,
        dec_denom=dd,
        anc_denom=ad,
    )
    return loss


def chunked(hidden, hidden_base, weight, targets, gate, adv, lam, dd, ad, chunk):
    pos, dec, anc = head_loss_weights(adv, gate, ~gate, lam, dd, ad)
    H = hidden.shape[-1]
    loss, _ = chunked_head_loss(
        hidden.reshape(-1, H)[pos],
        hidden_base.reshape(-1, H)[pos],
        weight,
        targets.reshape(-1)[pos],
        dec,
        anc,
        chunk=chunk,
    )
    return loss


def run(fn, inputs, args, device, warmup):
    hidden, hidden_base, weight, targets, gate, adv = inputs
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    call = lambda: fn(h, hidden_base, w, targets, gate, adv, 0.2, float(gate.sum()), float((~gate).sum()), args.chunk)
    if warmup:
        call().backward()
    h.grad = w.grad = None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    with LargestTensor(weight.shape) as mode:
        t0 = time.perf_counter()
        loss = call()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20 if cuda else float("nan")
    return dt, mode.bytes / 2**20, peak, loss.detach().double(), h.grad.double(), w.grad.double()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="positions (default 512: about 1 min on 2 CPU cores)")
    ap.add_argument("--h", type=int, default=1536)
    ap.add_argument("--v", type=int, default=151_936)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    inputs = make_inputs(args.n, args.h, args.v, dtype, device)
    print(
        f"N={args.n} H={args.h} V={args.v} chunk={args.chunk} {args.dtype} on {device} "
        f"(one [N, V] fp32 tensor = {args.n * args.v * 4 / 2**20:.0f} MiB)"
    )
    res = {}
    for name, fn in (("naive", naive), ("chunked", chunked)):
        res[name] = run(fn, inputs, args, device, warmup=device.type == "cuda")
        dt, big, peak, *_ = res[name]
        print(f"{name:8s} {dt:8.2f} s   largest non-[V, H] tensor {big:9.1f} MiB   peak allocated {peak:9.1f} MiB")
    (tn, bn, pn, ln, ghn, gwn), (tc, bc, pc, lc, ghc, gwc) = res["naive"], res["chunked"]
    diff = [float((a - b).abs().max()) for a, b in ((ln, lc), (ghn, ghc), (gwn, gwc))]
    print(f"max abs diff: loss {diff[0]:.2e}  grad hidden {diff[1]:.2e}  grad weight {diff[2]:.2e}")
    print(
        f"chunked/naive: time {tc / tn:.2f}x  largest tensor {bc / bn:.4f}x"
        + (f"  peak {pc / pn:.3f}x" if pn == pn else "")
    )


if __name__ == "__main__":
    main()
