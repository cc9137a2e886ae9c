"""Every recipe in configs/ runs two steps as a shrunk copy on 8 fake devices.

Same structure (model family and RoPE type, LoRA settings, dtypes, scan/remat, mesh axes,
accumulation, checkpoint and export settings), tiny dimensions: a random tiny model of the
same family, a tiny chat dataset, seq 32, and mesh axes cut down to fit 8 devices.
"""

from pathlib import Path

import pytest

from jaxtune.config import config_from_dict, config_to_dict, load_config
from jaxtune.trainer import train
from tests.fixtures_data import chat_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def _tiny_variant(model_path: str) -> str:
    return "qwen2" if "qwen" in model_path.lower() else "llama_llama3"


def _shrink_mesh(mesh: dict) -> dict:
    tensor = min(mesh["tensor"], 2)
    fsdp = mesh["fsdp"] if mesh["fsdp"] in (-1, 1) else min(mesh["fsdp"], 8 // tensor)
    data = 1 if fsdp == -1 else -1
    return {**mesh, "data": data, "fsdp": fsdp, "tensor": tensor, "dcn_data": 1}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shrunk_recipe_runs_two_steps(recipe, tmp_path, tiny_hf_model, data_tokenizers):
    raw = config_to_dict(load_config(recipe))
    rows = write_jsonl(tmp_path / "chats.jsonl", chat_rows(24, seed=4))
    accum = min(raw["trainer"]["grad_accum_steps"], 2)
    raw["run"]["output_dir"] = str(tmp_path / "run")
    raw["model"].update(path=str(tiny_hf_model(_tiny_variant(raw["model"]["path"]))),
                        tokenizer=data_tokenizers["chatml"])
    if raw["model"]["attention"] == "cudnn":  # a GPU recipe: CPU test devices take XLA's kernel
        raw["model"]["attention"] = "auto"
    raw["data"].update(sources=[{"path": rows}], eval_sources=[{"path": rows}], seq_len=32,
                       cache_dir=str(tmp_path / "cache"))
    raw["trainer"].update(steps=2, global_batch_size=8 * accum, grad_accum_steps=accum,
                          eval_every=0, eval_batches=1, progress=False)
    raw["mesh"] = _shrink_mesh(raw["mesh"])
    raw["checkpoint"].update(dir="", save_every=1)
    raw["export"]["out_dir"] = str(tmp_path / "hf")
    raw["distributed"]["initialize"] = "off"
    cfg = config_from_dict(raw)
    result = train(cfg)
    assert result.steps == 2 and len(result.history) == 2
    assert all(h["loss"] > 0 for h in result.history)
    if cfg.export.enabled:
        assert (tmp_path / "hf" / "config.json").is_file() or any((tmp_path).glob("hf*"))
