"""Config loading: recipes, dotted overrides, clear errors for typos and bad values."""

import subprocess
import sys
from pathlib import Path

import pytest

from jaxtune.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxtune.cli", *args], capture_output=True, text=True, cwd=ROOT
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, TrainConfig)


def test_override_applies_and_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["--optimizer.learning_rate=2e-5"])
    assert cfg.optimizer.learning_rate == pytest.approx(2e-5)
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_space_separated_override():
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["--trainer.steps", "7"])
    assert cfg.trainer.steps == 7


def test_print_config_cli_shows_override():
    out = _cli("print-config", "configs/quickstart.yaml", "--optimizer.learning_rate=2e-5")
    assert out.returncode == 0, out.stderr
    assert "learning_rate: 2.0e-05" in out.stdout


def test_typo_suggests_closest_key_without_traceback():
    out = _cli("print-config", "configs/quickstart.yaml", "--optimizer.learning_rat=2e-5")
    assert out.returncode != 0
    assert "learning_rat" in out.stderr and "learning_rate" in out.stderr
    assert "Traceback" not in out.stderr


def test_wrong_type_names_field_and_type():
    out = _cli("print-config", "configs/quickstart.yaml", "--trainer.steps=ten")
    assert out.returncode != 0
    assert "trainer.steps" in out.stderr and "int" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_yaml_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  stesp: 3\n")
    with pytest.raises(ConfigError, match="trainer.stesp.*trainer.steps"):
        load_config(bad)


def test_unknown_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimiser:\n  name: adamw\n")
    with pytest.raises(ConfigError, match="optimiser.*optimizer"):
        load_config(bad)


@pytest.mark.parametrize(
    "override, match",
    [
        ("--optimizer.name=adamx", "adamw"),
        ("--trainer.grad_accum_steps=3", "grad_accum_steps"),
        ("--lora.rank=0 --lora.quantize_base=int8", "lora.rank"),
        ("--mesh.data=0", "mesh.data"),
        ("--checkpoint.resume=latest", "checkpoint.resume"),
        ("--trainer.steps=-1", "trainer.steps"),
    ],
)
def test_impossible_values_fail_early(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs/quickstart.yaml", override.split())


def test_missing_file_is_clear():
    out = _cli("print-config", "configs/nope.yaml")
    assert out.returncode == 2 and "nope.yaml" in out.stderr


def test_help_lists_subcommands():
    out = _cli("--help")
    for cmd in ("train", "export", "inspect-data", "print-config", "generate", "eval"):
        assert cmd in out.stdout
