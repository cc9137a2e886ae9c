# ruff: noqa: E501 -- the templates keep the line layout of their families' own templates
"""Session fixture: the chat templates of real model families, on one tiny tokenizer.

Each template is written with the Jinja structure of the family's own template (branches for
tools and images, dead without them, are left out), because that structure is what decides
where a reply sits:

* ``qwen3``: ChatML; the last turn after the last user query gets a ``<think>`` block (empty
  if there is no reasoning), earlier turns lose theirs, so earlier turns render differently
  once later turns follow;
* ``mistral_v3``: Mistral v0.3 as on the Hub: the system prompt is written into the user
  turn only when that turn is the last message, and replies are trimmed after a space;
* ``mistral_v3_last_user``: the mistral-common v3 layout, the system prompt in the last user
  turn of the conversation (so earlier prefixes place it elsewhere);
* ``mistral_v1``: Mistral v0.1: no trim, no generation prompt, no system role;
* ``llama3``: Llama 3 (BOS in the first turn, trimmed content, ``<|eot_id|>``);
* ``llama31``: Llama 3.1 (a system header with a knowledge-cutoff date always written);
* ``gemma``: Gemma 3 (``<start_of_turn>``/``<end_of_turn>``, the system prompt folded into
  the first user turn, the assistant called ``model``);
* ``gemma4``: Gemma 4, text parts, thinking off (``<|turn>``/``<turn|>``, a system turn of
  its own, the assistant called ``model``, trimmed content);
* ``zephyr``: Zephyr (``<|user|>``/``<|assistant|>`` as plain text, each turn ending in
  ``</s>``, newlines from ``trim_blocks`` rendering);
* ``llama2``: Llama 2 (``<<SYS>>`` in the first user turn, replies as ``' ' + reply + ' </s>'``);
* ``phi3``: Phi-3 (ends the text with EOS unless asked for a generation prompt, so no prefix
  of the chat renders as the start of it).

Every template has a twin with ``{% generation %}`` markers around what the model writes,
rendering the same text, so transformers' ``return_assistant_tokens_mask`` gives a reference
mask that does not come from jaxtune.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest

QWEN3 = r"""
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

QWEN3_MARKED = QWEN3.replace(
    r"""        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}""",
    r"""        {{- '<|im_start|>' + message.role + '\n' }}
        {%- generation %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}
        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}""",
)

_MISTRAL_V3_HEAD = r"""
{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- set ns.last_user = -1 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if SYSTEM_HERE and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""
_MISTRAL_V3_REPLY = r"""        {{- " " + message["content"]|trim + eos_token}}"""
_MISTRAL_V3_REPLY_MARKED = (
    r"""        {{- " " }}{%- generation %}{{- message["content"]|trim + eos_token}}"""
    r"""{%- endgeneration %}""")
MISTRAL_V3 = _MISTRAL_V3_HEAD.replace("SYSTEM_HERE", "loop.last")
MISTRAL_V3_LAST_USER = _MISTRAL_V3_HEAD.replace("SYSTEM_HERE", "loop.index0 == ns.last_user")

MISTRAL_V1 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_V1_MARKED = MISTRAL_V1.replace(
    "{{ message['content'] + eos_token}}",
    "{% generation %}{{ message['content'] + eos_token}}{% endgeneration %}")

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_MARKED = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA31 = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {{- message.content }}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
LLAMA31_MARKED = LLAMA31.replace(
    r"""        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}""",
    r"""        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['role'] == 'assistant' %}{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
        {%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}""",
)

GEMMA = r"""{{ bos_token }}
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
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
GEMMA_MARKED = GEMMA.replace(
    r"""    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}""",
    r"""    {%- if role == 'model' -%}
        {%- generation -%}{{ message['content'] | trim }}{{ '<end_of_turn>' }}{%- endgeneration -%}
        {{ '\n' }}
    {%- else -%}
        {{ message['content'] | trim }}{{ '<end_of_turn>\n' }}
    {%- endif -%}""",
)

ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
    "\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
ZEPHYR_MARKED = ZEPHYR.replace(
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}",
    # trim_blocks eats the newline after a block tag: write one more for it to eat
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}\n")

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_MARKED = PHI3.replace(
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}",
    "{{'<|assistant|>\n'}}{% generation %}{{ message['content'] + '<|end|>' }}"
    "{% endgeneration %}{{ '\n' }}")

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
LLAMA2_MARKED = LLAMA2.replace(
    "{{ ' '  + content.strip() + ' ' + eos_token }}",
    "{{ ' ' }}{% generation %}{{ content.strip() + ' ' + eos_token }}{% endgeneration %}")


