"""Typed, nested run configuration: YAML recipes plus dotted command-line overrides.

A recipe in ``configs/`` is parsed by draccus into :class:`TrainConfig`; overrides such as
``--optimizer.learning_rate=1e-4`` are applied on top. Before draccus sees anything we check
every key against the dataclass tree so that a typo fails with the closest valid names, and
after parsing :func:`validate` rejects impossible combinations before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import draccus
import yaml

from jaxtune.errors import JaxtuneError


class ConfigError(JaxtuneError, ValueError):
    """A config problem a user can fix: the message names the key, the value and the fix."""


# --------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    name: str = "jaxtune"  # run name, shown in logs and metrics
    output_dir: str = "runs/jaxtune"  # run directory: config.yaml, checkpoints/, metrics.jsonl
    seed: int = 0  # seed for parameter init, LoRA init, dropout and data shuffling


@dataclass
class ModelConfig:
    path: str = ""  # HF folder or hub id of the pretrained model (config.json + safetensors)
    tokenizer: str = ""  # tokenizer folder or hub id; empty means the model path
    dtype: str = "float32"  # parameter (master weight) dtype: float32 | bfloat16 | float16
    compute_dtype: str = "float32"  # activation / matmul dtype: float32 | bfloat16 | float16
    scan_layers: bool = False  # stack layers on a 'layers' axis and run them with lax.scan
    remat: str = "none"  # activation checkpointing: none | full | dots_saveable | minimal
    # auto: splash on TPU; on GPU cuDNN, else pallas_gpu (float32, head dim > 128), else XLA;
    # on CPU cpu_flash (float32, no soft-cap), else XLA
    attention: str = "auto"  # kernel: auto | xla | cudnn | splash | pallas_gpu | cpu_flash
    overrides: dict[str, Any] = field(default_factory=dict)  # HF config fields to override


@dataclass
class LoraConfig:
    rank: int = 0  # adapter rank; 0 means full fine-tuning
    alpha: float = 16.0  # scaling numerator: scale = alpha / rank (or / sqrt(rank) with rslora)
    dropout: float = 0.0  # dropout on the adapter input during training
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # names, regexes, all-linear
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank)
    modules_to_save: list[str] = field(default_factory=list)  # trained fully: lm_head, embed_tokens
    base_dtype: str = ""  # dtype of the frozen base (adapters stay float32); empty: model.dtype
    quantize_base: str = "none"  # frozen Linear kernels: none | int8 | nf4 (lm_head stays float)


@dataclass
class DataSourceConfig:
    path: str = ""  # local file / folder (json, jsonl, parquet, csv, txt, arrow) or hub id
    split: str = "train"  # split to read; slices like 'train[:90%]' select rows of the source
    subset: str = ""  # dataset configuration name (hub datasets)
    weight: float = 1.0  # per-epoch multiplier: 2 repeats each example, 0.5 takes half of them


@dataclass
class DataConfig:
    sources: list[DataSourceConfig] = field(default_factory=list)  # training data
    eval_sources: list[DataSourceConfig] = field(default_factory=list)  # held-out data
    # text | completion | alpaca | chat | preference (chosen/rejected pairs) | prompt (RL)
    format: str = "chat"
    text_field: str = "text"  # field holding raw documents (text format)
    prompt_field: str = "prompt"  # prompt field (completion, preference and prompt formats)
    completion_field: str = "completion"  # completion field (completion format)
    chosen_field: str = "chosen"  # preferred completion (preference format)
    rejected_field: str = "rejected"  # dispreferred completion (preference format)
    instruction_field: str = "instruction"  # alpaca instruction field
    input_field: str = "input"  # alpaca optional input field
    output_field: str = "output"  # alpaca output field
    messages_field: str = "messages"  # chat field: list of {role, content} or {from, value}
    role_map: dict[str, str] = field(default_factory=dict)  # extra role names, e.g. gpt: assistant
    system_prompt: str = ""  # system prompt added to chats (and alpaca prompts) that have none
    prompt_as_chat: bool = False  # prompt format: a text prompt becomes the user turn of a chat
    chat_template: str = ""  # chat template: chatml | llama3 | gemma | gemma4, a file, Jinja
    alpaca_prompt: str = "auto"  # alpaca: auto (chat template if any) | chat | classic
    train_on_inputs: bool = False  # also train on prompts / user turns
    seq_len: int = 512  # tokens per row (preference: per side, a pair row has 2 * seq_len)
    packing: bool = True  # pack several examples (or whole pairs) into each row by segment ids
    truncation: str = "truncate"  # over-long examples: truncate | drop | error | split (text)
    on_bad_row: str = "error"  # malformed rows: error | skip
    shuffle: bool = True  # shuffle examples each epoch (seeded from run.seed)
    streaming: bool = False  # stream large sources instead of tokenizing them into the cache
    shuffle_buffer: int = 10000  # streaming only: examples held in the shuffle buffer
    cache_dir: str = ".cache/jaxtune/data"  # tokenization cache; keyed by data, tokenizer, template


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adafactor | lion | sgd | muon
    learning_rate: float = 1e-4  # peak learning rate
    schedule: str = "cosine"  # constant | linear | cosine | wsd (warmup-stable-decay)
    warmup_steps: int = 0  # linear warmup from 0 to the peak
    decay_fraction: float = 0.1  # wsd: fraction of steps spent decaying at the end
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of the peak
    weight_decay: float = 0.0  # decoupled weight decay
    no_decay: list[str] = field(default_factory=lambda: ["norm", "bias"])  # regexes not decayed
    b1: float = 0.9  # first-moment decay (adamw, lion, muon)
    b2: float = 0.999  # second-moment decay (adamw, lion)
    eps: float = 1e-8  # adamw epsilon
    momentum: float = 0.9  # sgd momentum
    max_grad_norm: float = 1.0  # clip by global norm; 0 disables clipping
    freeze: list[str] = field(default_factory=list)  # path regexes of parameters not trained
    state_dtype: str = "float32"  # dtype of first moments (mu, momentum); second moments stay f32


@dataclass
class MeshConfig:
    data: int = -1  # data-parallel axis size; -1 takes the remaining devices
    fsdp: int = 1  # fully-sharded data-parallel axis size
    tensor: int = 1  # tensor-parallel axis size (kept within a host)
    expert: int = 1  # expert-parallel axis size (MoE experts shard over it; 1: no such axis)
    dcn_data: int = 1  # data parallelism across slices / nodes (multi-slice TPU)
    rules: dict[str, list[str]] = field(default_factory=dict)  # logical axis -> mesh axes overrides


@dataclass
class PreferenceConfig:
    beta: float = 0.1  # DPO/SimPO temperature; ORPO: weight of the odds-ratio term (TRL's beta)
    loss_type: str = "sigmoid"  # dpo: sigmoid | ipo | hinge | robust (label-smoothed)
    label_smoothing: float = 0.0  # dpo robust and simpo: assumed label-flip rate in [0, 0.5)
    gamma: float = 0.5  # simpo: target reward margin (TRL's simpo_gamma)
    precompute_reference: bool = False  # dpo: reference log-probs computed once and cached


@dataclass
class RewardConfig:
    # a built-in (exact_answer | format | key_facts | overlong) or 'pkg.module:function' called
    # as fn(prompts, completions, completion_ids, **columns) -> list[float | None], as in TRL
    function: str = ""
    weight: float = 1.0  # weight in the sum of rewards (TRL's reward_weights)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments bound to it


@dataclass
class RLConfig:
    """Reinforcement learning from rewards (trainer.objective: grpo), with TRL's names and
    meanings (see docs/rl.md for where Tunix's differ)."""

    num_generations: int = 8  # completions per prompt (a group); divides the global batch
    max_completion_length: int = 256  # new tokens per completion at most
    temperature: float = 1.0  # sampling temperature, also applied to the trained log-probs
    top_p: float = 1.0  # nucleus sampling; 1.0 keeps every token
    top_k: int = 0  # top-k sampling; 0 keeps every token
    min_p: float = 0.0  # drop tokens below min_p times the likeliest one's probability; 0: off
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo: how the loss is normalised
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    epsilon: float = 0.2  # lower clip of the ratio: 1 - epsilon
    epsilon_high: float | None = None  # upper clip 1 + epsilon_high (clip-higher); None: epsilon
    delta: float | None = None  # two-sided clip: the unclipped ratio capped at delta; None: off
    beta: float = 0.0  # weight of the k3 KL to the reference model; 0 builds no reference
    use_bias_correction_kl: bool = True  # KL term times the ratio (unbiased reverse KL), as TRL
    scale_rewards: str = "group"  # group | batch | none: std that divides the advantages
    num_iterations: int = 1  # optimizer steps per rollout batch (mu), old log-probs stored
    mask_truncated_completions: bool = False  # completions without EOS train nothing
    rewards: list[RewardConfig] = field(default_factory=list)  # summed with their weights
    dynamic_sampling: bool = False  # DAPO: replace groups whose rewards are all equal
    max_sampling_rounds: int = 3  # dynamic sampling: generation rounds per step at most
    eval_max_completion_length: int = 0  # held-out answers' length; 0: max_completion_length


@dataclass
class DistillConfig:
    """Distillation from a teacher's token distributions (trainer.objective: distill), with
    the names and meanings of TRL's GKDTrainer (see docs/distillation.md)."""

    teacher: str = ""  # the teacher: an HF model folder or hub id, an export, or a run directory
    dtype: str = ""  # the teacher's parameter and compute dtype; empty: model.dtype
    beta: float = 0.5  # generalised JSD: 0 forward KL(teacher||student), 1 reverse KL, else JSD
    temperature: float = 1.0  # softmax temperature of both distributions, and of sampling
    lmbda: float = 0.0  # share of steps trained on the student's own completions (on-policy)
    seq_kd: bool = False  # the other steps train on the teacher's completions (sequence-level KD)
    max_new_tokens: int = 128  # generated completions: new tokens at most
    ce_weight: float = 0.0  # weight of the token cross-entropy on the data's answers, added
    top_k: int = 0  # 0: the whole vocabulary; k: the teacher's top k tokens and the rest as one
    precompute_teacher: bool = False  # top-k teacher log-probs computed once, cached with the data


@dataclass
class EvalHarnessConfig:
    tasks: list[str] = field(default_factory=list)  # lm_eval tasks to score; empty turns it off
    every: int = 0  # score every N steps and at the end; 0: only at the end
    limit: float = 0.0  # examples per task (below 1: a fraction of each); 0 scores every example
    num_fewshot: int = -1  # few-shot examples; -1 keeps each task's own default
    include_path: list[str] = field(default_factory=list)  # folders of your own task YAML files
    batch_size: int = 8  # rows per forward pass (requests packed), prompts per generation batch
    apply_chat_template: bool = False  # render prompts with the tokenizer's chat template
    system_instruction: str = ""  # system prompt for every request; empty: none


@dataclass
class TrainerConfig:
    steps: int = 100  # optimizer steps to run
    global_batch_size: int = 8  # rows per optimizer step, over all devices and micro-batches
    grad_accum_steps: int = 1  # micro-batches per step (scanned); must divide the global batch
    eval_every: int = 0  # evaluate every N steps; 0 only at the start and end
    eval_batches: int = 0  # eval batches per evaluation; 0 means the whole eval set
    log_every: int = 1  # write metrics every N steps
    # what to train for (jaxtune.objectives): sft | dpo | orpo | simpo | grpo | distill
    objective: str = "sft"
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # dpo / orpo / simpo
    loss_fn: str = ""  # replacement loss 'pkg.module:function'; empty uses the objective's
    train_step: str = ""  # replacement train step 'pkg.module:function'
    z_loss: float = 0.0  # weight of the z-loss (log-partition squared) regulariser
    # NEFTune noise on the input embeddings in training (TRL's neftune_noise_alpha); 0 disables
    neftune_noise_alpha: float = 0.0
    loss_chunk_size: int = 256  # tokens per chunk of the vocabulary projection in the loss
    progress: bool = True  # show a progress bar
    sample_every: int = 0  # write greedy answers to samples.jsonl every N steps; 0 disables
    sample_prompts: str = ""  # jsonl of prompts to answer; empty: the first held-out chats
    sample_count: int = 4  # held-out chats to answer when sample_prompts is empty
    sample_max_new_tokens: int = 64  # answer length limit for the samples
    eval_harness: EvalHarnessConfig = field(default_factory=EvalHarnessConfig)  # lm_eval scores


@dataclass
class CheckpointConfig:
    enabled: bool = True  # write checkpoints (see docs/checkpoints.md)
    dir: str = ""  # checkpoint folder, local or gs://bucket/path; empty: <output_dir>/checkpoints
    save_every: int = 0  # save every N steps; 0 saves only at the end (and on SIGTERM)
    keep: int = 3  # keep the last K checkpoints; 0 keeps all
    keep_every: int = 0  # also keep every M-th step for good; 0 disables
    resume: str = "auto"  # auto (latest complete step) | none | a step number
    async_save: bool = True  # write in the background; training waits only for the host copy


@dataclass
class LoggingConfig:
    jsonl: bool = True  # write metrics.jsonl in the run directory
    tensorboard: bool = True  # write TensorBoard events in the run directory
    wandb_project: str = ""  # Weights & Biases project; empty disables W&B
    wandb_entity: str = ""  # W&B team or user; empty uses your default entity
    stdout: bool = True  # print a compact metrics line every log_every steps
    peak_tflops: float = 0.0  # per-device peak TFLOP/s for MFU; 0 looks it up (measured on CPU)
    level: str = "INFO"  # log level


@dataclass
class DistributedConfig:
    initialize: str = "auto"  # auto (TPU/SLURM/GKE detected) | explicit | off
    coordinator_address: str = ""  # host:port of process 0 (explicit mode)
    num_processes: int = 1  # number of processes (explicit mode)
    process_id: int = 0  # this process's index (explicit mode)
    local_device_ids: list[int] = field(default_factory=list)  # devices this process uses
    timeout_seconds: int = 300  # give up connecting to the coordinator after this long


@dataclass
class ExportConfig:
    enabled: bool = False  # export to a Hugging Face folder at the end of training
    out_dir: str = ""  # export folder; empty means <output_dir>/hf
    dtype: str = "auto"  # auto (the original model's dtype) | float32 | bfloat16 | float16
    lora: str = "merged"  # LoRA runs: merged | adapter (PEFT) | both (adapter in <out_dir>-adapter)
    max_shard_size: str = "5GB"  # largest safetensors shard
    verify: bool = False  # compare the export's logits in transformers with jaxtune's


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# --------------------------------------------------------------------------- key checks


def _field_tree(cls: type) -> dict[str, Any]:
    """Map each field name to its nested tree (dataclass fields) or None (a leaf)."""
    hints = typing.get_type_hints(cls)
    tree: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        tree[f.name] = _field_tree(tp) if dataclasses.is_dataclass(tp) else None
    return tree


def _unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], [v.split(".")[-1] for v in valid], n=3)
    full = [v for v in valid if v.split(".")[-1] in close]
    hint = f" Did you mean {', '.join(repr(c) for c in full)}?" if full else ""
    return ConfigError(
        f"Unknown config key '{key}' ({where}).{hint} Valid keys here: {', '.join(valid)}."
    )


