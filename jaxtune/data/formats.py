"""Dataset formats: one source row becomes a plain example (text pieces) or a chat.

``data.format`` picks one of

* ``text``: raw documents, every token trained (continued pretraining);
* ``completion``: ``prompt`` + ``completion``, only the completion (and EOS) trained;
* ``alpaca``: ``instruction``, optional ``input``, ``output``; rendered as a chat with the
  tokenizer's template when it has one (``data.alpaca_prompt: auto``), else with the classic
  Alpaca prompt text;
* ``chat``: OpenAI-style ``messages`` (role/content) or ShareGPT-style ``conversations``
  (from/value), with roles mapped by ``data.role_map`` and an optional default system prompt.

Field names are configurable. A malformed row raises :class:`RowProblem` naming the field;
the caller adds the file and row number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jaxtune.data.errors import RowProblem

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# Role names seen in the wild, mapped to the roles chat templates understand.
DEFAULT_ROLE_MAP = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "tool": "tool",
}
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class FormatSpec:
    """The format settings of ``DataConfig`` that change what an example looks like."""

    format: str
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    role_map: tuple[tuple[str, str], ...] = ()
    system_prompt: str = ""
    train_on_inputs: bool = False
    alpaca_prompt: str = "auto"

    @classmethod
    def from_config(cls, data_cfg) -> FormatSpec:
        return cls(
            format=data_cfg.format,
            text_field=data_cfg.text_field,
            prompt_field=data_cfg.prompt_field,
            completion_field=data_cfg.completion_field,
            instruction_field=data_cfg.instruction_field,
            input_field=data_cfg.input_field,
            output_field=data_cfg.output_field,
            messages_field=data_cfg.messages_field,
            role_map=tuple(sorted(data_cfg.role_map.items())),
            system_prompt=data_cfg.system_prompt,
            train_on_inputs=data_cfg.train_on_inputs,
            alpaca_prompt=getattr(data_cfg, "alpaca_prompt", "auto"),
        )

    def roles(self) -> dict[str, str]:
        return {**DEFAULT_ROLE_MAP, **dict(self.role_map)}


@dataclass
class PlainExample:
    """Text pieces with a trained flag each; the encoder adds BOS (if usual) and a trained EOS."""

    pieces: list[tuple[str, bool]]


@dataclass
class ChatExample:
    """Messages with normalised roles, rendered by the chat template."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    fields: list[str] | None = None  # the row field each message came from, for errors


def parse_row(row: dict[str, Any], spec: FormatSpec, has_chat_template: bool):
    """Turn one source row into a :class:`PlainExample` or :class:`ChatExample`."""
    if spec.format == "text":
        return PlainExample([(_text(row, spec.text_field, "text_field"), True)])
    if spec.format == "completion":
        prompt = _text(row, spec.prompt_field, "prompt_field", allow_empty=True)
        completion = _text(row, spec.completion_field, "completion_field")
        return PlainExample([(prompt, spec.train_on_inputs), (completion, True)])
    if spec.format == "alpaca":
        return _alpaca(row, spec, has_chat_template)
    if spec.format == "chat":  # (the encoder has checked that a chat template exists)
        messages = parse_messages(row, spec)
        # Errors name the row's own fields (data.system_prompt may have been put first).
        raw = row[spec.messages_field]
        keys = ["content" if m.get("role") is not None else "value" for m in raw]
        fields = [f"{spec.messages_field}[{j}].{key}" for j, key in enumerate(keys)]
        return ChatExample(messages, ["data.system_prompt"] * (len(messages) - len(raw)) + fields)
    raise ValueError(f"unknown format {spec.format}")


def _column(row: dict[str, Any], name: str, key: str) -> Any:
    if name not in row:
        raise RowProblem(
            name, f"is missing (the row has {', '.join(sorted(row)) or 'no fields'})",
            f"Point data.{key} at the right field.",
        )
    return row[name]


def _text(row: dict[str, Any], name: str, key: str, allow_empty: bool = False) -> str:
    value = _column(row, name, key)
    if value is None:
        raise RowProblem(name, "is missing (null)")
    if not isinstance(value, str):
        raise RowProblem(name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowProblem(name, "is empty")
    return value


def _alpaca(row: dict[str, Any], spec: FormatSpec, has_chat_template: bool):
    instruction = _text(row, spec.instruction_field, "instruction_field")
    extra = row.get(spec.input_field)
    if extra is not None and not isinstance(extra, str):
        raise RowProblem(spec.input_field, f"must be a string, got {type(extra).__name__}")
    extra = (extra or "").strip()
    output = _text(row, spec.output_field, "output_field")
    use_chat = spec.alpaca_prompt == "chat" or (spec.alpaca_prompt == "auto" and has_chat_template)
    if use_chat:
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        fields = [spec.instruction_field, spec.output_field]
        if spec.system_prompt:
            messages.insert(0, {"role": "system", "content": spec.system_prompt})
            fields.insert(0, "data.system_prompt")
        return ChatExample(messages, fields)
    template = ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT
    prompt = template.format(instruction=instruction, input=extra)
    if spec.system_prompt:
        prompt = f"{spec.system_prompt}\n\n{prompt}"
    return PlainExample([(prompt, spec.train_on_inputs), (output, True)])


def parse_messages(row: dict[str, Any], spec: FormatSpec) -> list[dict[str, Any]]:
    """Validate and normalise a conversation to ``[{role, content, ...}]``."""
    name = spec.messages_field
    value = _column(row, name, "messages_field")
    if value is None:
        raise RowProblem(name, "is missing (null)")
    if not isinstance(value, list):
        raise RowProblem(name, f"must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RowProblem(name, "is an empty conversation")
    roles = spec.roles()
    messages = []
    for j, m in enumerate(value):
        where = f"{name}[{j}]"
        if not isinstance(m, dict):
            raise RowProblem(where, f"must be a mapping with role/content, got {type(m).__name__}")
        if m.get("role") is not None:
            role_key, content_key = "role", "content"
        elif m.get("from") is not None:
            role_key, content_key = "from", "value"
        else:
            raise RowProblem(where, "has neither 'role' (with 'content') nor 'from' (with 'value')")
        raw_role = m[role_key]
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise RowProblem(
                f"{where}.{role_key}", f"has unknown role {raw_role!r}",
                f"Map it with data.role_map, e.g. {{{raw_role}: assistant}}; known roles: "
                f"{', '.join(sorted(roles))}.",
            )
        content = _content(m.get(content_key), f"{where}.{content_key}")
        msg = {k: v for k, v in m.items()
               if v is not None and k not in ("role", "content", "from", "value")}
        msg["role"], msg["content"] = role, content
        messages.append(msg)
    if spec.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    if not spec.train_on_inputs and not any(m["role"] == "assistant" for m in messages):
        raise RowProblem(name, "has no assistant turn, so nothing in it would be trained")
    return messages


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
        texts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(
                part.get("text"), str
            ):
                texts.append(part["text"])
            else:
                raise RowProblem(where, "has a content part that is not {type: text, text: ...}")
        return "".join(texts)
    if value is None:
        raise RowProblem(where, "is missing (null)")
    raise RowProblem(where, f"must be a string, got {type(value).__name__}")
