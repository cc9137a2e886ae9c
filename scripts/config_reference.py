"""Generate the config reference (README section) from the dataclasses in jaxtune/config.py.

    python scripts/config_reference.py          # print the Markdown
    python scripts/config_reference.py --write  # replace the section in README.md

Each field's one-line comment in config.py is its description, so the reference cannot drift
from the code; tests/test_docs.py checks that README.md holds exactly what this prints.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import tokenize
import typing
from pathlib import Path

from jaxtune import config

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the trailing comment on the field's line."""
    source = Path(config.__file__).read_text()
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    out[(node.name, item.target.id)] = comments.get(item.lineno, "")
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    return f"`{value!r}`" if value != "" else "`''`"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if not typing.get_args(tp) else str(tp).replace(
        "typing.", "")


def reference() -> str:
    comments = _field_comments()
    lines = [BEGIN, ""]
    top = typing.get_type_hints(config.TrainConfig)
    for section in dataclasses.fields(config.TrainConfig):
        cls = top[section.name]
        hints = typing.get_type_hints(cls)
        lines += [f"**`{section.name}`** ({cls.__name__})", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            sub = hints[f.name]
            if dataclasses.is_dataclass(sub):  # a nested section: one row per field
                sub_hints = typing.get_type_hints(sub)
                for g in dataclasses.fields(sub):
                    desc = comments.get((sub.__name__, g.name), "").replace("|", "\\|")
                    lines.append(f"| `{section.name}.{f.name}.{g.name}` | "
                                 f"{_type_name(sub_hints[g.name])} | {_default(g)} | {desc} |")
                continue
            desc = comments.get((cls.__name__, f.name), "").replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | {_type_name(hints[f.name])} | "
                         f"{_default(f)} | {desc} |")
        lines.append("")
    source_cls = config.DataSourceConfig
    lines += ["Each entry of `data.sources` / `data.eval_sources`:", "",
              "| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(source_cls)
    for f in dataclasses.fields(source_cls):
        desc = comments.get((source_cls.__name__, f.name), "")
        lines.append(f"| `{f.name}` | {_type_name(hints[f.name])} | {_default(f)} | {desc} |")
    lines += ["", END]
    return "\n".join(lines)


def readme_section(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    ref = reference()
    if not args.write:
        print(ref)
        return
    readme = ROOT / "README.md"
    text = readme.read_text()
    readme.write_text(text.replace(readme_section(text), ref))


if __name__ == "__main__":
    main()