def _check_keys(tree: dict[str, Any], node: Any, prefix: str, where: str) -> None:
    """Raise ConfigError for the first YAML key that is not a field of the dataclass tree."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        full = f"{prefix}{key}"
        if key not in tree:
            raise _unknown_key_error(full, [f"{prefix}{k}" for k in tree], where)
        sub = tree[key]
        if sub is not None:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(
                    f"Config key '{full}' ({where}) is a section; give it a mapping of "
                    f"{', '.join(sub)}, not {value!r}."
                )
            _check_keys(sub, value, f"{full}.", where)


def _check_override_keys(tree: dict[str, Any], args: list[str]) -> None:
    for arg in args:
        if not arg.startswith("--"):
            raise ConfigError(f"Override '{arg}' must look like --section.key=value.")
        key = arg[2:].split("=", 1)[0]
        node: Any = tree
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                prefix = ".".join(parts[:i])
                valid = list(node) if isinstance(node, dict) else []
                valid = [f"{prefix}.{v}" if prefix else v for v in valid]
                raise _unknown_key_error(key, valid, "command line")
            node = node[part]


# --------------------------------------------------------------------------- load / dump


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Parse a YAML recipe plus ``--section.key=value`` overrides into a validated TrainConfig."""
    overrides = list(overrides or [])
    tree = _field_tree(TrainConfig)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"Config file '{path}' does not exist.")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"Config file '{path}' is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping of sections.")
        _check_keys(tree, raw, "", f"in {path}")
    # '--key value' is folded into '--key=value' so both spellings work.
    args: list[str] = []
    for a in overrides:
        if args and not a.startswith("--") and "=" not in args[-1]:
            args[-1] = f"{args[-1]}={a}"
        else:
            args.append(a)
    _check_override_keys(tree, args)
    try:
        cfg = draccus.parse(TrainConfig, config_path=str(path) if path else None, args=args)
    except draccus.utils.DecodingError as e:
        raise ConfigError(f"Bad config value: {e}. {_type_hint(str(e))}".strip()) from None
    except SystemExit as e:  # argparse reports its own errors by exiting
        raise ConfigError(f"Could not parse overrides {args}.") from e
    validate(cfg)
    return cfg


