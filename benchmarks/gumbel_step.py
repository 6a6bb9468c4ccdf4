"""Cost of the fused Gumbel reflow train step next to the baseline TokenFlow step at the same
shapes: step time, tokens/s, compiled memory and FLOPs. JSON to stdout.

    python benchmarks/gumbel_step.py [--steps=3] [--out=FILE] \
        [--dim=512 --layers=8 --batch=8 --seq_len=128 --vocab=32000] \
        [--teacher_dim=512 --teacher_layers=8 --teacher_ffn=2048] \
        [--variants=baseline,cross_attention,x0,cross_attention@128]

Variants: ``baseline`` (Gaussian TokenFlow), ``x0`` / ``cross_attention`` (Gumbel conditioning,
automatic chunking), ``NAME@C`` (Gumbel with ``gumbel.chunk_size=C``, e.g. ``@128`` = one chunk,
i.e. the whole [B, T, V] noise at once, to see what chunking saves), ``logit_channel`` (the
logit-channel student's distillation step), ``warm`` (the same, warm-started: the student is the
teacher's decoder, docs/warm_start.md), ``warm_g_softmax`` / ``warm_g_linear`` (plus a G channel),
``warm_rollout`` (half of each batch trained on the 4-step sampler's own states, ``gumbel.rollout_prob``),
``warm_drafts1`` / ``warm_drafts3`` (one or three in-network drafts, ``gumbel.drafts``).
The teacher is a LLaMA with
random weights (its values do not change the cost). Every variant runs exactly the step that
training runs (``benchmarks/step_time.py``'s ``benchmark``, random tokens); ``--steps=0`` reads
memory and FLOPs from the compiled program without running it.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit_json  # noqa: E402
from step_time import benchmark  # noqa: E402  (also defines --steps and --out)

from discreteflow_jax.config.presets import WARM_RECIPE, set_fields, tokenflow_defaults  # noqa: E402
from discreteflow_jax.io.teacher import TeacherBundle  # noqa: E402
from discreteflow_jax.models.llama import Llama, LlamaConfig  # noqa: E402
from discreteflow_jax.tasks.gumbel import add_gumbel_sections  # noqa: E402

_DIM = flags.DEFINE_integer("dim", 512, "Student width.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Student blocks.")
_HEADS = flags.DEFINE_integer("heads", 8, "Student (and teacher) attention heads.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (one micro-batch).")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Context.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary (student and teacher).")
_T_DIM = flags.DEFINE_integer("teacher_dim", 512, "Teacher width.")
_T_LAYERS = flags.DEFINE_integer("teacher_layers", 8, "Teacher blocks.")
_T_FFN = flags.DEFINE_integer("teacher_ffn", 2048, "Teacher SwiGLU width.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Activation dtype of student and teacher.")
_VARIANTS = flags.DEFINE_list("variants", ["baseline", "cross_attention", "x0", "cross_attention@128"],
                              "What to measure (see the module docstring).")


def random_teacher() -> TeacherBundle:
    cfg = LlamaConfig(vocab_size=_VOCAB.value, dim=_T_DIM.value, num_layers=_T_LAYERS.value,
                      num_heads=_HEADS.value, ffn_hidden=_T_FFN.value, max_len=_SEQ.value, dtype=_DTYPE.value,
                      bos_id=1)
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    return TeacherBundle(graphdef=graphdef, params=nnx.to_pure_dict(state), config=cfg, kind="llama", bos_id=1,
                         vocab_size=cfg.vocab_size, max_len=cfg.max_len, source="random LLaMA")


def variant_config(variant: str):
    c = tokenflow_defaults()
    name, _, chunk = variant.partition("@")
    if name != "baseline":
        c = add_gumbel_sections(c)
        c.gumbel.conditioning = name
        c.gumbel.chunk_size = int(chunk or 0)
    warm = name.startswith("warm")
    if name == "logit_channel" or warm:  # what `configs/shakespeare_gumbel.py:...,logit_channel` sets
        c.gumbel.conditioning, c.gumbel.logit_channel = "none", True
        c.model.singular_logits, c.model.loss_chunk = False, 0
    if warm:  # `...,logit_channel,warm[,g_softmax|g_linear]`: the student is the teacher's decoder
        set_fields(c, WARM_RECIPE)
        c.model.flow_dim = 32
        rollout, drafts = name == "warm_rollout", name.startswith("warm_drafts")
        plain = rollout or drafts
        c.gumbel.g_channel = "none" if plain else name.removeprefix("warm").removeprefix("_g_") or "none"
        c.gumbel.rollout_prob = 0.5 if rollout else 0.0
        c.gumbel.drafts = int(name.removeprefix("warm_drafts")) if drafts else 0
    c.model.tie_embeddings = False  # as the Gumbel configs, so only the Gumbel parts differ
    c.model.vocab_size, c.model.dim, c.model.num_layers = _VOCAB.value, _DIM.value, _LAYERS.value
    c.model.num_heads, c.model.max_len, c.model.dtype = _HEADS.value, _SEQ.value, _DTYPE.value
    c.data.seq_len, c.train.batch_size, c.train.grad_accum = _SEQ.value, _BATCH.value, 1
    return c


def main(argv):
    del argv
    steps = flags.FLAGS.steps
    teacher = random_teacher()
    results = {}
    for variant in _VARIANTS.value:
        kwargs = {} if variant == "baseline" else {"teacher": teacher}
        results[variant] = benchmark(variant_config(variant), steps, **kwargs)
        print(f"{variant}: {json.dumps(results[variant])}", file=sys.stderr, flush=True)
    out = {
        "teacher": {"dim": _T_DIM.value, "num_layers": _T_LAYERS.value, "ffn_hidden": _T_FFN.value,
                    "params_m": sum(x.size for x in jax.tree.leaves(teacher.params)) / 1e6},
        "variants": results,
    }
    base = results.get("baseline")
    if base:
        out["relative_to_baseline"] = {
            v: {k: r[k] / base[k] for k in ("step_s", "peak_estimate_mb", "temp_size_mb", "gflops_per_step")
                if k in r and base.get(k)}
            for v, r in results.items() if v != "baseline"
        }
    emit_json(out, flags.FLAGS.out)


if __name__ == "__main__":
    sys.exit(app.run(main))
