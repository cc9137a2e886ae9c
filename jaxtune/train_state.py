"""TrainState: everything a training run carries from step to step, created sharded.

The NNX model is split into a static ``graphdef``, the trainable ``params`` (what the optimizer
sees and the gradients flow to) and ``frozen`` (everything else: a LoRA run's base weights,
buffers). Shardings come from each variable's logical axes, so the optimizer moments land
exactly where their parameters are, and nothing is ever whole on one host.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.sharding import Rules, state_shardings


class TrainState(struct.PyTreeNode):
    """Step counter, trainable params, frozen rest of the model, optimizer state, RNG key data."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # trainable variables (nnx.Param, or the LoRA adapters)
    frozen: nnx.State  # the rest of the model, not differentiated
    opt_state: optax.OptState
    rng: jax.Array  # uint32 key data (raw, so checkpoints hold plain arrays)
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    # A frozen copy of the trainable parameters at the start (full fine-tuning with an
    # objective that needs a reference model); None otherwise. Checkpointed like the rest.
    reference: nnx.State | None = None

    def model(self) -> nnx.Module:
        """The NNX model these parameters describe (cheap: arrays are shared, not copied)."""
        return nnx.merge(self.graphdef, self.params, self.frozen)

    def reference_model(self) -> nnx.Module | None:
        """The frozen reference model (None when the state keeps no reference)."""
        if self.reference is None:
            return None
        return nnx.merge(self.graphdef, jax.lax.stop_gradient(self.reference), self.frozen)

    def array_fields(self) -> dict[str, Any]:
        """Every array-holding field by name (what a checkpoint saves), empty ones left out."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("pytree_node", True):
                value = getattr(self, f.name)
                if value is not None:
                    out[f.name] = value
        return out


@dataclasses.dataclass
class FrozenModel:
    """A model beside the train state that is read, never trained (distillation's teacher).

    Not a TrainState field, so it has no optimizer state and is never checkpointed; its
    ``state`` (sharded arrays on the training mesh) is an argument of the jitted step, not a
    constant compiled into it, and :meth:`model` rebuilds the module inside the step with its
    gradient stopped.
    """

    graphdef: nnx.GraphDef
    state: nnx.State
    description: str = ""  # where it came from, for logs

    @classmethod
    def of(cls, model: nnx.Module, description: str = "") -> FrozenModel:
        graphdef, state = nnx.split(model)
        return cls(graphdef, state, description)

    def model(self, state: nnx.State | None = None) -> nnx.Module:
        """The module over its own arrays, or inside a jitted step over ``state`` (the step's
        teacher argument) with the gradient stopped."""
        if state is None:
            return nnx.merge(self.graphdef, self.state)
        return nnx.merge(self.graphdef, jax.lax.stop_gradient(state))

    def shardings(self, mesh: Mesh, rules: Rules | None = None) -> Any:
        return state_shardings(self.state, mesh, rules)

    @property
    def num_params(self) -> int:
        return count_params(self.state)


def split_model(model: nnx.Module, trainable: Any = nnx.Param):
    """``(graphdef, params, frozen)``; ``trainable`` is an NNX filter (type, path predicate)."""
    return nnx.split(model, trainable, ...)


def create_train_state(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh,
    rules: Rules | None = None,
    seed: int = 0,
    trainable: Any = nnx.Param,
    keep_reference: bool = False,
) -> TrainState:
    """Build the TrainState from an already-sharded model; optimizer state is made sharded.

    ``keep_reference``: also keep a frozen copy of the trainable parameters as the reference
    model (for objectives such as DPO under full fine-tuning; LoRA runs need none, their
    reference is the base with adapters disabled)."""
    graphdef, params, frozen = split_model(model, trainable)
    opt_shardings = state_shardings(jax.eval_shape(optimizer.init, params), mesh, rules)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated)
    reference = None
    if keep_reference:  # a real copy: the params are donated and updated in place
        reference = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                            out_shardings=state_shardings(params, mesh, rules))(params)
    return TrainState(step=step, params=params, frozen=frozen, opt_state=opt_state, rng=rng,
                      graphdef=graphdef, reference=reference)


def train_state_shardings(state: TrainState, mesh: Mesh, rules: Rules | None = None) -> TrainState:
    """A TrainState-shaped tree of NamedShardings (usable as jit in/out shardings)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=replicated,
        params=state_shardings(state.params, mesh, rules),
        frozen=state_shardings(state.frozen, mesh, rules),
        opt_state=state_shardings(state.opt_state, mesh, rules),
        rng=replicated,
        graphdef=state.graphdef,
        reference=None if state.reference is None else state_shardings(state.reference, mesh,
                                                                        rules),
    )


def count_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def tree_bytes(tree: Any) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))
