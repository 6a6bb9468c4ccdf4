"""Experiment 2.1: LLaMA teacher (ordinary autoregressive LM) on tiny_shakespeare.

Its input is [BOS] + window[:-1] (BOS = 1), the convention the Gumbel step uses too.
Variants: `:cpu` (minutes on a 2-core CPU) and `:smoke` (seconds, tests).
"""

import ml_collections

from discreteflow_jax.config.presets import apply_variant, tokenflow_defaults

VARIANTS = {
    "cpu": {
        "model.dim": 256, "model.num_layers": 4, "model.num_heads": 4, "model.ffn_hidden": 1024,
        "model.max_len": 64, "data.seq_len": 64, "train.batch_size": 16, "train.grad_accum": 1,
        "train.num_steps": 1200, "train.lr": 1e-3, "train.warmup_steps": 100, "train.log_every": 25,
        "train.eval_every": 300, "train.ckpt_every": 300, "train.eval_batches": 8,
    },
    "smoke": {
        "model.dim": 32, "model.num_layers": 2, "model.num_heads": 2, "model.ffn_hidden": 64,
        "model.max_len": 16, "data.seq_len": 16, "train.batch_size": 8, "train.grad_accum": 1,
        "train.num_steps": 4, "train.warmup_steps": 1, "train.log_every": 2, "train.eval_every": 2,
        "train.ckpt_every": 2, "train.eval_batches": 1, "sample.num_samples": 2,
    },
}


def get_config(arg=None):
    c = tokenflow_defaults()
    c.task = "teacher"
    # The teacher is a plain LLaMA: the TokenFlow-only model fields do not apply.
    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 32000  # LLaMA SentencePiece vocabulary
    c.model.dim = 512  # residual width
    c.model.num_layers = 8  # decoder blocks
    c.model.num_heads = 8  # attention heads
    c.model.num_kv_heads = 0  # 0 = plain multi-head attention; fewer = grouped-query attention
    c.model.ffn_hidden = 2048  # SwiGLU width (docs/experiments.md)
    c.model.max_len = 128  # longest sequence (>= data.seq_len)
    c.model.rope_theta = 10000.0  # RoPE base
    c.model.norm_eps = 1e-5  # RMSNorm epsilon
    c.model.tie_embeddings = True  # output head shares the input embedding
    c.model.dtype = "float32"  # activation dtype: float32 | bfloat16
    c.model.init_std = 0.02  # std of embeddings/projections (outputs scaled by 1/sqrt(2·layers))
    c.model.bos_id = 1  # LLaMA BOS, prepended to every window
    c.model.eos_id = 2  # LLaMA EOS
    c.train.batch_size = 128  # sequences per step (docs/experiments.md)
    c.train.grad_accum = 1
    c.train.num_steps = 5000
    c.train.lr = 3e-4
    c.train.warmup_steps = 500
    c.train.weight_decay = 0.1  # decoupled AdamW decay on matrices
    c.sample.eval_steps = (1,)  # autoregressive: the K of flow samplers does not apply
    return apply_variant(c, arg, VARIANTS)