def _type_hint(message: str) -> str:
    """Turn draccus' "`trainer.steps`: Couldn't parse 'ten' into an int" into a fix."""
    if "`" not in message:
        return ""
    key = message.split("`")[1]
    tp = _leaf_type(key)
    return f"'{key}' expects {tp}." if tp else ""


def _leaf_type(key: str) -> str:
    cls: Any = TrainConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return ""
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return ""
        cls = hints[part]
    return getattr(cls, "__name__", str(cls))


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML, loadable again by :func:`load_config`."""
    buf = io.StringIO()
    draccus.dump(cfg, buf, sort_keys=False)
    return buf.getvalue()


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (a crash leaves the old file or the new
    one, never half of one), and not at all when the file already says the same."""
    text = dump_config(cfg)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        pass
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a plain nested dict (a checkpoint's saved config, a test)."""
    _check_keys(_field_tree(TrainConfig), raw, "", "in the given mapping")
    cfg = draccus.decode(TrainConfig, raw)
    validate(cfg)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return yaml.safe_load(dump_config(cfg))


# --------------------------------------------------------------------------- validation

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots_saveable", "minimal"),
    "model.attention": ("auto", "xla", "cudnn", "splash", "pallas_gpu", "cpu_flash"),
    "lora.quantize_base": ("none", "int8", "nf4"),
    "data.format": ("text", "completion", "alpaca", "chat", "preference", "prompt"),
    "rl.loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
    "rl.importance_sampling_level": ("token", "sequence"),
    "rl.scale_rewards": ("group", "batch", "none"),
    "trainer.preference.loss_type": ("sigmoid", "ipo", "hinge", "robust"),
    "data.truncation": ("truncate", "drop", "error", "split"),
    "data.alpaca_prompt": ("auto", "chat", "classic"),
    "data.on_bad_row": ("error", "skip"),
    "optimizer.name": ("adamw", "adafactor", "lion", "sgd", "muon"),
    "optimizer.schedule": ("constant", "linear", "cosine", "wsd"),
    "optimizer.state_dtype": ("float32", "bfloat16"),
    "distributed.initialize": ("auto", "explicit", "off"),
    "export.dtype": ("auto", "float32", "bfloat16", "float16"),
    "export.lora": ("merged", "adapter", "both"),
}


