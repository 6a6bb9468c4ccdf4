"""The jitted programs of an experiment and what they need, built once from (config, task): the
mesh, the optimizer, the abstract train state with its shardings, the train step and the eval step.

The trainer runs them; ahead-of-time compilation (``training.aot``) lowers the same objects for the
devices of an accelerator this host does not have, so what is checked there is what trains.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from discreteflow_jax.config import ExperimentConfig
from discreteflow_jax.io import checkpoint as ckpt
from discreteflow_jax.models import sharding as shd
from discreteflow_jax.tasks.base import Task
from discreteflow_jax.training.optim import make_optimizer
from discreteflow_jax.training.steps import TrainState, build_eval_step, build_train_step, stream_key


@dataclasses.dataclass
class Programs:
    mesh: Mesh
    tx: optax.GradientTransformation
    graphdef: Any
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying the state shardings
    num_params: int
    train_step: Any  # jitted (state, aux, tokens_BT, base_key) -> (state, metrics); donates the state
    eval_step: Any  # jitted (params, aux, tokens_BT, key) -> metric sums


def build_programs(cfg: ExperimentConfig, task: Task, mesh: Mesh | None = None) -> Programs:
    """Checks the batch and the model against the mesh (default: ``config.mesh`` over the devices
    ``shd.make_mesh`` picks), then builds the jitted steps. Nothing is compiled or allocated."""
    mesh = mesh if mesh is not None else shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    shd.check_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh)
    shd.check_model_parallel(cfg.model, mesh)
    tx = make_optimizer(cfg.train)
    # Keys are made inside eval_shape here (traced, not compiled): a bad shape below must be
    # reported before anything compiles.
    abstract_model = nnx.eval_shape(lambda: task.create_model(nnx.Rngs(stream_key(cfg.seed, "init"))))
    graphdef, abstract_params = nnx.split(abstract_model)
    abstract_params = nnx.to_pure_dict(abstract_params)
    abstract_state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), abstract_params)
    state_shardings = TrainState(
        step=shd.replicated(mesh),
        params=shd.tree_shardings(abstract_state.params, mesh),
        opt_state=shd.tree_shardings(abstract_state.opt_state, mesh),
    )
    batch_sh, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
    aux_sh = task.aux_shardings if task.aux is not None else None
    # with_activation_mesh: activation sharding constraints inside the model use this mesh while tracing.
    train_step = jax.jit(
        shd.with_activation_mesh(build_train_step(task, graphdef, tx, cfg.train.grad_accum), mesh),
        in_shardings=(state_shardings, aux_sh, batch_sh, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        shd.with_activation_mesh(build_eval_step(task, graphdef, cfg.train.grad_accum), mesh),
        in_shardings=(state_shardings.params, aux_sh, batch_sh, rep), out_shardings=rep,
    )
    return Programs(
        mesh=mesh, tx=tx, graphdef=graphdef, state_shardings=state_shardings,
        abstract_state=ckpt.abstract_like(abstract_state, state_shardings),
        num_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params)),
        train_step=train_step, eval_step=eval_step,
    )