GEMMA4 = r"""{{- bos_token -}}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content | trim -}}
    {%- elif content is sequence -%}
        {%- for item in content -%}
            {%- if item['type'] == 'text' -%}
                {{- item['text'] | trim -}}
            {%- elif item['type'] == 'image' -%}
                {{- '\n\n<|image|>\n\n' -}}
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
"""
GEMMA4_MARKED = GEMMA4.replace(
    """    {{- render_content(message['content']) -}}
    {{- '<turn|>\\n' -}}
{%- endfor -%}""",
    """    {%- if role == 'model' -%}
        {%- generation -%}{{- render_content(message['content']) + '<turn|>' -}}{%- endgeneration -%}
        {{- '\\n' -}}
    {%- else -%}
        {{- render_content(message['content']) -}}
        {{- '<turn|>\\n' -}}
    {%- endif -%}
{%- endfor -%}""")
assert GEMMA4_MARKED != GEMMA4


class ChatTemplate(NamedTuple):
    text: str  # the template, with its family's structure
    marked: str  # the same, with {% generation %} around what the model writes
    bos: str | None
    eos: str
    pad: str | None
    end: str  # the end-of-turn token of assistant turns
    system: bool = True  # whether the template accepts a system message
    specials: tuple[str, ...] = ()  # its own special tokens, beyond EXTRA_SPECIAL_TOKENS


# Special tokens several templates need, beyond those of tests/fixtures_data.SPECIAL_TOKENS.
EXTRA_SPECIAL_TOKENS = ("<s>", "</s>", "[INST]", "[/INST]", "<bos>", "<eos>",
                        "<start_of_turn>", "<end_of_turn>")

CHAT_TEMPLATES = {
    "qwen3": ChatTemplate(QWEN3, QWEN3_MARKED, None, "<|im_end|>", "<|endoftext|>",
                          "<|im_end|>"),
    "mistral_v3": ChatTemplate(
        MISTRAL_V3, MISTRAL_V3.replace(_MISTRAL_V3_REPLY, _MISTRAL_V3_REPLY_MARKED),
        "<s>", "</s>", None, "</s>"),
    "mistral_v3_last_user": ChatTemplate(
        MISTRAL_V3_LAST_USER,
        MISTRAL_V3_LAST_USER.replace(_MISTRAL_V3_REPLY, _MISTRAL_V3_REPLY_MARKED),
        "<s>", "</s>", None, "</s>"),
    "mistral_v1": ChatTemplate(MISTRAL_V1, MISTRAL_V1_MARKED, "<s>", "</s>", None, "</s>",
                               system=False),
    "llama2": ChatTemplate(LLAMA2, LLAMA2_MARKED, "<s>", "</s>", None, "</s>"),
    "llama3": ChatTemplate(LLAMA3, LLAMA3_MARKED, "<|begin_of_text|>", "<|eot_id|>", None,
                           "<|eot_id|>"),
    "llama31": ChatTemplate(LLAMA31, LLAMA31_MARKED, "<|begin_of_text|>", "<|eot_id|>", None,
                            "<|eot_id|>"),
    "gemma": ChatTemplate(GEMMA, GEMMA_MARKED, "<bos>", "<eos>", None, "<end_of_turn>"),
    "gemma4": ChatTemplate(GEMMA4, GEMMA4_MARKED, "<bos>", "<eos>", None, "<turn|>",
                           specials=("<|turn>", "<turn|>")),
    "zephyr": ChatTemplate(ZEPHYR, ZEPHYR_MARKED, "<s>", "</s>", None, "</s>"),
    "phi3": ChatTemplate(PHI3, PHI3_MARKED, None, "<|endoftext|>", None, "<|end|>",
                         specials=("<|end|>", "<|user|>", "<|assistant|>", "<|system|>")),
}


def build_template_tokenizer(name: str, base):
    """A ``PreTrainedTokenizerFast`` on the fixture BPE, with the template ``name``."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    t = CHAT_TEMPLATES[name]
    tok = Tokenizer.from_str(base.to_str())
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in EXTRA_SPECIAL_TOKENS + t.specials])
    kwargs = {k: v for k, v in (("bos_token", t.bos), ("eos_token", t.eos), ("pad_token", t.pad))
              if v}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    hf.chat_template = t.text
    return hf


@pytest.fixture(scope="session")
def chat_template_tokenizers() -> dict:
    """Template name -> tokenizer (in memory) with that template."""
    from tests.fixtures_data import _train_bpe

    base = _train_bpe()
    return {name: build_template_tokenizer(name, base) for name in CHAT_TEMPLATES}
