"""Experiment 2.2: a TokenFlow distilled by Gumbel reflow from the experiment 2.1 LLaMA teacher on
tiny_shakespeare (non-causal; causal with --config.causal=True).

    python -m discreteflow_jax.main --config=configs/shakespeare_teacher.py --workdir=TEACHER_DIR
    python -m discreteflow_jax.main --config=configs/shakespeare_gumbel.py --workdir=DIR \
        --config.teacher.checkpoint=TEACHER_DIR

Use the same variant for both commands: `:cpu` distills the `:cpu` teacher (LLaMA dim 256, 4 layers,
ffn 1024, context 64) into a warm-started logit-channel student (the teacher's decoder and weights,
`:warm`, docs/warm_start.md and docs/distill_cpu.md); `:cpu,cold` trains the student from scratch
instead (a TokenFlow of the `shakespeare_baseline.py:cpu` shape, cross-attention conditioning), and
`:cpu,cold,logit_channel` the cold logit-channel student (docs/gumbel_channel.md). `:smoke`
(seconds, tests) distills the `:smoke` teacher, cold.
"""

from discreteflow_jax.config.presets import CONTEXT_RECIPE, WARM_GUMBEL_RECIPE, apply_variant, tokenflow_defaults
from discreteflow_jax.tasks.gumbel import add_gumbel_sections

# The logit-channel student (docs/gumbel_channel.md): distilled to the teacher's conditional,
# tokens argmax(h + G); Gaussian x0 and no context, network logits only, whole.
LOGIT_CHANNEL = {
    "gumbel.logit_channel": True, "gumbel.conditioning": "none", "model.singular_logits": False,
    "model.loss_chunk": 0,
}

VARIANTS = {
    "cpu": {
        "model.dim": 256, "model.num_layers": 4, "model.num_heads": 4, "model.max_len": 64,
        "data.seq_len": 64, "train.batch_size": 16, "train.grad_accum": 1, "train.num_steps": 500,
        "train.lr": 1e-3, "train.warmup_steps": 50, "train.log_every": 25, "train.eval_every": 250,
        "train.ckpt_every": 100, "train.eval_batches": 4,
        # 500 steps: a Gumbel step costs more than a baseline one (the B×T×V noise); the measured step
        # time is in the performance table of the docs.
        # As shakespeare_baseline.py:cpu: more of the small batch at small t (t = u**2).
        "flow.time_sampler": "power", "flow.time_param": 2.0,
        # The recipe that reads context (docs/context_ablation.md); `:cpu,original` drops it.
        **CONTEXT_RECIPE,
    },
    "logit_channel": LOGIT_CHANNEL,  # after `cpu,cold` or `smoke`: `:cpu,cold,logit_channel`
    # Warm start from the teacher (docs/warm_start.md), a logit-channel student: `:cpu,warm`;
    # `g_softmax` / `g_linear` add a G channel the network reads (`:cpu,g_linear`).
    "warm": {**LOGIT_CHANNEL, **WARM_GUMBEL_RECIPE},
    "g_softmax": {**LOGIT_CHANNEL, **WARM_GUMBEL_RECIPE, "gumbel.g_channel": "softmax"},
    "g_linear": {**LOGIT_CHANNEL, **WARM_GUMBEL_RECIPE, "gumbel.g_channel": "linear"},
    # `drafts`: the recipe plus one in-network draft argmax(head + G) after block 2 of 4 (`:cpu,drafts`).
    "drafts": {**LOGIT_CHANNEL, **WARM_GUMBEL_RECIPE, "gumbel.drafts": 1},
    # `stagger`: the recipe trained on staggered times for a quarter of its sequences and sampled
    # left to right, two calls per position (K = 32, w = 15: Gen-PPL 458 against 1,679 for the
    # recipe at K = 32 with one time; docs/distill_cpu.md). Not a few-step sampler.
    "stagger": {**LOGIT_CHANNEL, **WARM_GUMBEL_RECIPE, "flow.stagger_prob": 0.25, "flow.stagger_width": 15.0,
                "sample.stagger": 15.0, "sample.steps": 32},
    "cold": {},  # `:cpu,cold`: no warm start (see variant_names)
    "smoke": {
        "model.dim": 32, "model.num_layers": 2, "model.num_heads": 2, "model.max_len": 16,
        "data.seq_len": 16, "train.batch_size": 8, "train.grad_accum": 2, "train.num_steps": 4,
        "train.warmup_steps": 1, "train.log_every": 2, "train.eval_every": 4, "train.ckpt_every": 4,
        "train.eval_batches": 1, "sample.num_samples": 2, "sample.eval_steps": (1, 4), "gumbel.chunk_size": 4,
    },
}


def variant_names(arg: str | None) -> str | None:
    """``cpu`` means ``cpu,warm`` (the recipe of docs/distill_cpu.md) unless ``cold`` (or the
    original recipe) is named; ``cold`` itself sets nothing."""
    if not arg:
        return arg
    names = arg.split(",")
    if "cpu" in names and not {"cold", "original"} & set(names):
        names.insert(names.index("cpu") + 1, "warm")
    return ",".join(names)


def get_config(arg=None):
    c = add_gumbel_sections(tokenflow_defaults())  # task, gumbel and teacher sections, untied output
    c.gumbel.conditioning = "cross_attention"  # the original's Shakespeare Gumbel setting (docs/experiments.md)
    c.train.num_steps = 5000  # experiment 2.2 (docs/experiments.md)
    c.train.warmup_steps = 500  # linear warm-up, then cosine decay
    c.teacher.checkpoint = ""  # required: --config.teacher.checkpoint=TEACHER_DIR (see above)
    return apply_variant(c, variant_names(arg), VARIANTS)
