"""Traces the full (not :cpu or :smoke) variant of every config on the simulated devices of this
process: the train step, the validation step and one sampler, lowered against abstract inputs
(nothing allocated at model size, nothing compiled). Run by ``tests/test_full_configs.py`` with
``--xla_force_host_platform_device_count=8``; prints one JSON line per config.

    python tests/trace_worker.py shakespeare_baseline fineweb_gumbel ...
    python tests/trace_worker.py --layers=1 fineweb_gumbel   (full widths, shapes and mesh; one layer)
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


def trace(name: str, workdir: str, layers: int | None = None) -> dict:
    start = time.time()
    config = load_config(name, None)
    if layers is not None:  # the reduced trace: every size of the full variant except the depth
        config.model.num_layers = layers
    cfg = parse_config(config)
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
            "params": trainer.num_params, "seq_len": cfg.data.seq_len, "batch": cfg.train.batch_size,
            "sample_shape": sample_shape, "seconds": round(time.time() - start, 1)}


def main(args: list[str]) -> None:
    layers = next((int(a.split("=", 1)[1]) for a in args if a.startswith("--layers=")), None)
    names = [a for a in args if not a.startswith("--")]
    for name in names:
        with tempfile.TemporaryDirectory() as workdir:
            result = trace(name, workdir, layers)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
