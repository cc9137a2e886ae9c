"""Session fixtures for the data pipeline: tiny trained tokenizers with real chat templates.

``data_tokenizers`` builds, once per session, byte-level BPE tokenizers (vocab 389) saved as
Hugging Face folders, each with a different chat template:

* ``chatml``: Qwen / SmolLM style ``<|im_start|>role\\n...<|im_end|>\\n``, no BOS;
* ``llama3``: Llama 3 style; the tokenizer adds ``<|begin_of_text|>`` to plain text and the
  template writes it too (so a doubled BOS would show);
* ``generation``: ChatML with ``{% generation %}`` markers around assistant replies, so
  transformers' own ``return_assistant_tokens_mask`` gives an independent reference;
* ``thinking``: Qwen3 style, where the last assistant turn gets an empty think block that
  earlier turns lose (prefix renders are not prefixes of the full chat).

Helpers write jsonl files and build a :class:`TrainConfig` around them.
"""

from __future__ import annotations

import json
import os
import random

import pytest

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
    "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
]

WORDS = (
    "the a an of to and in is it that for on with as was be by this are or at from his her "
    "which have not had one but all were there been has when who will more no if out so what "
    "hello world model token train data chat assistant user system answer question please "
    "thank you how are fine good day night river mountain blue green red quick brown fox "
    "jumps over lazy dog seven eleven numbers 12 345 6789 café naïve über"
).split()

CHATML = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim }}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

GENERATION = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- m['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

THINKING = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# name -> (template, bos, eos, pad, adds BOS to plain text)
TOKENIZER_STYLES = {
    "chatml": (CHATML, None, "<|im_end|>", "<|endoftext|>", False),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", None, True),
    "generation": (GENERATION, None, "<|im_end|>", "<|endoftext|>", False),
    "thinking": (THINKING, None, "<|im_end|>", "<|endoftext|>", False),
}


def random_text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", "?", "!", ""])


def _train_bpe(vocab_size: int = 389):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    corpus = [random_text(rng, rng.randint(3, 30)) for _ in range(3000)]
    corpus += ["user assistant system\n\n<think>\n\n</think>\n\n"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def build_tokenizer(style: str, base=None):
    """A ``PreTrainedTokenizerFast`` of the given style (see module doc)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    template, bos, eos, pad, adds_bos = TOKENIZER_STYLES[style]
    tok = Tokenizer.from_str((base or _train_bpe()).to_str())
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)) if v}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    hf.chat_template = template
    return hf


@pytest.fixture(scope="session")
def data_tokenizers(tmp_path_factory) -> dict[str, str]:
    """Style name -> folder of a saved tokenizer (load with AutoTokenizer or load_tokenizer)."""
    root = tmp_path_factory.mktemp("data_tokenizers")
    base = _train_bpe()
    out = {}
    for style in TOKENIZER_STYLES:
        path = str(root / style)
        build_tokenizer(style, base).save_pretrained(path)
        out[style] = path
    return out


def write_jsonl(path, rows) -> str:
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def make_data_config(tmp_path, tokenizer_dir: str, sources, *, eval_sources=(), batch=4,
                     seed=0, **data):
    """A TrainConfig reading ``sources`` (paths or {path, split, weight} dicts)."""
    from jaxtune.config import config_from_dict

    def src(s):
        return {"path": str(s)} if not isinstance(s, dict) else s

    raw = {
        "run": {"seed": seed, "output_dir": str(tmp_path / "run")},
        "model": {"tokenizer": tokenizer_dir},
        "trainer": {"global_batch_size": batch},
        "data": {"sources": [src(s) for s in sources],
                 "eval_sources": [src(s) for s in eval_sources],
                 "cache_dir": str(tmp_path / "cache"), "seq_len": 64, **data},
    }
    return config_from_dict(raw)


def chat_rows(n: int, seed: int = 0, turns: int = 2, system: bool = True, sharegpt=False):
    """Multi-turn chats with random words (OpenAI messages or ShareGPT conversations)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": random_text(rng, 4)}] if system else []
        for _ in range(rng.randint(1, turns)):
            msgs.append({"role": "user", "content": random_text(rng, rng.randint(2, 9))})
            msgs.append({"role": "assistant", "content": random_text(rng, rng.randint(1, 12))})
        if sharegpt:
            names = {"system": "system", "user": "human", "assistant": "gpt"}
            rows.append({"id": i, "conversations": [
                {"from": names[m["role"]], "value": m["content"]} for m in msgs]})
        else:
            rows.append({"id": i, "messages": msgs})
    return rows
