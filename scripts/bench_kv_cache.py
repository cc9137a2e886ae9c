"""The generation KV cache's bytes with sliding-window layers as rings of their window, against
the cache of every slot on every layer (what jaxtune kept before), side by side.

    python scripts/bench_kv_cache.py                 # one row, 4 windows of tokens
    python scripts/bench_kv_cache.py --rows 8 --windows 8

The models are the public configs of Mistral-7B-v0.1, Gemma-2-9B and Gemma-3-4B (text), built
abstract (no weights, no arrays): the caches' shapes come from ``Generator.new_cache`` under
``jax.eval_shape``, so nothing is allocated and any machine runs it in seconds.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from jaxtune.generation.cache import cache_layout, empty_cache
from jaxtune.generation.loop import Generator
from jaxtune.models.build import abstract_model
from jaxtune.models.family import get_family

GIB = 1024**3

#: Public config.json fields of each model (the ones the cache depends on, plus what the
#: family needs to build it).
MODELS = {
    "Mistral-7B-v0.1": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        sliding_window=4096, max_position_embeddings=32768, rope_theta=10000.0,
        rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False),
    "gemma-2-9b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
        num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
        sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, max_position_embeddings=8192, rope_theta=10000.0,
        hidden_activation="gelu_pytorch_tanh"),
    "gemma-3-4b (text)": dict(
        model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
        num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        sliding_window=1024, sliding_window_pattern=6, query_pre_attn_scalar=256,
        max_position_embeddings=131072, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        hidden_activation="gelu_pytorch_tanh"),
}


def nbytes(tree) -> int:
    """Bytes of a pytree of arrays or shapes."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help="prompts generated together")
    parser.add_argument("--windows", type=int, default=4,
                        help="tokens per row (prompt + answer), in windows")
    args = parser.parse_args()
    print(f"{'model':20} {'window':>7} {'tokens':>7} {'every slot GiB':>15} "
          f"{'ring GiB':>9} {'ratio':>6}")
    for name, hf in MODELS.items():
        cfg = get_family(hf["model_type"]).config_cls.from_hf_config(hf)
        model = abstract_model(cfg, param_dtype=jnp.bfloat16, scan_layers=True)
        gen = Generator(model)
        window = cfg.sliding_window
        slots = args.windows * window
        ring = nbytes(jax.eval_shape(lambda gen=gen, slots=slots: gen.new_cache(args.rows,
                                                                                  slots)))
        layers, kv, h = cache_layout(model, ring=False)
        every = nbytes(jax.eval_shape(lambda layers=layers, kv=kv, h=h, slots=slots,
                                      dtype=gen.dtype: empty_cache(layers, args.rows, slots,
                                                                   kv, h, dtype)))
        print(f"{name:20} {window:>7} {slots:>7} {every / GIB:>15.3f} {ring / GIB:>9.3f} "
              f"{every / ring:>5.2f}x")


if __name__ == "__main__":
    main()
