"""Generation with a functional KV cache, for every family through the family protocol.

``cache`` (the KV cache), ``sampling`` (greedy / temperature / top-k / top-p), ``loop``
(prefill, decode, the on-device loop), ``api`` (``jaxtune.generate``: text in, text out),
``command`` (``jaxtune generate``).
"""

from __future__ import annotations

from typing import Any


def generate(*args: Any, **kwargs: Any):
    """``jaxtune.generate(model, tokenizer, prompts, ...)``: text answers to prompts.

    See :func:`jaxtune.generation.api.generate`."""
    from jaxtune.generation.api import generate as _generate

    return _generate(*args, **kwargs)


def generate_main(argv: list[str]) -> int:
    from jaxtune.generation.command import generate_main as _main

    return _main(argv)
