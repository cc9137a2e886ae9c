"""Causal attention alone, forward + backward: the fused CPU kernel vs XLA vs PyTorch's SDPA.

One layer's attention at the shapes the training benchmarks run (``bench_train.py``'s S and M,
the quickstart's LoRA job: 2 packed rows of 256 tokens, 9 query heads over 3 KV heads, head
dim 64), float32, in one process: jaxtune's ``cpu_flash`` (``jaxtune.kernels.cpu_attention``),
jaxtune's XLA attention (``attention: xla``, the blocked causal path) and PyTorch's
``scaled_dot_product_attention`` (the fused kernel transformers' sdpa attention calls), timed
in alternating rounds. Prints the median milliseconds of each and the ratios to the kernel.

    python scripts/bench_attention.py                  # 7 rounds x 5 calls per shape
    python scripts/bench_attention.py --shapes M --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (batch, length, query heads, KV heads, head dim, packed)
SHAPES = {
    "S": (8, 256, 4, 4, 64, False),
    "M": (8, 512, 8, 8, 64, False),
    "quickstart": (2, 256, 9, 3, 64, True),
}


def jax_runner(shape, implementation: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtune.models.layers import AttentionMask, dot_product_attention

    b, t, n, kv, h, packed = shape
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, t, kv, h))
    v = jax.random.normal(keys[2], (b, t, kv, h))
    w = jax.random.normal(keys[3], (b, t, n, h))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = None
    if packed:  # three documents a row
        seg = jnp.asarray(np.repeat([1, 2, 3], [t // 2, t // 4, t - t // 2 - t // 4])[None]
                          .repeat(b, 0), jnp.int32)
        starts = jnp.asarray([0, t // 2, t // 2 + t // 4])
        positions = positions - starts[seg - 1]
    mask = AttentionMask.causal(positions, seg)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, mask=mask, window=None,
                                    implementation=implementation)
        return (out * w).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))
    return lambda: jax.block_until_ready(step(q, k, v))


def torch_runner(shape, threads: int):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    b, t, n, kv, h, packed = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, n, t, h, generator=g, requires_grad=True)
    k = torch.randn(b, kv, t, h, generator=g, requires_grad=True)
    v = torch.randn(b, kv, t, h, generator=g, requires_grad=True)
    w = torch.randn(b, n, t, h, generator=g)
    mask = None
    if packed:  # the block-diagonal causal mask transformers builds from restarting positions
        seg = torch.tensor([1] * (t // 2) + [2] * (t // 4) + [3] * (t - t // 2 - t // 4))
        mask = (seg[:, None] == seg[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()

    def run():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=kv != n)
        (out * w).sum().backward()

    run()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="S,M,quickstart")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch's threads")
    args = parser.parse_args()

    from jaxtune.hardware import describe_machine
    from scripts.bench_train import alternating_rates

    print(f"machine {describe_machine()}")
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        runners = {"cpu_flash": jax_runner(shape, "cpu_flash"), "xla": jax_runner(shape, "xla"),
                   "torch sdpa": torch_runner(shape, args.threads)}
        # bench_train's alternation (order flipped every round); one "token" per call, so a
        # rate is calls per second.
        rates = alternating_rates([SimpleNamespace(step=run) for run in runners.values()], 1,
                                  args.rounds, args.calls, warmup=1)
        times = {label: [1e3 / r for r in rs] for label, rs in zip(runners, rates, strict=True)}
        b, t, n, kv, h, packed = shape
        print(f"\n{name}: batch {b}, length {t}, {n} heads over {kv} KV heads of {h}"
              f"{', packed' if packed else ''}; forward + backward, ms (min-max)")
        base = statistics.median(times["cpu_flash"])
        for label, ts in times.items():
            med = statistics.median(ts)
            print(f"  {label:<11}{med:>8.1f} ({min(ts):.1f}-{max(ts):.1f})  "
                  f"{med / base:.2f}x the kernel's time")


if __name__ == "__main__":
    main()
