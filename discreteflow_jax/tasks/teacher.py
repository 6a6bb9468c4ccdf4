"""The ``teacher`` task (experiment 2.1): next-token cross-entropy of a LLaMA decoder trained
from scratch, later the frozen teacher of Gumbel reflow (loaded by ``io.teacher``).

BOS convention (shared with the Gumbel step): the teacher reads ``[BOS] + tokens[:-1]`` and its
logits at position i predict ``tokens[i]``. Training windows start mid-text, so BOS marks "start
of the window", and the Gumbel step feeds exactly the same input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from discreteflow_jax.config import ExperimentConfig
from discreteflow_jax.flow import cross_entropy
from discreteflow_jax.models.generate import generate, teacher_inputs
from discreteflow_jax.models.llama import Llama, LlamaConfig
from discreteflow_jax.tasks.base import Task


def next_token_sums(model: nnx.Module, tokens_BT: jax.Array, bos_id: int) -> tuple[jax.Array, dict]:
    logits = model(teacher_inputs(tokens_BT, bos_id))
    token_loss = cross_entropy(logits, tokens_BT)
    sums = {"loss_sum": jnp.sum(token_loss), "tokens": jnp.asarray(token_loss.size, jnp.float32)}
    return jnp.mean(token_loss), sums


def summarize_lm(sums: dict, prefix: str) -> dict[str, float]:
    loss = float(sums["loss_sum"]) / max(float(sums["tokens"]), 1.0)
    return {f"{prefix}/loss": loss, f"{prefix}/ppl": float(np.exp(min(loss, 50.0)))}


def teacher_task(cfg: ExperimentConfig, bos_id: int = 1) -> Task:
    """Next-token cross-entropy for a LLaMA teacher on the experiment's data."""
    model_cfg: LlamaConfig = cfg.model
    bos = model_cfg.bos_id if model_cfg.bos_id is not None else bos_id

    def create_model(rngs: nnx.Rngs) -> Llama:
        return Llama(model_cfg, rngs=rngs)

    def loss_fn(model, aux, tokens, key):
        return next_token_sums(model, tokens, bos)

    def eval_fn(model, aux, tokens, key):
        return next_token_sums(model, tokens, bos)[1]

    def sample_fn(graphdef, params, aux, key, steps):
        del steps  # autoregressive: one model call per token
        model = nnx.merge(graphdef, params)
        prompt = jnp.full((cfg.sample.num_samples, 1), bos, jnp.int32)
        new_tokens = min(cfg.data.seq_len, model_cfg.max_len - 1)  # BOS takes one cache slot
        out = generate(model, prompt, max_new_tokens=new_tokens, rng=key, eos_id=model_cfg.eos_id)
        return out.tokens

    return Task(
        name="teacher", create_model=create_model, loss_fn=loss_fn, eval_fn=eval_fn,
        summarize=summarize_lm, sample_fn=sample_fn,
    )
