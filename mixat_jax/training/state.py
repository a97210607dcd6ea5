"""Training state of the pure step (DESIGN.md rule 1; MixAT spec §3.1, §5, §11.1).

``TrainState`` is a pytree: ``graphdef`` and the optax transformation ``tx`` are static (part of
the tree structure, like ``flax.training.train_state.TrainState``); ``lora`` (fp32 adapters),
``frozen`` (base weights, never updated or differentiated), ``opt_state`` (fp32 AdamW moments),
``step`` and ``emb_norm`` (ē = mean_v ||E_v||, computed ONCE from the base embedding matrix at
start-up, spec §1) are leaves. The attack radius is ``eps · emb_norm``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixat_jax import lora as lora_lib
from mixat_jax import mesh as mesh_lib
from mixat_jax.objectives import mean_embedding_norm


@struct.dataclass
class TrainState:
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    lora: nnx.State
    frozen: nnx.State
    opt_state: Any
    step: jax.Array
    emb_norm: jax.Array


def init_train_state(model, tx: optax.GradientTransformation) -> TrainState:
    """Splits an NNX model with LoRA attached into a fresh TrainState (step 0)."""
    if model.lora_config() is None:
        raise ValueError("model has no LoRA adapters; call model.add_lora(LoraConfig(...)) first")
    graphdef, lora, frozen = lora_lib.split(model)
    bad = [x.dtype for x in jax.tree.leaves(lora) if x.dtype != jnp.float32]
    if bad:
        raise ValueError(f"LoRA parameters must be fp32 (optimizer precision); found {bad[0]}")
    return TrainState(
        graphdef=graphdef,
        tx=tx,
        lora=lora,
        frozen=frozen,
        opt_state=tx.init(lora),
        step=jnp.zeros((), jnp.int32),
        emb_norm=mean_embedding_norm(model.embedding_matrix),
    )


def train_state_shardings(state: TrainState, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES):
    """A TrainState of NamedShardings: parameters and optimizer moments by their logical axes
    (AdamW moments inherit the LoRA ``axes`` metadata), scalars replicated."""
    rep = NamedSharding(mesh, PartitionSpec())
    return state.replace(
        lora=mesh_lib.state_shardings(state.lora, mesh, rules),
        frozen=mesh_lib.state_shardings(state.frozen, mesh, rules),
        opt_state=mesh_lib.state_shardings(state.opt_state, mesh, rules),
        step=rep,
        emb_norm=rep,
    )


def place_train_state(state: TrainState, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES) -> TrainState:
    """``device_put`` of every leaf with :func:`train_state_shardings`."""
    return jax.device_put(state, train_state_shardings(state, mesh, rules))
