"""The teacher: where ``distill.teacher`` points, whether it can teach this student, and
loading it frozen on the training mesh.

``distill.teacher`` is a Hugging Face model folder or hub id, an export (the same), or a
jaxtune run directory (its latest checkpoint, LoRA adapters applied unmerged, read by
:func:`jaxtune.run_dir.load_run`). :func:`check_teacher` runs when the objective is built,
before any weight is read: it finds the teacher's ``config.json`` (for a run directory, its
base model's, with the run's overrides), checks that jaxtune has its family, and that its
vocabulary is the student's (TRL's GKD compares the two full next-token distributions, which
needs one vocabulary), each problem one paragraph naming the key and the fix.

:func:`load_teacher` reads it onto the training mesh, sharded by the same logical rules as
the student, as a :class:`~jaxtune.train_state.FrozenModel`: outside the train state, so it
has no optimizer state and is never in a checkpoint; the jitted step takes its arrays as an
argument.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxtune.errors import JaxtuneError

log = logging.getLogger("jaxtune")


class TeacherError(JaxtuneError):
    """``distill.teacher`` cannot be this run's teacher; the message says why and what to do."""


@dataclass(frozen=True)
class TeacherSource:
    """Where the teacher is and what it is (nothing loaded)."""

    kind: str  # "model" (a model folder, export or hub id) or "run" (a run directory)
    path: str  # the folder or hub id (kind "model"), the run directory (kind "run")
    hf_config: dict[str, Any]  # its config.json (a run's base model's, with its overrides)
    where: str  # where the config.json was found, for messages

    @property
    def model_type(self) -> str | None:
        return self.hf_config.get("model_type")


def vocab_size(hf_config: dict[str, Any]) -> int | None:
    """``vocab_size`` of a config.json (a multimodal one's text config)."""
    size = hf_config.get("vocab_size", (hf_config.get("text_config") or {}).get("vocab_size"))
    return int(size) if size is not None else None


def _find_config(path: str, key: str) -> tuple[dict[str, Any], str]:
    """config.json of a model path or hub id, offline (``jaxtune.plan.hf.find_hf_config``:
    a folder, the Hugging Face cache, or the architectures jaxtune ships)."""
    from jaxtune.plan.hf import find_hf_config

    try:
        return find_hf_config(path)
    except JaxtuneError as err:
        raise TeacherError(f"{key}: {err}") from None


def find_teacher(cfg: Any) -> TeacherSource:
    """The teacher ``distill.teacher`` names (see the module docstring); TeacherError when it
    does not exist or is neither a model folder nor a run directory."""
    from jaxtune.locate import looks_local

    text = cfg.distill.teacher
    key = f"distill.teacher is '{text}'"
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            hf, where = _find_config(str(path), key)
            return TeacherSource("model", str(path), hf, where)
        if (path / "config.yaml").is_file():
            return _run_teacher(path, key)
        raise TeacherError(
            f"{key}, a folder with neither config.json (a Hugging Face model folder or a jaxtune "
            "export) nor config.yaml (a jaxtune run directory). Point distill.teacher at the "
            "teacher model's folder, at its export (jaxtune export RUN --out DIR), or at the "
            "run.output_dir of the run that trained it.")
    if path.exists():
        raise TeacherError(f"{key}, a file; give the folder that holds the teacher model "
                           f"({path.absolute().parent}).")
    if looks_local(text):
        full = path.absolute()
        raise TeacherError(
            f"{key}, but {full} does not exist"
            + ("" if path.is_absolute() else " (relative paths start at the working directory)")
            + ". Point distill.teacher at the teacher model's folder (config.json and "
            "*.safetensors), an export, or the run directory of a training run (e.g. "
            "runs/quickstart after `jaxtune train configs/quickstart.yaml`).")
    from jaxtune.plan.hf import find_hf_config

    try:  # a hub id: its config.json from the Hugging Face cache or shipped with jaxtune
        hf, where = find_hf_config(text)
    except JaxtuneError:
        raise TeacherError(
            f"{key}, which is not a local folder, so it was taken for a Hugging Face hub id, "
            "but its config.json is neither in the Hugging Face cache nor shipped with jaxtune. "
            f"Download the teacher once with network access (`hf download {text}`), or point "
            "distill.teacher at a local model folder, an export, or a run directory (./name "
            "for one in this directory).") from None
    return TeacherSource("model", text, hf, where)


