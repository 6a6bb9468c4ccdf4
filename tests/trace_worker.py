"""Traces the full (not :cpu or :smoke) variant of every config on the simulated devices of this
process: the train step, the validation step and one sampler, lowered against abstract inputs
(nothing allocated at model size, nothing compiled). Run by ``tests/test_full_configs.py`` with
``--xla_force_host_platform_device_count=8``; prints one JSON line per config.

    python tests/trace_worker.py shakespeare_baseline fineweb_gumbel ...
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import load_config  # noqa: E402

from discreteflow_jax.config import parse_config  # noqa: E402
from discreteflow_jax.models import sharding as shd  # noqa: E402
from discreteflow_jax.tasks import build_task  # noqa: E402
from discreteflow_jax.training import aot  # noqa: E402
from discreteflow_jax.training.trainer import Trainer  # noqa: E402


def abstract_teacher(cfg):
    """The teacher a Gumbel config names, as shapes only: GPT-2 124M for FineWeb, the full
    Shakespeare LLaMA teacher config otherwise."""
    return aot.abstract_teacher(cfg, parse_config(load_config("shakespeare_teacher", None)).model)


def trace(name: str, workdir: str) -> dict:
    start = time.time()
    cfg = parse_config(load_config(name, None))
    kwargs = {}
    if cfg.task == "gumbel":  # the teacher stays abstract (no 124M-parameter arrays)
        kwargs["teacher"] = abstract_teacher(cfg)
    task = build_task(cfg, **kwargs)
    trainer = Trainer(cfg, task, workdir, dataset=None, tokenizer=None)
    batch = shd.batch_sharding(trainer.mesh)
    tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jnp.int32, sharding=batch)
    key = jax.random.key(0)
    trainer.train_step.lower(trainer.abstract_state, task.aux, tokens, trainer.base_key)
    trainer.eval_step.lower(trainer.abstract_state.params, task.aux, tokens, key)
    sample_shape = None
    if task.sample_fn is not None:
        out = jax.eval_shape(lambda p: task.sample_fn(trainer.graphdef, p, task.aux, key, 2),
                             trainer.abstract_state.params)
        sample_shape = list(out.shape)
    return {"config": name, "devices": jax.device_count(), "mesh": dict(trainer.mesh.shape),
            "params": trainer.num_params, "sample_shape": sample_shape, "seconds": round(time.time() - start, 1)}


def main(names: list[str]) -> None:
    for name in names:
        with tempfile.TemporaryDirectory() as workdir:
            result = trace(name, workdir)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
