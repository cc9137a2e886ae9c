"""Every recipe in configs/ runs two steps as a shrunk copy on 8 fake devices.

Same structure (model family and RoPE type, LoRA settings, dtypes, scan/remat, mesh axes,
accumulation, checkpoint and export settings), tiny dimensions: a random tiny model of the
same family, a tiny chat (preference, or RL prompt) dataset, seq 32 (RL: 128; on-policy
distillation: 64), a tiny teacher of another family for distillation, and mesh axes cut down
to fit 8 devices.
"""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from jaxtune.config import config_from_dict, config_to_dict, load_config
from jaxtune.trainer import train
from tests.fixtures_data import chat_rows, write_jsonl
from tests.fixtures_gemma4 import GEMMA4_VARIANTS, make_gemma4_model
from tests.fixtures_preference import preference_rows

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def _tiny_variant(model_path: str) -> str:
    return "qwen2" if "qwen" in model_path.lower() else "llama_llama3"


def _safetensors_headers(folder: Path) -> dict[str, dict]:
    """key -> {dtype, shape} of every tensor in the folder's safetensors files (no data read)."""
    out: dict[str, dict] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        header.pop("__metadata__", None)
        assert not set(header) & set(out), file
        out.update(header)
    return out


_DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _assert_exported(cfg, model_dir: Path) -> None:
    """What the run's export must hold: merged/full weights with every tensor of the original
    model (same keys and shapes, the export dtype), config, generation config and tokenizer;
    for LoRA adapters, a PEFT adapter_config.json of the run's rank and its lora_A/B tensors."""
    from jaxtune.export.lora_export import adapter_dir_for

    out = Path(cfg.export.out_dir)
    lora = cfg.lora.rank > 0
    mode = cfg.export.lora if lora else "merged"
    if mode in ("merged", "both"):
        for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
            assert (out / name).is_file(), (out, name, sorted(p.name for p in out.iterdir()))
        assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
        got, want = _safetensors_headers(out), _safetensors_headers(model_dir)
        assert {k: v["shape"] for k, v in got.items()} == \
            {k: v["shape"] for k, v in want.items()}
        if cfg.export.dtype in _DTYPE_CODES:
            assert {v["dtype"] for v in got.values()} == {_DTYPE_CODES[cfg.export.dtype]}
        written = json.loads((out / "config.json").read_text())
        assert written["model_type"] == json.loads((model_dir / "config.json").read_text())[
            "model_type"]
    if lora and mode in ("adapter", "both"):
        adapter = adapter_dir_for(out, mode)
        peft = json.loads((adapter / "adapter_config.json").read_text())
        assert peft["peft_type"] == "LORA" and peft["r"] == cfg.lora.rank
        keys = _safetensors_headers(adapter)
        assert list(adapter.glob("adapter_model.safetensors"))
        assert any(k.endswith("lora_A.weight") for k in keys)
        assert any(k.endswith("lora_B.weight") for k in keys)


def _shrink_mesh(mesh: dict) -> dict:
    tensor = min(mesh["tensor"], 2)
    fsdp = mesh["fsdp"] if mesh["fsdp"] in (-1, 1) else min(mesh["fsdp"], 8 // tensor)
    data = 1 if fsdp == -1 else -1
    return {**mesh, "data": data, "fsdp": fsdp, "tensor": tensor, "dcn_data": 1}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shrunk_recipe_runs_two_steps(recipe, tmp_path, tiny_hf_model, data_tokenizers,
                                      tiny_gemma_model, gemma_tokenizer, gemma4_model,
                                      gemma4_tokenizer):
    raw = config_to_dict(load_config(recipe))
    if raw["data"]["format"] == "preference":  # pairs, not chats
        rows = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(24, seed=4))
    elif raw["data"]["format"] == "prompt":  # RL prompts, with the columns rewards read
        rows = write_jsonl(tmp_path / "prompts.jsonl", [
            {"prompt": c["messages"][:-1], "question": c["messages"][-2]["content"],
             "answer": "#### 3", "key_facts": ["the"]}
            for c in chat_rows(24, seed=4, turns=1)])
        raw["rl"].update(max_completion_length=8, eval_max_completion_length=0)
        for reward in raw["rl"]["rewards"]:  # DAPO's overlong buffer within the new length
            if reward["function"] == "overlong":
                reward["options"]["buffer"] = 4
    else:
        rows = write_jsonl(tmp_path / "chats.jsonl", chat_rows(24, seed=4))
    accum = min(raw["trainer"]["grad_accum_steps"], 2)
    raw["run"]["output_dir"] = str(tmp_path / "run")
    path = raw["model"]["path"].lower()
    if "a4b" in path:  # Gemma 4's MoE block, 8 experts: the recipe's expert axis splits them
        tiny = make_gemma4_model(tmp_path / "gemma4_moe",
                                 **{**GEMMA4_VARIANTS["moe"], "num_experts": 8})
        raw["model"].update(path=str(tiny), tokenizer=gemma4_tokenizer)
    elif "gemma-4" in path:  # Gemma 4 with keys as values on its full layers
        raw["model"].update(path=str(gemma4_model("k_eq_v")), tokenizer=gemma4_tokenizer)
    elif "gemma" in path:  # its own family and chat template
        raw["model"].update(path=str(tiny_gemma_model("gemma3")), tokenizer=gemma_tokenizer)
    else:
        raw["model"].update(path=str(tiny_hf_model(_tiny_variant(raw["model"]["path"]))),
                            tokenizer=data_tokenizers["chatml"])
    if raw["model"]["attention"] == "cudnn":  # a GPU recipe: CPU test devices take XLA's kernel
        raw["model"]["attention"] = "auto"
    generates = raw["trainer"]["objective"] == "distill" and (
        raw["distill"]["lmbda"] > 0 or raw["distill"]["seq_kd"])
    if raw["trainer"]["objective"] == "distill":  # a tiny teacher with the student's vocabulary
        raw["distill"].update(teacher=str(tiny_hf_model("qwen2")), max_new_tokens=8)
    raw["data"].update(sources=[{"path": rows}], eval_sources=[{"path": rows}],
                       seq_len=128 if raw["data"]["format"] == "prompt" else
                       64 if generates else 32, cache_dir=str(tmp_path / "cache"))
    raw["trainer"].update(steps=2, global_batch_size=8 * accum, grad_accum_steps=accum,
                          eval_every=0, eval_batches=1, progress=False)
    raw["mesh"] = _shrink_mesh(raw["mesh"])
    raw["checkpoint"].update(dir="", save_every=1)
    raw["export"]["out_dir"] = str(tmp_path / "hf")
    raw["distributed"]["initialize"] = "off"
    cfg = config_from_dict(raw)
    result = train(cfg)
    assert result.steps == 2 and len(result.history) == 2
    if cfg.trainer.objective == "grpo":  # a policy-gradient loss has no sign
        assert all(np.isfinite(h["loss"]) and "reward" in h for h in result.history)
    else:
        assert all(h["loss"] > 0 for h in result.history)
    if cfg.export.enabled:
        _assert_exported(cfg, Path(raw["model"]["path"]))
