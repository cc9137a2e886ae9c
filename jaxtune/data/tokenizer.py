"""Loading the tokenizer, applying a chat-template override, and what the pipeline needs of it.

The tokenizer comes from ``model.tokenizer`` (or ``model.path``) with ``trust_remote_code`` off.
``data.chat_template`` may replace its template by a built-in name, a file, or a Jinja string.
:class:`TokenizerInfo` gathers the facts the formats rely on (BOS behaviour, EOS, the special
token strings that end turns) and a fingerprint that keys the tokenization cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from jaxtune.data.errors import DataError

# Built-in templates for tokenizers that ship without one (or to replace a broken one).
NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{- message['content'] | trim }}{{- '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    # Gemma's own (google/gemma-3-*-it, text parts): Gemma has no system role, so a system
    # prompt is folded into the first user turn; roles must alternate.
    "gemma": r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
""",
    # Gemma 4's own (google/gemma-4-*-it, text parts, thinking off): a system turn of its own,
    # each turn <|turn>role ... <turn|> with the assistant called model, content trimmed.
    "gemma4": r"""{{- bos_token -}}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content | trim -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if item['type'] == 'text' -%}
                {{- item['text'] | trim -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\n' -}}
    {{- render_content(messages[0]['content']) -}}
    {{- '<turn|>\n' -}}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\n' -}}
    {{- render_content(message['content']) -}}
    {{- '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\n' -}}
{%- endif -%}
""",
}

# Special tokens each named template writes; the tokenizer must know them as single tokens.
_NAMED_TEMPLATE_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "gemma4": ["<|turn>", "<turn|>"],
}


def resolve_chat_template(value: str, tokenizer=None) -> str:
    """The Jinja text for ``data.chat_template``: a built-in name, a file path, or Jinja itself."""
    if value in NAMED_TEMPLATES:
        if tokenizer is not None:
            vocab = tokenizer.get_vocab()
            missing = [t for t in _NAMED_TEMPLATE_TOKENS[value] if t not in vocab]
            if missing:
                raise DataError(
                    f"data.chat_template '{value}' writes the tokens {missing}, which the "
                    "tokenizer does not have; pick a template made for this tokenizer."
                )
        return NAMED_TEMPLATES[value]
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{%" in value or "{{" in value:
        return value
    raise DataError(
        f"data.chat_template '{value}' is not a built-in template "
        f"({', '.join(NAMED_TEMPLATES)}), an existing file, or a Jinja template string."
    )


# Any one of these makes a folder loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "vocab.txt", "tekken.json", "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(cfg):
    """The run's tokenizer (a ``transformers`` tokenizer), chat-template override applied.

    Reads ``cfg.model.tokenizer`` or else ``cfg.model.path``; never runs remote code. Both
    paths are checked first (:func:`jaxtune.locate.check_model_paths`), so a missing folder,
    a file given for a folder or an uncached hub id is named as such.
    """
    from transformers import AutoTokenizer

    from jaxtune.locate import check_model_paths

    if not (cfg.model.tokenizer or cfg.model.path):
        raise DataError("No tokenizer: set model.tokenizer or model.path in the config.")
    model_dir, tok_dir = check_model_paths(cfg)
    key = "model.tokenizer" if tok_dir is not None else "model.path"
    path = tok_dir if tok_dir is not None else model_dir
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise DataError(
            f"{path} ({key}) holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}). "
            "Set model.tokenizer to the folder (or hub id) of the model's tokenizer, or save "
            "the tokenizer into this folder (tokenizer.save_pretrained).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise DataError(
            f"Could not load a tokenizer from {path} ({key}): {e}. The folder needs the "
            "tokenizer files save_pretrained writes (tokenizer.json or tokenizer.model, "
            "tokenizer_config.json); set model.tokenizer to a folder that has them."
        ) from None
    if cfg.data.chat_template:
        tokenizer.chat_template = resolve_chat_template(cfg.data.chat_template, tokenizer)
    return tokenizer


def check_vocab_fits(tokenizer, cfg) -> None:
    """Refuse a tokenizer with more tokens than the model's embedding has rows.

    Ids at or above ``vocab_size`` read past the embedding (in JAX: NaN, so the loss is NaN at
    step 1, which looks like a learning-rate problem). ``len(tokenizer)`` counts added tokens.
    """
    from jaxtune.locate import model_vocab_size

    vocab = model_vocab_size(cfg)
    if vocab is None:
        return
    n = len(tokenizer)
    if n <= vocab:
        return
    source = (f"model.tokenizer ({cfg.model.tokenizer})" if cfg.model.tokenizer
              else f"the tokenizer of model.path ({cfg.model.path})")
    raise DataError(
        f"The tokenizer has {n} tokens (ids up to {n - 1}, added tokens included), but the "
        f"model at model.path ({cfg.model.path}) has vocab_size={vocab} embedding rows; every "
        f"id from {vocab} on would read past the embedding and the loss would be NaN. The "
        f"tokenizer comes from {source}. Use the tokenizer made for this model (leave "
        "model.tokenizer empty to use the one in model.path), or give the model an embedding "
        f"of at least {n} rows first (in transformers: "
        "model.resize_token_embeddings(len(tokenizer)), then save_pretrained to a new folder "
        "for model.path)."
    )


@dataclass(frozen=True)
class TokenizerInfo:
    """What the formats need to know about a tokenizer, computed once."""

    bos_id: int | None  # BOS token id, when the tokenizer adds one to plain text by default
    eos_id: int | None  # the tokenizer's EOS, appended to plain-text examples
    pad_id: int  # id written into padding (masked out; never EOS when avoidable)
    special_tokens: tuple[str, ...]  # special token strings, longest first (turn-end search)
    has_chat_template: bool
    fingerprint: str  # hash of vocabulary, merges, normaliser, special tokens and template

    @classmethod
    def of(cls, tokenizer) -> TokenizerInfo:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        if pad is None or pad == eos:
            # Pad ids are always masked by segment id 0, but keep EOS out of padding so no
            # downstream code that masks "pad" can ever mask a real EOS.
            pad = 0 if eos != 0 else 1
        specials = {t for t in tokenizer.all_special_tokens}
        for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
            if getattr(tok, "special", False):
                specials.add(str(tok))
        specials.discard("")
        return cls(
            bos_id=bos if adds_bos else None,
            eos_id=eos,
            pad_id=int(pad),
            special_tokens=tuple(sorted(specials, key=lambda s: (-len(s), s))),
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            fingerprint=tokenizer_fingerprint(tokenizer),
        )


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would encode or render anything differently."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: the vocabulary is the best proxy we have
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    template = getattr(tokenizer, "chat_template", None) or ""
    h.update(json.dumps(template, sort_keys=True, default=str).encode())
    return h.hexdigest()
