"""Building models without ever holding them whole on one host.

:func:`abstract_model` gives the model's structure (shapes, dtypes, logical axes) with no
arrays, via ``nnx.eval_shape``; :func:`init_model` creates a randomly initialised model
directly with its shardings (a jitted init with ``out_shardings``). Loading pretrained weights
(``jaxtune.weights``) starts from the same abstract model.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxtune.config import MeshConfig
from jaxtune.mesh import make_mesh
from jaxtune.models.family import family_of
from jaxtune.sharding import Rules, state_shardings


def _family(cfg: Any):
    return family_of(cfg)


def single_device_mesh() -> Mesh:
    """A (1, 1, 1) mesh on the first device: the default when no mesh is given."""
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def abstract_model(cfg: Any, *, seed: int = 0, **options: Any) -> nnx.Module:
    """The model for family config ``cfg`` with ShapeDtypeStructs instead of arrays.

    ``options`` are the model class's: ``param_dtype``, ``compute_dtype``, ``scan_layers``,
    ``remat``, ``attention``.
    """
    model_cls = _family(cfg).model_cls
    return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(seed), **options))


def init_model(cfg: Any, mesh: Mesh | None = None, rules: Rules | None = None, seed: int = 0,
               **options: Any) -> nnx.Module:
    """A randomly initialised model (HF-style init), created sharded over ``mesh``.

    Each parameter is produced by one jitted init with ``out_shardings``, so no host holds
    the whole model. ``options`` as for :func:`abstract_model`.
    """
    mesh = mesh or single_device_mesh()
    model_cls = _family(cfg).model_cls
    graphdef, abstract_state = nnx.split(abstract_model(cfg, seed=seed, **options))
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.split(model_cls(cfg, rngs=nnx.Rngs(seed), **options))[1]

    return nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())
