"""Formats and loss masks: exactly the assistant / completion / output tokens and their end
token are trained, for every format and chat template; BOS is never doubled; bad rows are
named by file, row and field.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from jaxtune.data.encode import Encoder
from jaxtune.data.errors import BadRowError, RowProblem
from jaxtune.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, FormatSpec
from jaxtune.data.tokenizer import TokenizerInfo, load_tokenizer
from tests.fixtures_data import chat_rows, make_data_config, write_jsonl

END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "generation": "<|im_end|>",
       "thinking": "<|im_end|>"}


def _raise(i, problem):
    raise problem


def encode(tokenizer, rows, **fields):
    spec = FormatSpec(**{"format": "chat", **fields})
    return Encoder(tokenizer, spec).encode_batch(rows, _raise)


def trained_runs(tokens, trained):
    """Contiguous runs of trained token ids."""
    runs, cur = [], []
    for t, m in zip(tokens.tolist(), trained.tolist(), strict=True):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def toks(data_tokenizers):
    return {name: AutoTokenizer.from_pretrained(path) for name, path in data_tokenizers.items()}


# --------------------------------------------------------------------------- chat


@pytest.mark.parametrize("style", ["chatml", "llama3", "generation", "thinking"])
@pytest.mark.parametrize("turns", [1, 3])
@pytest.mark.parametrize("sharegpt", [False, True])
def test_chat_trains_exactly_assistant_turns_and_their_end_token(toks, style, turns, sharegpt):
    tok = toks[style]
    rows = chat_rows(6, seed=turns, turns=turns, system=True, sharegpt=sharegpt)
    field = "conversations" if sharegpt else "messages"
    encoded = encode(tok, rows, messages_field=field)
    for row, (tokens, trained) in zip(rows, encoded, strict=True):
        msgs = row[field]
        key = "value" if sharegpt else "content"
        replies = [m[key] for m in msgs if m.get("role", m.get("from")) in ("assistant", "gpt")]
        expected = [ids(tok, r) + [tok.convert_tokens_to_ids(END[style])] for r in replies]
        if style == "thinking":  # the last turn keeps its empty think block
            expected[-1] = ids(tok, "<think>\n\n</think>\n\n" + replies[-1]) + expected[-1][-1:]
        assert trained_runs(tokens, trained) == expected
        text = tok.decode(tokens.tolist())
        assert text == tok.apply_chat_template(
            [{"role": m.get("role", m.get("from")).replace("gpt", "assistant").replace(
                "human", "user"), "content": m[key]} for m in msgs], tokenize=False)


def test_chat_mask_matches_transformers_generation_markers(toks):
    tok = toks["generation"]
    rows = chat_rows(8, seed=3, turns=3)
    for row, (tokens, trained) in zip(rows, encode(tok, rows), strict=True):
        ref = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert tokens.tolist() == ref["input_ids"]
        assert trained.tolist() == ref["assistant_masks"]


def test_llama3_bos_is_not_doubled(toks):
    tok = toks["llama3"]
    bos = tok.bos_token_id
    assert tok("hi")["input_ids"][0] == bos  # the tokenizer adds BOS to plain text...
    (tokens, _), = encode(tok, chat_rows(1))
    assert tokens[0] == bos and (tokens == bos).sum() == 1  # ...and the template writes one
    (tokens, trained), = encode(tok, [{"text": "<|begin_of_text|>Hello world"}], format="text")
    assert (tokens == bos).sum() == 1
    (tokens, trained), = encode(tok, [{"text": "Hello world"}], format="text")
    assert tokens[0] == bos and (tokens == bos).sum() == 1


def test_system_prompt_is_added_only_when_missing(toks):
    tok = toks["chatml"]
    rows = chat_rows(2, system=False) + chat_rows(1, system=True)
    spec = FormatSpec(format="chat", system_prompt="Be brief.")
    enc = Encoder(tok, spec)
    texts = [enc.render(r).text for r in rows]
    assert texts[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert texts[1].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "Be brief." not in texts[2]


def test_train_on_inputs_trains_everything_but_the_first_token(toks):
    tok = toks["chatml"]
    (tokens, trained), = encode(tok, chat_rows(1, turns=2), train_on_inputs=True)
    assert trained[0] == 0 and trained[1:].all()


def test_role_map_and_unknown_role(toks):
    tok = toks["chatml"]
    row = {"messages": [{"role": "customer", "content": "Hi"},
                        {"role": "agent", "content": "Hello"}]}
    with pytest.raises(RowProblem, match="unknown role 'customer'"):
        encode(tok, [row])
    (tokens, trained), = encode(
        tok, [row], role_map=(("agent", "assistant"), ("customer", "user")))
    assert trained_runs(tokens, trained) == [ids(tok, "Hello") + [tok.eos_token_id]]


# --------------------------------------------------------------------------- plain formats


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_text_trains_every_token_and_eos(toks, style):
    tok = toks[style]
    (tokens, trained), = encode(tok, [{"text": "The quick brown fox."}], format="text")
    body = ids(tok, "The quick brown fox.")
    bos = [tok.bos_token_id] if style == "llama3" else []
    assert tokens.tolist() == bos + body + [tok.eos_token_id]
    assert trained.tolist() == [0] + [1] * (len(tokens) - 1)


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_completion_trains_completion_and_eos(toks, style):
    tok = toks[style]
    row = {"prompt": "Question: how are you?\nAnswer:", "completion": " fine thank you"}
    (tokens, trained), = encode(tok, [row], format="completion")
    bos = [tok.bos_token_id] if style == "llama3" else []
    assert tokens.tolist() == bos + ids(tok, row["prompt"] + row["completion"]) + [
        tok.eos_token_id]
    assert trained_runs(tokens, trained) == [ids(tok, " fine thank you") + [tok.eos_token_id]]


@pytest.mark.parametrize("with_input", [False, True])
def test_alpaca_classic_trains_output_and_eos(toks, with_input):
    tok = toks["chatml"]
    row = {"instruction": "Name a colour.", "input": "sky" if with_input else "",
           "output": "Blue is good."}
    (tokens, trained), = encode(tok, [row], format="alpaca", alpaca_prompt="classic")
    template = ALPACA_PROMPT_WITH_INPUT if with_input else ALPACA_PROMPT
    prompt = template.format(instruction=row["instruction"], input=row["input"])
    assert tok.decode(tokens.tolist()) == prompt + row["output"] + "<|im_end|>"
    assert trained_runs(tokens, trained) == [ids(tok, "Blue is good.") + [tok.eos_token_id]]


@pytest.mark.parametrize("style", ["chatml", "llama3", "generation"])
def test_alpaca_with_chat_template_trains_output_and_end_of_turn(toks, style):
    tok = toks[style]
    row = {"instruction": "Name a colour.", "input": "sky", "output": "Blue is good."}
    (tokens, trained), = encode(tok, [row], format="alpaca", system_prompt="Be kind.")
    text = tok.decode(tokens.tolist())
    assert "Name a colour.\n\nsky" in text and "Be kind." in text
    end = tok.convert_tokens_to_ids(END[style])
    assert trained_runs(tokens, trained) == [ids(tok, "Blue is good.") + [end]]


def test_pad_is_never_eos(toks):
    for tok in toks.values():
        info = TokenizerInfo.of(tok)
        assert info.pad_id != tok.eos_token_id


# --------------------------------------------------------------------------- bad rows


BAD_ROWS = [
    ("chat", {"other": [{"role": "user", "content": "hi"}]}, "messages", "is missing"),
    ("chat", {"messages": []}, "messages", "empty conversation"),
    ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     "messages[1].role", "unknown role 'bot'"),
    ("chat", {"messages": [{"role": "user", "content": "a"}]}, "messages", "no assistant turn"),
    ("text", {"text": ""}, "text", "is empty"),
    ("completion", {"prompt": "a"}, "completion", "is missing"),
    ("alpaca", {"instruction": "a", "output": None}, "output", "is missing"),
]


@pytest.mark.parametrize("fmt,bad,field,problem", BAD_ROWS)
def test_bad_row_names_file_row_and_field(tmp_path, data_tokenizers, fmt, bad, field, problem):
    from jaxtune.data.prepare import prepare

    good = {"chat": chat_rows(1)[0], "text": {"text": "Good text."},
            "completion": {"prompt": "a", "completion": "b"},
            "alpaca": {"instruction": "a", "output": "b"}}[fmt]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [path], format=fmt)
    tok = load_tokenizer(cfg)
    with pytest.raises(BadRowError) as e:
        prepare(cfg, tok)
    msg = str(e.value)
    assert "bad.jsonl, row 2" in msg and f"field '{field}'" in msg and problem in msg, msg
    cfg.data.on_bad_row = "skip"
    data = prepare(cfg, tok)
    assert data.stats["skipped_bad_rows"] == 1 and data.stats["examples"] == 3
    assert sorted(data.docs.row.tolist()) == [0, 1, 3]


def test_wrong_type_is_named(tmp_path, data_tokenizers):
    from jaxtune.data.prepare import prepare

    path = write_jsonl(tmp_path / "typed.jsonl", [{"text": 5}, {"text": 7}])
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [path], format="text")
    with pytest.raises(BadRowError, match=r"typed.jsonl, row 0: field 'text' must be a string"):
        prepare(cfg, load_tokenizer(cfg))


# --------------------------------------------------------------------------- templates


def test_named_file_and_inline_template_overrides(tmp_path, data_tokenizers):
    from jaxtune.data.errors import DataError
    from jaxtune.data.tokenizer import NAMED_TEMPLATES

    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(1))
    cfg = make_data_config(tmp_path, data_tokenizers["llama3"], [path], chat_template="chatml")
    assert load_tokenizer(cfg).chat_template == NAMED_TEMPLATES["chatml"]
    cfg.data.chat_template = "gemma"  # the fixture vocabulary has no <start_of_turn>
    with pytest.raises(DataError, match="start_of_turn"):
        load_tokenizer(cfg)
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}")
    cfg.data.chat_template = str(jinja)
    assert load_tokenizer(cfg).chat_template == jinja.read_text()
    cfg.data.chat_template = "no-such-template"
    with pytest.raises(DataError, match="not a built-in template"):
        load_tokenizer(cfg)


def test_turn_without_end_token_is_counted_and_warned(tmp_path, data_tokenizers, caplog):
    from jaxtune.data.prepare import prepare

    plain = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(3, turns=1, system=False))
    cfg = make_data_config(tmp_path, data_tokenizers["chatml"], [path], chat_template=plain)
    with caplog.at_level("WARNING"):
        data = prepare(cfg, load_tokenizer(cfg))
    assert data.stats["turns_without_end"] == 3
    assert "no end-of-turn special token" in caplog.text


def test_chat_without_any_template_is_a_config_error(data_tokenizers):
    from jaxtune.data.errors import DataError

    tok = AutoTokenizer.from_pretrained(data_tokenizers["chatml"])
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        Encoder(tok, FormatSpec(format="chat"))
    with pytest.raises(DataError, match="alpaca_prompt: classic"):
        Encoder(tok, FormatSpec(format="alpaca", alpaca_prompt="chat"))
    (tokens, trained), = encode(tok, [{"instruction": "a", "output": "b"}], format="alpaca")
    assert "### Response:" in tok.decode(tokens.tolist())  # auto falls back to classic


def test_template_without_generation_prompt_does_not_train_the_header(toks):
    tok = AutoTokenizer.from_pretrained(toks["chatml"].name_or_path)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}")
    rows = chat_rows(4, turns=3)
    for row, (tokens, trained) in zip(rows, encode(tok, rows), strict=True):
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert trained_runs(tokens, trained) == [ids(tok, r) + [tok.eos_token_id]
                                                 for r in replies]
