"""Ahead-of-time compilation of an experiment for a TPU slice this host does not have.

The devices come from a topology description (``jax.experimental.topologies``, which needs libtpu
installed but no TPU); the mesh, the task (a Gumbel teacher included, known by its shapes only) and
the jitted programs are built from them exactly as training builds them (``build_programs``), then
lowered from ``jax.ShapeDtypeStruct``s and compiled by the TPU compiler: the train step (gradient
accumulation, teacher pass, chunked loss), the eval step and the sampler at the largest configured
K. Nothing is allocated anywhere. The compiled executables give per-device memory; the jaxprs give
the matrix-multiply FLOPs (``flops.matmul_flops``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from discreteflow_jax.config import ExperimentConfig, parse_gumbel_config
from discreteflow_jax.io.teacher import TeacherBundle
from discreteflow_jax.models import sharding as shd
from discreteflow_jax.models.gpt2 import GPT2, GPT2Config
from discreteflow_jax.models.llama import Llama
from discreteflow_jax.tasks import build_task
from discreteflow_jax.training.chips import GIB, Slice, chip_hours, step_seconds
from discreteflow_jax.training.flops import matmul_flops
from discreteflow_jax.training.programs import build_programs


def topology_devices(slice_: Slice, num_slices: int = 1) -> list[Any]:
    """The devices of ``num_slices`` slices of this topology, from libtpu's description (no TPU
    needed). v4 and v5p present each chip's two TensorCores as one device ("megacore"): JAX meshes
    on TPUs after v3 need one device per chip."""
    from jax.experimental import topologies

    # A description opens no TPU, so it need not take libtpu's one-process lock (/tmp/libtpu_lockfile),
    # which a training run on this host, or a second check, may hold.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
    kwargs: dict[str, Any] = {"topology_name": slice_.topology, "platform": "tpu", "num_slices": num_slices}
    if slice_.chip.megacore:
        kwargs["chip_config_name"] = "megacore"
    return list(topologies.get_topology_desc(**kwargs).devices)


def abstract_teacher(cfg: ExperimentConfig, teacher_config: Any | None) -> TeacherBundle:
    """The teacher a Gumbel config names, by its shapes only: GPT-2 124M for ``teacher.hf="gpt2"``,
    otherwise a LLaMA of ``teacher_config`` (the model section of the teacher's experiment)."""
    if (cfg.extra.get("teacher") or {}).get("hf") == "gpt2":
        config, cls, kind = GPT2Config(), GPT2, "gpt2"
    elif teacher_config is not None:
        config, cls, kind = teacher_config, Llama, "llama"
    else:
        raise ValueError("the teacher's shapes are unknown: pass the teacher's experiment config with "
                         "--teacher_config=configs/shakespeare_teacher.py")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
    bos = config.bos_id if config.bos_id is not None else 1
    return TeacherBundle(graphdef=graphdef, params=nnx.to_pure_dict(state), config=config, kind=kind, bos_id=bos,
                         vocab_size=config.vocab_size, max_len=config.max_len, source=f"shapes of {kind}")


@dataclasses.dataclass
class ProgramReport:
    name: str
    fits: bool
    error: str | None = None  # the compiler's message when it did not compile
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0  # outputs that reuse argument buffers (the donated train state)
    temp_bytes: int = 0
    code_bytes: int = 0
    flops: float = 0.0  # matmul FLOPs of the whole program (all devices), from the jaxpr
    flops_exact: bool = True
    xla_flops_per_device: float | None = None  # cost_analysis(): loop bodies counted once
    seconds: dict | None = None  # wall-clock of tracing + lowering and of the TPU compiler, on this host
    compiled: Any = dataclasses.field(default=None, repr=False)  # the executable (not in the JSON)

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


@dataclasses.dataclass
class Report:
    config: str
    topology: str
    accelerator_type: str
    num_slices: int
    devices: int
    mesh: dict
    hbm_gib: float
    peak_bf16_tflops: float
    num_params: int
    batch_per_device: float  # sequences per device per micro-batch
    num_steps: int
    mfu: float
    programs: list[ProgramReport]
    step_seconds: float | None = None
    chip_hours: float | None = None
    hints: list[str] = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def as_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "programs"}
        out["programs"] = []
        for p in self.programs:
            prog = {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "compiled"}
            prog["total_bytes"] = p.total_bytes
            prog["total_over_hbm"] = round(p.total_bytes / (self.hbm_gib * GIB), 4)
            out["programs"].append(prog)
        out["fits"] = self.fits
        return out


_SIZE = r"([\d.]+)\s*([KMGT])i?B?"


def oom_numbers(message: str) -> str:
    """The memory figures of a compiler out-of-memory message, one line ("" when it has none)."""
    lines = [ln.strip() for ln in message.splitlines() if re.search(_SIZE, ln) and
             re.search(r"exceed|capacity|Used|memory", ln, re.IGNORECASE)]
    return "; ".join(lines[:3])[:600]


