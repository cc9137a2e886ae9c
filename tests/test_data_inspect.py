"""``jaxtune inspect-data``: trained tokens marked, totals printed, errors without traceback."""

from __future__ import annotations

import yaml

from jaxtune.cli import main
from jaxtune.data.inspect import inspect_data
from tests.fixtures_data import chat_rows, make_data_config, write_jsonl


def _config(tmp_path, tok_dir, rows, **data):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = {"model": {"tokenizer": tok_dir},
           "data": {"sources": [{"path": path}], "seq_len": 96,
                    "cache_dir": str(tmp_path / "cache"), **data}}
    out = tmp_path / "c.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return str(out)


def test_cli_marks_trained_tokens_and_prints_totals(tmp_path, data_tokenizers, capsys):
    rows = [{"messages": [{"role": "user", "content": "Hi there"},
                          {"role": "assistant", "content": "Hello you"}]}]
    rows += chat_rows(5) + [{"messages": []}]
    cfg = _config(tmp_path, data_tokenizers["chatml"], rows, on_bad_row="skip")
    assert main(["inspect-data", cfg, "-n", "2", "--no-color"]) == 0
    out = capsys.readouterr().out
    marked = ("<|im_start|>user\nHi there<|im_end|>\n"
              "<|im_start|>assistant\n[[Hello you<|im_end|>]]\n")
    assert marked in out
    assert out.count("--- example") == 2
    for line in ("examples            6 (of 7 rows read)", "skipped bad rows    1",
                 "packing efficiency", "trained tokens", "truncated", "dropped"):
        assert line in out
    assert "row 6: field 'messages' is an empty conversation" in out


def test_color_marks_with_ansi(tmp_path, data_tokenizers, capsys):
    cfg = make_data_config(tmp_path, data_tokenizers["llama3"],
                           [write_jsonl(tmp_path / "d.jsonl", chat_rows(2))])
    stats = inspect_data(cfg, n=1, color=True)
    out = capsys.readouterr().out
    assert "\033[1;32m" in out and "[[" not in out
    assert stats["examples"] == 2 and stats["trained_tokens"] > 0


def test_bad_row_error_without_traceback(tmp_path, data_tokenizers, capsys):
    cfg = _config(tmp_path, data_tokenizers["chatml"], chat_rows(2) + [{"messages": []}])
    assert main(["inspect-data", cfg]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "d.jsonl, row 2: field 'messages'" in err
    assert "Traceback" not in err
