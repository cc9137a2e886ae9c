"""Chat loss masks on the templates of real model families (tests/fixtures_chat_templates.py),
with replies that repeat text from the prompt: exactly each assistant reply and its
end-of-turn token are trained, checked against transformers' ``{% generation %}`` masks and
against the replies written out; a template whose replies cannot be located unambiguously
stops the row with an error naming the message and the template.
"""

from __future__ import annotations

import pytest

from jaxtune.data.encode import Encoder
from jaxtune.data.errors import BadRowError, DataError, RowProblem
from jaxtune.data.formats import FormatSpec
from tests.fixtures_chat_templates import CHAT_TEMPLATES
from tests.fixtures_data import chat_rows, make_data_config, write_jsonl

SENTIMENT = "Label the sentiment, positive or negative: "

# (system prompt or None, [(user, reply), ...]): replies that also appear in the prompt.
CONVERSATIONS = {
    "sentiment": ("You label sentiment as positive or negative.", [
        (SENTIMENT + "I loved this film.", "positive"),
        (SENTIMENT + "The plot was dull.", "negative"),
        (SENTIMENT + "Great acting, positive vibes.", "positive"),
    ]),
    "echo": ("Repeat the user's words exactly.", [
        ("Please repeat exactly: I am ready.", "I am ready."),
        ("Please repeat exactly: Yes", "Yes"),
    ]),
    "short": (None, [
        ("Answer Yes or No: is the sky blue?", "Yes"),
        ("Pick A or B. A is red, B is blue. Which is red?", "A"),
        ("What is 12 + 333? It is not 12.", "345"),
        ("Say 12.", "12"),
    ]),
    "system_echo": ("Always answer: I am ready. Answer Yes or No.", [
        ("Are you ready?", "I am ready."),
        ("Yes or No?", "Yes"),
    ]),
    "whitespace": (None, [
        ("Reply with a leading space: hello", " hello"),
        ("Reply on a new line: Yes", "\n\nYes"),
        ("Reply with trailing spaces: No", "No  "),
    ]),
    "template_words": ("You are the assistant model of this system.", [
        ("Say the word assistant.", "assistant"),
        ("Say the word model.", "model"),
        ("Say the word user.", "user"),
    ]),
    "empty": (None, [
        ("Say nothing.", ""),
        ("Now say Yes.", "Yes"),
    ]),
    "thinking": (None, [
        (SENTIMENT + "I loved it.",
         "<think>\npositive or negative? positive\n</think>\n\npositive"),
        (SENTIMENT + "Dull.", "<think>\nThe user wrote negative words.\n</think>\n\nnegative"),
    ]),
}


def messages(name: str, system_ok: bool = True) -> list[dict]:
    system, turns = CONVERSATIONS[name]
    out = [{"role": "system", "content": system}] if system and system_ok else []
    for user, reply in turns:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return out


def rows_for(style: str) -> list[list[dict]]:
    system_ok = CHAT_TEMPLATES[style].system
    rows = [messages(name, system_ok) for name in CONVERSATIONS]
    reasoning = messages("sentiment", system_ok)  # Qwen3 reads reasoning_content if present
    reasoning[-1] = {**reasoning[-1], "reasoning_content": "The user says positive vibes."}
    rows.append(reasoning)
    rows += [r["messages"] for r in chat_rows(12, seed=7, turns=3, system=system_ok)]
    return rows


def encode(tok, convs, **fields):
    def fail(i, problem):
        raise problem

    spec = FormatSpec(format="chat", **fields)
    return Encoder(tok, spec).encode_batch([{"messages": m} for m in convs], fail)