def _compile(name: str, jitted: Any, args: Sequence[Any], hbm_bytes: float) -> ProgramReport:
    start = time.perf_counter()
    traced = jitted.trace(*args)
    flops, exact = matmul_flops(traced.jaxpr)
    report = ProgramReport(name, fits=False, flops=flops, flops_exact=exact)
    try:
        lowered = traced.lower()
        traced_s = time.perf_counter() - start
        compiled = lowered.compile()
        report.seconds = {"trace_and_lower": round(traced_s, 1),
                          "compile": round(time.perf_counter() - start - traced_s, 1)}
    except Exception as err:  # the compiler's own verdict: out of memory, or a sharding it cannot lower
        text = str(err)
        numbers = oom_numbers(text) if "RESOURCE_EXHAUSTED" in text or "memory" in text.lower() else ""
        report.error = numbers or text.strip().splitlines()[0][:600]
        return report
    report.compiled = compiled
    mem = compiled.memory_analysis()
    report.argument_bytes, report.output_bytes = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    report.alias_bytes, report.temp_bytes = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    report.code_bytes = int(mem.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.xla_flops_per_device = float(cost.get("flops", 0.0)) if cost else None
    report.fits = report.total_bytes <= hbm_bytes
    if not report.fits:
        report.error = (f"{report.total_bytes / GIB:.2f} GiB per device (arguments {report.argument_bytes / GIB:.2f} "
                        f"+ temporaries {report.temp_bytes / GIB:.2f} + outputs) > {hbm_bytes / GIB:.2f} GiB HBM")
    return report


def _key_struct(sharding: Any) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))  # traced: no array on the host's backend
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding)


def build_for_devices(cfg: ExperimentConfig, devices: Sequence[Any], teacher_config: Any | None = None):
    """(task, programs) of the experiment with every mesh over ``devices``. Raises the config,
    sharding and teacher errors training would raise, before anything compiles."""
    kwargs = {}
    if cfg.task == "gumbel":
        parse_gumbel_config(cfg.extra.get("gumbel"))  # its errors first, before any model is built
        kwargs["teacher"] = abstract_teacher(cfg, teacher_config)
    with shd.mesh_devices(devices):
        task = build_task(cfg, **kwargs)
        programs = build_programs(cfg, task)
    return task, programs


def check(cfg: ExperimentConfig, name: str, slice_: Slice, devices: Sequence[Any], *, num_slices: int = 1,
          teacher_config: Any | None = None, mfu: float = 0.4, eval_step: bool = True, sampler: bool = True,
          on_program: Any = None, train_step: bool = True) -> Report:
    """Compiles the experiment's programs for the devices; one ``ProgramReport`` each.
    ``on_program(report)`` is called after each (progress output). Without the train step there is
    no step-time or chip-hour estimate."""
    task, programs = build_for_devices(cfg, devices, teacher_config)
    mesh = programs.mesh
    rep = shd.replicated(mesh)
    hbm = slice_.chip.hbm_gib * GIB
    batch = shd.batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jnp.int32, sharding=batch)
    key = _key_struct(rep)
    jobs: list[tuple[str, Any, tuple]] = []
    if train_step:
        jobs.append(("train_step", programs.train_step, (programs.abstract_state, task.aux, tokens, key)))
    if eval_step:
        jobs.append(("eval_step", programs.eval_step, (programs.abstract_state.params, task.aux, tokens, key)))
    if sampler and task.sample_fn is not None and cfg.sample.eval_steps:
        k = max(cfg.sample.eval_steps)
        graphdef = programs.graphdef

        def sample(params, aux, key):
            return task.sample_fn(graphdef, params, aux, key, k)

        jobs.append((f"sampler_K{k}", jax.jit(sample), (programs.abstract_state.params, task.aux, key)))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    report = Report(
        config=name, topology=slice_.topology, accelerator_type=slice_.accelerator_type, num_slices=num_slices,
        devices=len(devices), mesh=dict(mesh.shape), hbm_gib=slice_.chip.hbm_gib,
        peak_bf16_tflops=slice_.chip.peak_bf16_tflops, num_params=programs.num_params,
        batch_per_device=cfg.train.batch_size / cfg.train.grad_accum / shards, num_steps=cfg.train.num_steps,
        mfu=mfu, programs=[],
    )
    for prog_name, jitted, args in jobs:
        with shd.mesh_devices(devices):
            result = _compile(prog_name, jitted, args, hbm)
        report.programs.append(result)
        if on_program is not None:
            on_program(result)
    train = next((p for p in report.programs if p.name == "train_step"), None)
    if train is not None and train.flops:
        report.step_seconds = step_seconds(train.flops / len(devices), slice_.chip, mfu)
        report.chip_hours = chip_hours(report.step_seconds, cfg.train.num_steps, len(devices))
    if not report.fits:
        report.hints = hints(cfg, report)
    return report


def hints(cfg: ExperimentConfig, report: Report) -> list[str]:
    """What to change when a program does not fit, from the config and the numbers."""
    out = []
    accum, mesh = cfg.train.grad_accum, report.mesh
    per_device = report.batch_per_device
    if per_device > 1 and per_device % 2 == 0:
        out.append(f"{per_device:g} sequences per device per micro-batch: --config.train.grad_accum={accum * 2} halves "
                   "the activations (same global batch)")
    if cfg.model.remat != "full":
        out.append(f"--config.model.remat=full recomputes each block in the backward pass (now {cfg.model.remat!r})")
    loss_chunk = getattr(cfg.model, "loss_chunk", None)
    if loss_chunk == 0:
        out.append("--config.model.loss_chunk=128 never forms the full [batch, length, vocab] logits")
    if cfg.task == "gumbel":
        chunk = parse_gumbel_config(cfg.extra.get("gumbel")).chunk_size
        out.append(f"--config.gumbel.chunk_size={max(32, (chunk or 256) // 2)} (now {chunk or 'automatic'}) "
                   "shrinks the teacher-posterior buffers")
    first = report.programs[0]  # every program takes the parameters: their bytes are in each one's arguments
    if first.argument_bytes > 0.25 * report.hbm_gib * GIB and mesh.get("fsdp", 1) == 1:
        out.append(f"--config.mesh.fsdp={report.devices} shards parameters and optimizer state "
                   f"({first.argument_bytes / GIB:.2f} GiB per device now)")
    if mesh.get("tensor", 1) == 1:
        out.append("--config.mesh.tensor=2 splits heads and FFN (a head count it divides)")
    out.append("or a slice with more HBM per chip")
    return out
