"""The docs cannot drift: README's config reference, its links, its recipe table, and its
Python example."""

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


def readme_recipes() -> list[str]:
    """The recipe files the README's "Recipes" table names (first column), in order."""
    section = README.split("\n## Recipes", 1)[1].split("\n## ", 1)[0]
    cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("|")]
    # `x.yaml`, [`x.yaml`](configs/x.yaml) or configs/x.yaml: the file's name
    return [m.group(1).rsplit("/", 1)[-1] for cell in cells
            if (m := re.search(r"([\w./-]+\.ya?ml)", cell))]


def test_readme_recipe_table_lists_every_recipe():
    """Every file in configs/ has its row (a new recipe needs one), and every row a file."""
    named = readme_recipes()
    files = sorted(p.name for p in (ROOT / "configs").iterdir() if p.suffix in (".yaml", ".yml"))
    missing = [f for f in files if f not in named]
    assert not missing, f"README's recipe table lacks {missing}: add a row for each."
    assert not [n for n in named if n not in files], "README's recipe table names missing files"
    assert len(named) == len(set(named)), "README's recipe table names a recipe twice"


def test_readme_python_example_runs(smollm2_dir, monkeypatch):
    """The README's Python block, run as written (it loads the quickstart's fixture)."""
    block = re.findall(r"```python\n(.*?)\n```", README, re.S)
    assert len(block) == 1
    code = block[0].replace("~/.cache/jaxtune/smollm2-135m-instruct", str(smollm2_dir))
    exec(compile(code, "README.md", "exec"), {})
