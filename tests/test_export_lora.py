"""LoRA exports: merged weights equal the adapter-applied model in transformers, and the PEFT
adapter loaded with ``peft`` on the base equals it too.

References: jaxtune's adapter-applied (unmerged) model and ``peft.PeftModel`` on the original
HF base; for key names, the adapter folder PEFT itself writes for the same config.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxtune import lora
from jaxtune.checkpoint import Checkpointer
from jaxtune.cli import main as cli_main
from jaxtune.config import LoraConfig, config_from_dict, save_config
from jaxtune.export import ExportError, export_run, save_pretrained
from jaxtune.models.build import single_device_mesh
from jaxtune.train_state import create_train_state
from jaxtune.weights import from_pretrained
from tests.fixtures_data import chat_rows, write_jsonl
from tests.fixtures_models import hf_logits
from tests.test_export import checkpoint_run

VOCAB = 389
IDS = np.random.default_rng(3).integers(0, VOCAB, (2, 17))


def peft_logits(base_dir: Path, adapter_dir: Path, ids=IDS) -> np.ndarray:
    import torch
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def perturbed(model: nnx.Module, seed: int = 1, scale: float = 0.05) -> nnx.Module:
    """Non-zero adapters (B included) and changed modules_to_save, as after training."""
    state = nnx.state(model, lora.TRAINABLE)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype)
              for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model


def lora_checkpoint_run(root: Path, model_dir: Path, tokenizer: str, lora_cfg: dict, *,
                        scan: bool) -> tuple[Path, nnx.Module]:
    """A LoRA run directory whose checkpoint holds perturbed adapters (no train step compiled);
    returns it and the adapter-applied model in float32 on the unquantised base."""
    run = root / "run"
    cfg = config_from_dict({
        "run": {"output_dir": str(run)},
        "model": {"path": str(model_dir), "tokenizer": tokenizer, "scan_layers": scan},
        "lora": lora_cfg, "checkpoint": {"async_save": False},
        "export": {"dtype": "float32"}})
    save_config(cfg, run / "config.yaml")
    mesh = single_device_mesh()
    base = from_pretrained(model_dir, scan_layers=scan, mesh=mesh)
    model, trainable = lora.apply_lora(base, cfg.lora, mesh=mesh, seed=0)
    model = perturbed(model)
    import optax

    state = create_train_state(model, optax.set_to_zero(), mesh=mesh, trainable=trainable)
    ckpt = Checkpointer(cfg, mesh)
    ckpt.save(2, state, None, force=True)
    ckpt.close()
    plain = LoraConfig(**{**lora_cfg, "quantize_base": "none"})
    reference, _ = lora.apply_lora(from_pretrained(model_dir, scan_layers=scan), plain, seed=0)
    nnx.update(reference, jax.tree.map(lambda x: x.astype(np.float32),
                                       nnx.state(model, lora.TRAINABLE)))
    return run, reference


# --------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, tiny_hf_model, data_tokenizers):
    """A few LoRA steps (scanned layers, lm_head trained fully) with the trainer's export of
    both merged weights and the PEFT adapter, verified."""
    from jaxtune.trainer import train

    root = tmp_path_factory.mktemp("export_lora")
    data = write_jsonl(root / "chats.jsonl", chat_rows(24, seed=2))
    cfg = config_from_dict({
        "run": {"output_dir": str(root / "run"), "seed": 2},
        "model": {"path": str(tiny_hf_model("llama")), "tokenizer": data_tokenizers["chatml"],
                  "scan_layers": True},
        "lora": {"rank": 4, "alpha": 12, "modules_to_save": ["lm_head"]},
        "data": {"sources": [{"path": data}], "format": "chat", "seq_len": 32,
                 "cache_dir": str(root / "cache")},
        "optimizer": {"learning_rate": 2e-2, "schedule": "constant"},
        "trainer": {"steps": 3, "global_batch_size": 4, "progress": False},
        "logging": {"tensorboard": False, "stdout": False},
        "export": {"enabled": True, "lora": "both", "dtype": "auto", "verify": True},
    })
    result = train(cfg)
    model = result.state.model()
    return root, model, np.asarray(model(IDS))


def test_merged_and_peft_equal_the_adapter_model(trained_lora, tiny_hf_model):
    root, model, ref = trained_lora
    merged, adapter = root / "run" / "hf", root / "run" / "hf-adapter"
    assert np.max(np.abs(hf_logits(merged, IDS) - ref)) <= 1e-4
    assert np.max(np.abs(peft_logits(tiny_hf_model("llama"), adapter) - ref)) <= 1e-4
    # the adapters were trained: the export differs from the base
    assert np.max(np.abs(hf_logits(tiny_hf_model("llama"), IDS) - ref)) > 1e-2
    written = json.loads((merged / "config.json").read_text())
    assert written["dtype"] == "float32"  # auto: the base's dtype


def test_peft_folder_is_what_peft_writes(trained_lora, tiny_hf_model, tmp_path):
    """Same file names, config fields and tensor keys/shapes as PEFT's own save_pretrained."""
    import peft
    import transformers
    from safetensors.numpy import load_file

    root, _, _ = trained_lora
    ours = root / "run" / "hf-adapter"
    cfg = json.loads((ours / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                     "up_proj", "v_proj"]
    assert cfg["modules_to_save"] == ["lm_head"] and cfg["r"] == 4 and cfg["lora_alpha"] == 12
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_model("llama"))
    theirs = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=cfg["target_modules"], modules_to_save=["lm_head"],
        task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path / "peft")
    a = load_file(ours / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(v.dtype == np.float32 for v in a.values())


def test_bf16_merged_export_verifies(trained_lora, tmp_path, capsys):
    root, _, _ = trained_lora
    out = tmp_path / "bf16"
    rc = cli_main(["export", str(root / "run"), "--out", str(out), "--lora", "merged",
                   "--dtype", "bfloat16", "--verify"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "transformers vs the adapter-applied model" in printed
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (tmp_path / "bf16-adapter").exists()


def test_lora_export_targets_must_be_free(trained_lora, tmp_path, capsys):
    root, _, _ = trained_lora
    out = tmp_path / "x"
    (tmp_path / "x-adapter").mkdir()
    (tmp_path / "x-adapter" / "f").write_text("keep")
    assert cli_main(["export", str(root / "run"), "--out", str(out), "--lora", "both"]) == 2
    assert "x-adapter is not empty" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name,scan,lora_cfg", [
    # some layers only: PEFT gets a regex of module names
    ("llama", False, {"rank": 3, "alpha": 5.0, "rslora": True,
                      "targets": [r"model\.layers\.[02]\.self_attn\.(q|o)_proj", "down_proj"]}),
    # tied embeddings and biases, a quantised base: merged from the unquantised files
    ("llama_tied_bias", True, {"rank": 2, "alpha": 4.0, "quantize_base": "int8"}),
    ("qwen3", True, {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"],
                     "modules_to_save": ["embed_tokens"]}),
    # a fully trained embedding that lm_head is tied to: PEFT must keep them tied
    ("qwen2", False, {"rank": 4, "alpha": 8.0, "targets": ["o_proj"],
                      "modules_to_save": ["embed_tokens"]}),
])
def test_lora_layouts(name, scan, lora_cfg, tiny_hf_model, data_tokenizers, tmp_path):
    model_dir = tiny_hf_model(name)
    run, reference = lora_checkpoint_run(tmp_path, model_dir, data_tokenizers["chatml"],
                                         lora_cfg, scan=scan)
    ref = np.asarray(reference(IDS))
    out = export_run(run, tmp_path / "hf", lora="both", echo=lambda _: None)
    assert np.max(np.abs(hf_logits(out, IDS) - ref)) <= 1e-4
    if name == "llama_tied_bias":
        from safetensors.numpy import load_file

        assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert np.max(np.abs(peft_logits(model_dir, tmp_path / "hf-adapter") - ref)) <= 1e-4
    targets = json.loads((tmp_path / "hf-adapter" / "adapter_config.json").read_text())[
        "target_modules"]
    if "rslora" in lora_cfg:
        assert isinstance(targets, str) and "layers\\.2\\.self_attn\\.o_proj" in targets


def test_save_pretrained_with_adapters(tiny_hf_model, tmp_path):
    model_dir = tiny_hf_model("llama")
    model, _ = lora.apply_lora(from_pretrained(model_dir, scan_layers=True),
                               LoraConfig(rank=4, alpha=8.0, targets=["all-linear"]))
    model = perturbed(model)
    ref = np.asarray(model(IDS))
    merged = save_pretrained(model, tmp_path / "merged")
    assert np.max(np.abs(hf_logits(merged, IDS) - ref)) <= 1e-4
    adapter = save_pretrained(model, tmp_path / "adapter", lora="adapter",
                              base_model_name_or_path=str(model_dir))
    assert np.max(np.abs(peft_logits(model_dir, adapter) - ref)) <= 1e-4


def test_adapter_export_of_a_full_run_is_refused(tiny_hf_model, data_tokenizers, tmp_path):
    run = checkpoint_run(tmp_path, tiny_hf_model("llama"), data_tokenizers["chatml"],
                         scan=False)
    with pytest.raises(ExportError, match="needs a LoRA run"):
        export_run(run, tmp_path / "nope", lora="adapter")
    assert not (tmp_path / "nope").exists()


def test_lora_run_generates_like_its_merged_export(trained_lora, tmp_path, capsys):
    """``jaxtune generate RUN_DIR`` (adapters applied, unmerged) gives transformers' greedy
    tokens on the merged export, token for token."""
    import torch
    import transformers

    from jaxtune.generation.api import default_stop_ids, generate
    from jaxtune.generation.source import load

    root, _, _ = trained_lora
    run = load(str(root / "run"))
    assert "LoRA" in run.description
    questions = ["How do I reset my password?", "Hi", "What is the refund policy for a year?"]
    out = generate(run.model, run.tokenizer, questions, max_new_tokens=16,
                   generation_config=run.generation_config, details=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "run" / "hf").eval()
    stops = default_stop_ids(run.tokenizer, run.generation_config)
    for ids, tokens in zip(out.prompt_ids, out.tokens, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                              eos_token_id=stops, pad_token_id=0)[0, len(ids):].tolist()
        ends = [i for i, t in enumerate(ref) if t in stops]
        assert tokens == (ref[:ends[0] + 1] if ends else ref)
    capsys.readouterr()
    assert cli_main(["generate", str(root / "run"), "--prompt", questions[0],
                     "--max-new-tokens", "16"]) == 0
    printed = capsys.readouterr()
    assert f"--- answer 1\n{out.texts[0]}\n" in printed.out
    assert "decode:" in printed.err and "tokens/s" in printed.err
