"""The docs cannot drift: README's config reference, its links, and its Python example."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_config_reference_matches_dataclasses():
    from scripts.config_reference import readme_section, reference

    assert readme_section(README) == reference(), (
        "README config reference is stale: run python scripts/config_reference.py --write")


def test_relative_links_exist():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_readme_has_exactly_two_setup_commands():
    section = README.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"```bash\n(.*?)\n```", section, re.S) == [
        "bash scripts/quickstart.sh", "bash scripts/test.sh"]


def test_readme_python_example_runs(smollm2_dir, monkeypatch):
    """The README's Python block, run as written (it loads the quickstart's fixture)."""
    block = re.findall(r"```python\n(.*?)\n```", README, re.S)
    assert len(block) == 1
    code = block[0].replace("~/.cache/jaxtune/smollm2-135m-instruct", str(smollm2_dir))
    exec(compile(code, "README.md", "exec"), {})