def _get(cfg: TrainConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: TrainConfig) -> None:
    """Reject values and combinations that cannot work, naming the key and what would."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"'{key}' is '{value}', which is not one of {', '.join(choices)}.{hint}"
            )
    if cfg.lora.base_dtype and cfg.lora.base_dtype not in _CHOICES["model.dtype"]:
        raise ConfigError(f"'lora.base_dtype' is '{cfg.lora.base_dtype}', not a float dtype.")
    positive = ["trainer.steps", "trainer.global_batch_size", "trainer.grad_accum_steps",
                "data.seq_len", "trainer.loss_chunk_size", "trainer.log_every"]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"'{key}' must be positive, got {_get(cfg, key)}.")
    t = cfg.trainer
    if t.global_batch_size % t.grad_accum_steps:
        raise ConfigError(
            f"'trainer.global_batch_size' ({t.global_batch_size}) must divide into "
            f"'trainer.grad_accum_steps' ({t.grad_accum_steps}) micro-batches; try "
            f"grad_accum_steps in {_divisors(t.global_batch_size)}."
        )
    if cfg.lora.rank < 0:
        raise ConfigError(f"'lora.rank' must be >= 0 (0 is full fine-tuning), got {cfg.lora.rank}.")
    if cfg.lora.rank == 0 and cfg.lora.quantize_base != "none":
        raise ConfigError(
            "'lora.quantize_base' needs a LoRA run: set 'lora.rank' > 0, or quantize_base: none."
        )
    if cfg.lora.rank == 0 and (cfg.lora.modules_to_save or cfg.lora.base_dtype):
        raise ConfigError(
            "'lora.modules_to_save' and 'lora.base_dtype' need a LoRA run (full fine-tuning "
            "trains everything in model.dtype): set 'lora.rank' > 0 or clear them."
        )
    if cfg.trainer.neftune_noise_alpha < 0.0:
        raise ConfigError("'trainer.neftune_noise_alpha' must be >= 0 (0 disables NEFTune; "
                          f"TRL's runs use 5 to 15), got {cfg.trainer.neftune_noise_alpha}.")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}.")
    sizes = {"mesh.data": cfg.mesh.data, "mesh.fsdp": cfg.mesh.fsdp, "mesh.tensor": cfg.mesh.tensor}
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError(f"At most one mesh axis may be -1, got {sizes}.")
    for key, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"'{key}' must be a positive size or -1, got {v}.")
    if cfg.mesh.dcn_data < 1:
        raise ConfigError(f"'mesh.dcn_data' must be >= 1, got {cfg.mesh.dcn_data}.")
    if cfg.mesh.expert < 1:
        raise ConfigError(f"'mesh.expert' must be >= 1, got {cfg.mesh.expert}.")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not str(resume).isdigit():
        raise ConfigError(
            f"'checkpoint.resume' is '{resume}'; use auto, none or a step number."
        )
    for key in ("checkpoint.save_every", "checkpoint.keep", "checkpoint.keep_every"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"'{key}' must be >= 0 (0 turns it off), got {_get(cfg, key)}.")
    d = cfg.distributed
    if d.initialize == "explicit" and (not d.coordinator_address or d.num_processes < 1):
        raise ConfigError(
            "'distributed.initialize: explicit' needs 'distributed.coordinator_address' "
            "(host:port) and 'distributed.num_processes'."
        )
    if d.initialize == "explicit" and not 0 <= d.process_id < d.num_processes:
        raise ConfigError(
            f"'distributed.process_id' ({d.process_id}) must be in [0, {d.num_processes})."
        )
    harness = cfg.trainer.eval_harness
    for key in ("every", "limit"):
        if getattr(harness, key) < 0:
            raise ConfigError(f"'trainer.eval_harness.{key}' must be >= 0, got "
                              f"{getattr(harness, key)}.")
    if harness.limit > 1 and harness.limit != int(harness.limit):
        raise ConfigError(f"'trainer.eval_harness.limit' is {harness.limit}: give a whole "
                          "number of examples, or a fraction below 1 (0 scores every example).")
    if harness.batch_size < 1:
        raise ConfigError(f"'trainer.eval_harness.batch_size' must be positive, got "
                          f"{harness.batch_size}.")
    if harness.num_fewshot < -1:
        raise ConfigError(f"'trainer.eval_harness.num_fewshot' must be -1 (each task's "
                          f"default) or more, got {harness.num_fewshot}.")
    pref = cfg.trainer.preference
    if pref.beta <= 0:
        raise ConfigError(f"'trainer.preference.beta' must be > 0, got {pref.beta}.")
    if not 0.0 <= pref.label_smoothing < 0.5:
        raise ConfigError("'trainer.preference.label_smoothing' must be in [0, 0.5), got "
                          f"{pref.label_smoothing}.")
    if pref.label_smoothing and t.objective == "dpo" and pref.loss_type != "robust":
        raise ConfigError("'trainer.preference.label_smoothing' is used by DPO's loss_type: "
                          f"robust only (loss_type is '{pref.loss_type}'); set it to 0 or use "
                          "robust.")
    if cfg.data.format == "preference" and cfg.data.streaming:
        raise ConfigError("'data.format: preference' does not stream; set "
                          "'data.streaming: false'.")
    _validate_rl(cfg)
    _validate_distill(cfg)
    for i, src in enumerate(cfg.data.sources + cfg.data.eval_sources):
        if src.weight <= 0:
            raise ConfigError(f"Data source {i} ('{src.path}') has weight {src.weight}; use > 0.")


def _validate_rl(cfg: TrainConfig) -> None:
    """The rl section: only when an objective that reads it is chosen, so other runs never
    trip over its defaults."""
    rl, t = cfg.rl, cfg.trainer
    if t.objective != "grpo":
        return
    for key in ("rl.num_generations", "rl.max_completion_length", "rl.num_iterations",
                "rl.max_sampling_rounds"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"'{key}' must be at least 1, got {_get(cfg, key)}.")
    groups = t.global_batch_size // rl.num_generations
    if t.global_batch_size % rl.num_generations:
        raise ConfigError(
            f"'trainer.global_batch_size' ({t.global_batch_size}) counts completions and must "
            f"hold whole groups of 'rl.num_generations' ({rl.num_generations}); use a multiple "
            f"of {rl.num_generations} (e.g. {rl.num_generations * max(1, groups)}), or "
            f"num_generations in {_divisors(t.global_batch_size)[1:]}.")
    if rl.num_generations < 2 and rl.scale_rewards == "group":
        raise ConfigError("'rl.num_generations' is 1, so every group's reward std is 0 and no "
                          "completion has an advantage; use at least 2.")
    if rl.temperature <= 0:
        raise ConfigError(f"'rl.temperature' must be > 0 (completions are sampled), got "
                          f"{rl.temperature}.")
    if not 0.0 < rl.top_p <= 1.0 or rl.top_k < 0 or not 0.0 <= rl.min_p < 1.0:
        raise ConfigError("'rl.top_p' must be in (0, 1], 'rl.top_k' >= 0 and 'rl.min_p' in "
                          f"[0, 1); got {rl.top_p}, {rl.top_k}, {rl.min_p}.")
    if rl.epsilon < 0 or (rl.epsilon_high is not None and rl.epsilon_high < 0):
        raise ConfigError("'rl.epsilon' and 'rl.epsilon_high' must be >= 0.")
    if rl.delta is not None and rl.delta <= 1.0:
        raise ConfigError(f"'rl.delta' caps the ratio and must be > 1 (e.g. 4), got {rl.delta}.")
    if rl.beta < 0:
        raise ConfigError(f"'rl.beta' must be >= 0 (0: no KL term), got {rl.beta}.")
    if cfg.data.seq_len <= rl.max_completion_length:
        raise ConfigError(
            f"'data.seq_len' ({cfg.data.seq_len}) is the whole row, prompt and completion, so it "
            f"must exceed 'rl.max_completion_length' ({rl.max_completion_length}); raise it to "
            "the longest prompt plus max_completion_length.")
    if not rl.rewards:
        raise ConfigError("'rl.rewards' is empty: name at least one reward function (a "
                          "built-in such as key_facts or exact_answer, or 'pkg.module:fn').")
    for i, r in enumerate(rl.rewards):
        if not r.function:
            raise ConfigError(f"'rl.rewards[{i}].function' is empty: give a built-in name or "
                              "'pkg.module:function'.")


def _validate_distill(cfg: TrainConfig) -> None:
    """The distill section: only when trainer.objective is distill (its teacher's path,
    family and vocabulary are checked when the objective is built, before any weight is read:
    jaxtune.distill.teacher)."""
    d = cfg.distill
    if cfg.trainer.objective != "distill":
        return
    if not d.teacher:
        raise ConfigError("'distill.teacher' is empty: give the teacher model (a Hugging Face "
                          "folder or hub id, an export, or a training run's directory).")
    if d.dtype and d.dtype not in _CHOICES["model.dtype"]:
        raise ConfigError(f"'distill.dtype' is '{d.dtype}'; use float32, bfloat16, float16 or "
                          "leave it empty (model.dtype).")
    for key in ("distill.beta", "distill.lmbda"):
        if not 0.0 <= _get(cfg, key) <= 1.0:
            raise ConfigError(f"'{key}' must be in [0, 1] (as TRL's), got {_get(cfg, key)}.")
    if d.temperature <= 0:
        raise ConfigError(f"'distill.temperature' must be > 0, got {d.temperature}.")
    if d.ce_weight < 0:
        raise ConfigError(f"'distill.ce_weight' must be >= 0, got {d.ce_weight}.")
    if d.top_k < 0:
        raise ConfigError(f"'distill.top_k' must be >= 0 (0: the whole vocabulary), got "
                          f"{d.top_k}.")
    generates = d.lmbda > 0 or d.seq_kd
    if cfg.data.format in ("preference", "prompt") or (generates and cfg.data.format == "text"):
        raise ConfigError(
            f"trainer.objective distill with {'lmbda > 0 or seq_kd' if generates else 'these'} "
            f"settings trains on prompts with answers (data.format chat, completion or alpaca"
            f"{'' if generates else ', or text'}), not data.format '{cfg.data.format}'.")
    if generates:
        if d.max_new_tokens < 1:
            raise ConfigError(f"'distill.max_new_tokens' must be at least 1, got "
                              f"{d.max_new_tokens}.")
        if cfg.data.packing:
            raise ConfigError(
                "'distill.lmbda' > 0 (or seq_kd) replaces each row's answer with a generated "
                "one, so each row must hold one conversation: set 'data.packing: false' (or "
                "lmbda: 0 and seq_kd: false to distill on the data's answers only).")
    if d.precompute_teacher:
        if not d.top_k:
            raise ConfigError("'distill.precompute_teacher' caches the teacher's top-k "
                              "log-probs: set 'distill.top_k' (e.g. 64).")
        if generates:
            raise ConfigError(
                "'distill.precompute_teacher' caches the teacher on the data's answers, but "
                "lmbda > 0 (or seq_kd) trains on generated answers, which need the teacher "
                "during training: set lmbda: 0 and seq_kd: false, or precompute_teacher: false.")
        if cfg.data.streaming:
            raise ConfigError("'distill.precompute_teacher' caches per tokenised example and "
                              "does not stream; set 'data.streaming: false'.")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
