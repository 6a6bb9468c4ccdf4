"""Experiment 1.1 (and 1.2 with --config.causal=True): TokenFlow baseline on tiny_shakespeare.

Variants: `:cpu` trains in minutes on a 2-core CPU with visible learning (it samples t = u**2 to
spend more of the small batch at small t); `:smoke` runs in seconds (tests).
"""

from discreteflow_jax.config.presets import CONTEXT_RECIPE, WARM_RECIPE, apply_variant, tokenflow_defaults

VARIANTS = {
    "cpu": {
        "model.dim": 256, "model.num_layers": 4, "model.num_heads": 4, "model.max_len": 64,
        "data.seq_len": 64, "train.batch_size": 16, "train.grad_accum": 1, "train.num_steps": 1500,
        "train.lr": 1e-3, "train.warmup_steps": 100, "train.log_every": 25, "train.eval_every": 250,
        # 16 validation batches (256 windows, ~25 in each t-bucket): the lowest bucket's loss moves
        # by a few hundredths of a nat between evaluations, so fewer windows would hide the trend.
        "train.ckpt_every": 250, "train.eval_batches": 16,
        # A 15-minute budget: spend more of each batch at small t (t = u**2), where the network has
        # to learn; with uniform t ~70% of the batch has near-zero loss (docs/math.md#singular-logits).
        "flow.time_sampler": "power", "flow.time_param": 2.0,
        # The recipe that reads context (docs/context_ablation.md); `:cpu,original` drops it.
        **CONTEXT_RECIPE,
        # Samples at flow temperature 0.8: Gen-PPL at K = 128 falls 4,417 -> 1,857 with the
        # unigram entropy at 3.52 nats (real text 3.61; temperature 1: 3.80), docs/context_ablation.md.
        "sample.temperature": 0.8,
    },
    # Warm start from the teacher of the same variant (docs/warm_start.md): `:cpu,warm` with
    # --config.teacher.checkpoint=TEACHER_DIR (made by configs/shakespeare_teacher.py:cpu). The network
    # is the teacher's decoder; a smaller learning rate keeps what it knows. It samples left to right
    # (sample.stagger = 45 at K = 128: about 2.8 flow steps per position, the left context clean),
    # which a causal student reads as its teacher would; a quarter of the training sequences get
    # such staggered times. Gen-PPL at K = 128 falls from 3,339 (gated attention, one time for
    # every position) to about 200 (docs/distill_cpu.md). `model.warm_attention=gated` and
    # `flow.stagger_prob=0`, `sample.stagger=0` give the earlier recipe back.
    "warm": {**WARM_RECIPE, "model.warm_attention": "causal", "flow.stagger_prob": 0.25,
             "flow.stagger_width": 31.0, "sample.stagger": 45.0, "sample.steps": 128},
    "smoke": {
        "model.dim": 32, "model.num_layers": 2, "model.num_heads": 2, "model.max_len": 16,
        "data.seq_len": 16, "train.batch_size": 8, "train.grad_accum": 2, "train.num_steps": 6,
        "train.warmup_steps": 2, "train.log_every": 2, "train.eval_every": 3, "train.ckpt_every": 3,
        "train.eval_batches": 1, "sample.num_samples": 2, "sample.eval_steps": (1, 4),
    },
}


def get_config(arg=None):
    return apply_variant(tokenflow_defaults(), arg, VARIANTS)