def _run_teacher(run_dir: Path, key: str) -> TeacherSource:
    from jaxtune.config import load_config

    run_cfg = load_config(str(run_dir / "config.yaml"))
    if not run_cfg.model.path:
        raise TeacherError(f"{key}, a run directory whose config.yaml has no model.path, so "
                           "the model it trained is unknown.")
    hf, where = _find_config(run_cfg.model.path, f"{key} (a run directory; its model.path)")
    return TeacherSource("run", str(run_dir), {**hf, **run_cfg.model.overrides},
                         f"{where}, the base model of run {run_dir}")


def check_teacher(cfg: Any) -> TeacherSource:
    """The teacher, checked against the student before any weight is read: its family is
    one jaxtune builds, and its vocabulary is the student's."""
    from jaxtune.models import get_family
    from jaxtune.models.family import UnknownModelTypeError

    teacher = find_teacher(cfg)
    try:
        get_family(teacher.model_type)
    except UnknownModelTypeError as err:
        raise TeacherError(f"distill.teacher '{cfg.distill.teacher}' ({teacher.where}) cannot "
                           f"be loaded: {err}") from None
    student_hf, student_where = _find_config(cfg.model.path, f"model.path is "
                                                             f"'{cfg.model.path}'")
    student = vocab_size({**student_hf, **cfg.model.overrides})
    size = vocab_size(teacher.hf_config)
    if student != size:
        raise TeacherError(
            f"The teacher's vocabulary has {size} tokens ({teacher.where}) and the student's "
            f"{student} ({student_where}): distillation compares the two models' next-token "
            "distributions token for token, so they must share one vocabulary (TRL's GKD "
            "requires the same). Use a teacher and a student with the same tokenizer, e.g. "
            "two sizes of one model family.")
    k = cfg.distill.top_k
    if size is not None and k >= size:
        raise TeacherError(f"distill.top_k ({k}) must be below the vocabulary size ({size}); "
                           "use 0 for the whole vocabulary.")
    return teacher


def load_teacher(cfg: Any, mesh: Any, rules: Any):
    """The teacher (checked) as a :class:`~jaxtune.train_state.FrozenModel` on ``mesh``."""
    from jaxtune.train_state import FrozenModel

    teacher = check_teacher(cfg)
    m, d = cfg.model, cfg.distill
    dtype = d.dtype or m.dtype
    if teacher.kind == "model":
        from jaxtune.weights import from_pretrained, resolve_model_dir

        folder = resolve_model_dir(teacher.path, "distill.teacher")  # a hub id: from its cache
        model = from_pretrained(folder, dtype=dtype, mesh=mesh,
                                compute_dtype=d.dtype or m.compute_dtype,
                                scan_layers=m.scan_layers, attention=m.attention, rules=rules)
        description = f"{teacher.path}"
    else:
        model, description = _load_run_teacher(teacher.path, dtype, mesh, rules)
    frozen = FrozenModel.of(model, description)
    log.info("teacher: %s (%.1fM parameters, %s), frozen beside the train state", description,
             frozen.num_params / 1e6, dtype)
    return frozen


def _load_run_teacher(run_dir: str, dtype: str, mesh: Any, rules: Any):
    """A run directory's model (LoRA adapters applied, unmerged), placed on ``mesh``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxtune.run_dir import load_run
    from jaxtune.sharding import state_shardings

    loaded = load_run(run_dir)
    graphdef, state = nnx.split(loaded.model)
    target = jnp.dtype(dtype)
    state = jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating)
                         else x, state)
    state = jax.device_put(state, state_shardings(state, mesh, rules))
    return nnx.merge(graphdef, state), loaded.description


def teacher_for(trainer: Any):
    """``Objective.teacher`` of ``distill``: the run's teacher on its training mesh."""
    return load_teacher(trainer.cfg, trainer.mesh, trainer.rules)


def abstract_teacher(cfg: Any, platform: str):
    """The teacher as shapes (``jaxtune plan``: nothing read): a FrozenModel whose state
    holds ShapeDtypeStructs, built from its config.json as the trainer would load it."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxtune.kernels import compiling_for
    from jaxtune.models import abstract_model, get_family
    from jaxtune.train_state import FrozenModel

    teacher = check_teacher(cfg)
    m, d = cfg.model, cfg.distill
    config = get_family(teacher.model_type).config_cls.from_hf_config(teacher.hf_config)
    with compiling_for(platform):  # attention: auto resolves for the target
        abstract = abstract_model(config, param_dtype=jnp.dtype(d.dtype or m.dtype),
                                  compute_dtype=jnp.dtype(d.dtype or m.compute_dtype),
                                  scan_layers=m.scan_layers, attention=m.attention)
    graphdef, state = nnx.split(abstract)
    return FrozenModel(graphdef, state, teacher.path)