def trained_runs(tokens, trained) -> list[list[int]]:
    runs, cur = [], []
    for t, m in zip(list(tokens), list(trained), strict=True):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def reference(tok, style: str, conv: list[dict]):
    """Token ids and the mask transformers derives from the template's generation markers."""
    ref = tok.apply_chat_template(conv, chat_template=CHAT_TEMPLATES[style].marked, tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    return ref["input_ids"], ref["assistant_masks"]


@pytest.mark.parametrize("style", list(CHAT_TEMPLATES))
def test_generation_twin_renders_the_same_text(chat_template_tokenizers, style):
    tok = chat_template_tokenizers[style]
    for conv in rows_for(style):
        assert tok.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(
            conv, tokenize=False, chat_template=CHAT_TEMPLATES[style].marked)


@pytest.mark.parametrize("style", list(CHAT_TEMPLATES))
def test_mask_is_exactly_each_reply_and_its_end_token(chat_template_tokenizers, style):
    tok = chat_template_tokenizers[style]
    end = CHAT_TEMPLATES[style].end
    convs = rows_for(style)
    for conv, (tokens, trained) in zip(convs, encode(tok, convs), strict=True):
        ids, mask = reference(tok, style, conv)
        assert tokens.tolist() == ids
        assert trained.tolist() == mask, (style, conv)
        runs = trained_runs(tokens, trained)
        assert len(runs) == sum(m["role"] == "assistant" for m in conv)
        assert all(tok.decode(r).endswith(end) for r in runs)


@pytest.mark.parametrize("style", ["qwen3", "llama3", "llama31", "zephyr", "phi3"])
def test_chat_that_opens_with_the_assistant(chat_template_tokenizers, style):
    tok = chat_template_tokenizers[style]
    conv = [{"role": "assistant", "content": "Hello, user."},
            {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello"}]
    (tokens, trained), = encode(tok, [conv])
    assert trained.tolist()[1:] == reference(tok, style, conv)[1][1:]  # (token 0 never trains)


def assert_runs(tok, tokens, trained, expected: list[str], space_before: bool = False):
    """Trained runs decode to ``expected``; where the template writes a space before the
    reply (Mistral v0.3), that space may ride in the reply's first token."""
    decoded = [tok.decode(r) for r in trained_runs(tokens, trained)]
    if space_before:
        decoded = [d[1:] if d.startswith(" ") and not e.startswith(" ") else d
                   for d, e in zip(decoded, expected, strict=True)]
    assert decoded == expected


def test_qwen3_earlier_turns_train_only_the_reply(chat_template_tokenizers):
    tok = chat_template_tokenizers["qwen3"]
    (tokens, trained), = encode(tok, [messages("sentiment")])
    assert_runs(tok, tokens, trained, [
        "positive<|im_end|>", "negative<|im_end|>", "<think>\n\n</think>\n\npositive<|im_end|>"])
    (tokens, trained), = encode(tok, [messages("thinking")])
    # earlier turns lose their think block (the template drops it); the last keeps it
    assert_runs(tok, tokens, trained, [
        "positive<|im_end|>",
        "<think>\nThe user wrote negative words.\n</think>\n\nnegative<|im_end|>"])


@pytest.mark.parametrize("style", ["mistral_v3", "mistral_v3_last_user"])
def test_mistral_v3_moved_system_prompt_is_never_trained(chat_template_tokenizers, style):
    tok = chat_template_tokenizers[style]
    for name, replies in [("echo", ["I am ready.", "Yes"]),
                          ("system_echo", ["I am ready.", "Yes"])]:
        (tokens, trained), = encode(tok, [messages(name)])
        assert_runs(tok, tokens, trained, [r + "</s>" for r in replies], space_before=True)


def test_mistral_v1_keeps_leading_whitespace_of_replies(chat_template_tokenizers):
    tok = chat_template_tokenizers["mistral_v1"]
    (tokens, trained), = encode(tok, [messages("whitespace", system_ok=False)])
    assert_runs(tok, tokens, trained, [" hello</s>", "\n\nYes</s>", "No  </s>"])


@pytest.mark.parametrize("style,expected", [
    ("llama3", ["Yes<|eot_id|>", "A<|eot_id|>", "345<|eot_id|>", "12<|eot_id|>"]),
    ("llama31", ["Yes<|eot_id|>", "A<|eot_id|>", "345<|eot_id|>", "12<|eot_id|>"]),
    ("gemma", ["Yes<end_of_turn>", "A<end_of_turn>", "345<end_of_turn>", "12<end_of_turn>"]),
    ("gemma4", ["Yes<turn|>", "A<turn|>", "345<turn|>", "12<turn|>"]),
    ("zephyr", ["Yes</s>", "A</s>", "345</s>", "12</s>"]),
])
def test_short_answers_that_appear_in_the_prompt(chat_template_tokenizers, style, expected):
    tok = chat_template_tokenizers[style]
    (tokens, trained), = encode(tok, [messages("short")])
    assert_runs(tok, tokens, trained, expected)
    (tokens, trained), = encode(tok, [messages("template_words")])
    end = CHAT_TEMPLATES[style].end
    assert_runs(tok, tokens, trained, [w + end for w in ("assistant", "model", "user")])


# --------------------------------------------------------------------------- refused rows

CHATML_TURNS = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + CONTENT "
                "+ '<|im_end|>\\n' }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
AMBIGUOUS = {
    # the last reply is written twice: in its turn and in a footer
    "footer": CHATML_TURNS.replace("CONTENT", "m['content']")
    + "{%- if messages[-1]['role'] == 'assistant' and not add_generation_prompt %}"
      "{{- 'Final answer: ' + messages[-1]['content'] }}{%- endif %}",
    # the reply is rewritten, so what is trained cannot be checked against it
    "upper": CHATML_TURNS.replace(
        "CONTENT", "(m['content'] | upper if m['role'] == 'assistant' else m['content'])"),
    # earlier turns close with more text than the last one does
    "other_close": CHATML_TURNS.replace(
        "CONTENT", "m['content'] + ('' if loop.last else ' (continued)')"),
}


@pytest.mark.parametrize("name", list(AMBIGUOUS))
def test_ambiguous_template_stops_with_an_error(chat_template_tokenizers, name):
    tok = chat_template_tokenizers["qwen3"]
    tok = type(tok)(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    tok.chat_template = AMBIGUOUS[name]
    with pytest.raises(RowProblem) as e:
        encode(tok, [messages("sentiment")])
    msg = str(e.value) + " " + e.value.problem
    assert e.value.field.startswith("messages[") and e.value.field.endswith("].content")
    assert "chat template" in msg and "sha256" in msg and "cannot be located" in msg, msg


def test_earlier_turns_may_end_with_another_end_token(chat_template_tokenizers):
    tok = chat_template_tokenizers["qwen3"]
    tok = type(tok)(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    tok.chat_template = CHATML_TURNS.replace("CONTENT", "m['content']").replace(
        "'<|im_end|>\\n'", "('<|im_end|>\\n' if loop.last else '<|endoftext|>\\n')")
    (tokens, trained), = encode(tok, [messages("sentiment")])  # (GPT-OSS: <|end|>, <|return|>)
    assert_runs(tok, tokens, trained, [
        "positive<|endoftext|>", "negative<|endoftext|>", "positive<|im_end|>"])


def test_refused_row_names_file_row_field_and_template(tmp_path, data_tokenizers):
    from jaxtune.data.prepare import prepare
    from jaxtune.data.tokenizer import load_tokenizer

    good = {"messages": messages("short")[4:6]}  # "345" reads the same upper-cased
    bad = {"messages": messages("sentiment")}
    path = write_jsonl(tmp_path / "chats.jsonl", [good, bad, good])
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [path],
                           chat_template=AMBIGUOUS["upper"])
    tok = load_tokenizer(cfg)
    with pytest.raises(BadRowError) as e:
        prepare(cfg, tok)
    msg = str(e.value)
    assert "chats.jsonl, row 1" in msg and "field 'messages[2].content'" in msg, msg
    assert "chat template of" in msg and "data.chat_template" in msg, msg
    cfg.data.on_bad_row = "skip"
    assert prepare(cfg, tok).stats["skipped_bad_rows"] == 1


def test_refused_reply_is_named_by_the_rows_own_field(chat_template_tokenizers):
    tok = chat_template_tokenizers["qwen3"]
    tok = type(tok)(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    tok.chat_template = AMBIGUOUS["upper"]
    chat = {"conversations": [{"from": "human", "value": "Label it: good"},
                              {"from": "gpt", "value": "positive"}]}
    spec = FormatSpec(format="chat", messages_field="conversations", system_prompt="Be brief.")
    with pytest.raises(RowProblem) as e:  # data.system_prompt went first: the row's index
        Encoder(tok, spec).render(chat)
    assert e.value.field == "conversations[1].value"
    alpaca = {"instruction": "Label it: good", "output": "positive"}
    with pytest.raises(RowProblem) as e:
        Encoder(tok, FormatSpec(format="alpaca", system_prompt="Be brief.")).render(alpaca)
    assert e.value.field == "output"


def test_built_in_gemma_template_is_gemmas_own(chat_template_tokenizers):
    # data.chat_template: gemma must render what Gemma was trained on: no "system" turn (Gemma
    # has none), the system prompt folded into the first user turn.
    from jaxtune.data.tokenizer import NAMED_TEMPLATES

    tok = chat_template_tokenizers["gemma"]
    convs = rows_for("gemma")
    assert any(conv[0]["role"] == "system" for conv in convs)
    for conv in convs:
        ours = tok.apply_chat_template(conv, tokenize=False,
                                       chat_template=NAMED_TEMPLATES["gemma"])
        assert ours == tok.apply_chat_template(conv, tokenize=False)
        assert "<start_of_turn>system" not in ours


def test_built_in_gemma4_template_is_gemma4s_own_and_ends_turns_with_a_stop_token(
        chat_template_tokenizers):
    # data.chat_template: gemma4 renders what Gemma 4 was trained on (a system turn of its
    # own, <|turn>model for the assistant); its end of turn <turn|> is trained (above) and a
    # stop id of generation and of the export's generation_config.
    from jaxtune.data.tokenizer import NAMED_TEMPLATES, resolve_chat_template
    from jaxtune.export.hf_folder import end_of_turn_token, stop_token_ids

    tok = chat_template_tokenizers["gemma4"]
    convs = rows_for("gemma4")
    assert any(conv[0]["role"] == "system" for conv in convs)
    for conv in convs:
        ours = tok.apply_chat_template(conv, tokenize=False,
                                       chat_template=NAMED_TEMPLATES["gemma4"])
        assert ours == tok.apply_chat_template(conv, tokenize=False)
    assert tok.apply_chat_template(
        [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True, chat_template=NAMED_TEMPLATES["gemma4"]
    ) == "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    assert end_of_turn_token(tok) == "<turn|>"
    assert tok.convert_tokens_to_ids("<turn|>") in stop_token_ids(tok)
    with pytest.raises(DataError, match=r"<turn\|>"):
        resolve_chat_template("gemma4", chat_template_tokenizers["gemma"])
