"""Export entry points: :func:`export_run` (a run's checkpoint) and :func:`save_pretrained`
(a model in memory). Both write the folder ``transformers`` itself writes for the family."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from jaxtune.export import hf_folder
from jaxtune.export.errors import ExportError
from jaxtune.export.safetensors_out import TensorGroup, parse_size
from jaxtune.export.tensors import model_sources
from jaxtune.export.writer import read_generation_config, reference_model, write_hf_export
from jaxtune.models.layers import WEIGHTS
from jaxtune.run_dir import base_model, checkpoint_sources, open_run

LORA_MODES = ("merged", "adapter", "both")
Echo = Callable[[str], Any]


def describe_size(nbytes: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= div:
            return f"{nbytes / div:.1f} {unit}"
    return f"{nbytes} B"


def _summary(groups: list[TensorGroup], weight_map: dict[str, str]) -> str:
    size = sum(s.nbytes for g in groups for s in g.specs)
    files = len(set(weight_map.values()))
    return f"{len(weight_map)} tensors, {describe_size(size)} in {files} file{'s' * (files > 1)}"


def skipped_note(config: Any) -> str | None:
    """What an export of ``config``'s model leaves out of the checkpoint it was loaded from
    (the towers of a multimodal checkpoint whose language model jaxtune trains), or None."""
    skipped = tuple(getattr(config, "skipped_modules", ()) or ())
    if not skipped:
        return None
    return (f"note: this export is the text-only language model ({config.model_type}); the "
            f"source checkpoint's {', '.join(skipped)} were not loaded and are not in it. "
            "Use the original checkpoint's towers with these language-model weights, or "
            "export from a text-only checkpoint.")


# --------------------------------------------------------------------------- a run


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
               step: int | None = None, dtype: str | None = None, lora: str | None = None,
               max_shard_size: str | None = None, verify: bool | None = None,
               overwrite: bool = False, echo: Echo = print) -> Path:
    """Write checkpoint ``step`` (default: the latest) of a run as a Hugging Face folder.

    Unset options come from the run's ``export`` config section: ``out_dir`` (default
    ``<run_dir>/hf``), ``dtype`` (``auto``: the original model's), ``lora``
    (``merged | adapter | both``), ``max_shard_size``, ``verify``. Parameters are streamed
    from the checkpoint one tensor at a time. Returns the output folder.
    """
    run_dir = Path(run_dir)
    ckpt = open_run(run_dir, step)
    cfg = ckpt.config
    e = cfg.export
    out = Path(out_dir or e.out_dir or run_dir / "hf")
    lora_mode = lora or e.lora
    if lora_mode not in LORA_MODES:
        raise ExportError(f"--lora '{lora_mode}' is not one of {', '.join(LORA_MODES)}.")
    shard = max_shard_size or e.max_shard_size
    parse_size(shard)
    verify = e.verify if verify is None else verify
    base = base_model(ckpt)
    base_dir, base_hf, config = base.directory, base.hf_config, base.config
    # The config.json of the model jaxtune built: the file itself, except for a multimodal
    # checkpoint's, whose language model is what was trained and what is written.
    base_hf = base.family.config_cls.from_hf_config(base_hf).to_hf_config()
    note = skipped_note(config)
    if note:
        echo(note)
    protect = (run_dir, base_dir)
    if not str(ckpt.directory).startswith(("gs://", "s3://")):
        protect += (Path(str(ckpt.directory)),)
    hf_folder.check_output(out, overwrite, protect)
    out_dtype = hf_folder.resolve_dtype(dtype or e.dtype, base_hf, fallback=cfg.model.dtype)
    from jaxtune.data import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    if cfg.lora.rank == 0 and lora not in (None, "merged"):
        raise ExportError(f"--lora {lora} needs a LoRA run; {run_dir} is full fine-tuning "
                          "(lora.rank 0), so only full weights can be exported.")
    if cfg.lora.rank > 0:
        from jaxtune.export.lora_export import export_lora_run

        # Adapters train in float32: written so unless a dtype is asked for explicitly.
        adapter_dtype = out_dtype if (dtype or e.dtype) != "auto" else np.dtype("float32")
        return export_lora_run(ckpt, out, mode=lora_mode, base_dir=base_dir, base_hf=base_hf,
                               config=config, out_dtype=out_dtype, adapter_dtype=adapter_dtype,
                               max_shard_size=shard,
                               tokenizer=tokenizer, verify=verify, overwrite=overwrite,
                               echo=echo)
    sources = checkpoint_sources(ckpt, config)

    def check_written(tmp: Path) -> None:
        from jaxtune.export import verify as check

        scan = cfg.model.scan_layers
        checks = [check.Check("jaxtune (the written values)", lambda: check.jaxtune_logits(
            reference_model(config, sources, scan, round_to=out_dtype)))]
        if np.dtype(out_dtype).itemsize < np.dtype(cfg.model.dtype).itemsize:
            checks.append(check.Check(
                f"the trained {cfg.model.dtype} model", lambda: check.jaxtune_logits(
                    reference_model(config, sources, scan)), check.ROUNDED_TOLERANCE))
        check.verify(tmp, checks, vocab_size=config.vocab_size, tokenizer=tokenizer, echo=echo)

    groups, weight_map = write_hf_export(
        out, sources, config, out_dtype=out_dtype, max_shard_size=shard, tokenizer=tokenizer,
        hf_config=hf_folder.export_hf_config(base_hf, cfg.model.overrides, out_dtype),
        generation=read_generation_config(base_dir), overwrite=overwrite,
        verify=check_written if verify else None)
    echo(f"exported step {ckpt.step} of {run_dir} to {out} as {np.dtype(out_dtype).name}: "
         f"{_summary(groups, weight_map)}")
    return out


# --------------------------------------------------------------------------- in memory


def save_pretrained(model: nnx.Module, out_dir: str | os.PathLike, tokenizer: Any = None, *,
                    dtype: str | None = None, max_shard_size: str | int = "5GB",
                    lora: str = "merged", base: nnx.Module | None = None,
                    base_model_name_or_path: str = "", overwrite: bool = False,
                    echo: Echo | None = None) -> Path:
    """Write a jaxtune model in memory as a folder ``transformers`` (or ``peft``) loads.

    Args:
      model: a jaxtune model (e.g. from ``jaxtune.from_pretrained``), stacked layers or not,
        with or without LoRA adapters.
      out_dir: the folder to write; it must be new or empty unless ``overwrite``.
      tokenizer: a ``transformers`` tokenizer or a folder holding one; its files (chat
        template included) are written, and ``generation_config.json`` gets its EOS and the
        template's end-of-turn token.
      dtype: ``float32 | bfloat16 | float16``; default keeps each parameter's dtype.
      max_shard_size: largest safetensors file, e.g. ``"5GB"``.
      lora: for a model with adapters: ``merged`` (``jaxtune.lora.merge``, float32 sum, then
        cast) or ``adapter`` (a PEFT adapter folder).
      base: for ``merged``, the unquantised base model to merge into (see
        ``jaxtune.lora.merge``); default: the model's own (possibly quantised) kernels.
      base_model_name_or_path: written into a PEFT ``adapter_config.json``.
      echo: where notes go (default: a logged warning), e.g. that a model loaded from a
        multimodal checkpoint is written as its text-only language model.

    Tied embeddings stay tied (no ``lm_head.weight``). Returns the folder.
    """
    import jax

    if jax.process_count() > 1:
        raise ExportError("save_pretrained runs in a single process; on several hosts save a "
                          "checkpoint and run `jaxtune export RUN_DIR` on one of them.")
    if lora not in ("merged", "adapter"):
        raise ExportError(f"lora='{lora}' is not merged or adapter.")
    if isinstance(tokenizer, str | os.PathLike):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=False)
    out_dtype = None if dtype is None else hf_folder.resolve_dtype(dtype)
    note = skipped_note(model.config)
    if note:
        if echo is None:
            import logging

            logging.getLogger(__name__).warning(note)
        else:
            echo(note)
    if _has_adapters(model):
        from jaxtune.export import lora_export

        if lora == "adapter":
            return lora_export.save_peft_adapter(model, Path(out_dir), tokenizer,
                                                 dtype=out_dtype, overwrite=overwrite,
                                                 base_model_name_or_path=base_model_name_or_path)
        from jaxtune.lora import merge

        model = merge(model, base=base)
    config = model.config
    sources = model_sources(nnx.state(model, WEIGHTS))
    cfg_dtype = out_dtype or next(s.dtype for s in sources if "embed" in s.path)
    write_hf_export(Path(out_dir), sources, config, out_dtype=out_dtype,
                    hf_config=hf_folder.export_hf_config(config.to_hf_config(), None, cfg_dtype),
                    generation=None, max_shard_size=max_shard_size, tokenizer=tokenizer,
                    overwrite=overwrite)
    return Path(out_dir)


def _has_adapters(model: nnx.Module) -> bool:
    import jax

    try:
        from jaxtune.lora import LoraParam
    except ImportError:  # a build without LoRA support: no adapters possible
        return False
    return bool(jax.tree.leaves(nnx.state(model, LoraParam)))
