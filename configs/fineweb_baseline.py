"""Experiment 3.1 (non-causal; causal with --config.causal=True): TokenFlow baseline on FineWeb
sample-10BT with the GPT-2 tokenizer, context 1024, 12 layers, 12 heads, dim 768.

Offline: --config.data.local_path=FILE_OR_DIR (parquet/jsonl with a `text` column).
"""

from discreteflow_jax.config.presets import CONTEXT_RECIPE, apply_variant, tokenflow_defaults

VARIANTS = {
    "cpu": {
        "model.dim": 256, "model.num_layers": 4, "model.num_heads": 4, "model.max_len": 128,
        "data.seq_len": 128, "train.batch_size": 8, "train.grad_accum": 1, "train.num_steps": 1000,
        "train.lr": 1e-3, "train.warmup_steps": 100, "train.log_every": 25, "train.eval_every": 250,
        "train.ckpt_every": 250, "train.eval_batches": 4, "data.val_rows": 32,
        # The recipe that reads context (docs/context_ablation.md); `:cpu,original` drops it.
        **CONTEXT_RECIPE,
    },
    "smoke": {
        "model.dim": 32, "model.num_layers": 2, "model.num_heads": 2, "model.max_len": 32,
        "data.seq_len": 32, "train.batch_size": 4, "train.grad_accum": 1, "train.num_steps": 4,
        "train.warmup_steps": 1, "train.log_every": 2, "train.eval_every": 2, "train.ckpt_every": 2,
        "train.eval_batches": 1, "sample.num_samples": 2, "sample.eval_steps": (2,), "data.val_rows": 2,
    },
}


def get_config(arg=None):
    c = tokenflow_defaults()
    c.data.name = "fineweb"
    c.data.tokenizer = "gpt2"
    c.data.seq_len = 1024
    c.model.vocab_size = 50257
    c.model.dim = 768
    c.model.num_layers = 12
    c.model.num_heads = 12
    c.model.max_len = 1024
    c.train.batch_size = 256  # 4 micro-batches of 64 per step (docs/experiments.md)
    c.train.grad_accum = 4
    c.train.num_steps = 30000
    c.train.warmup_steps = 2000
    c.train.eval_every = 1000
    c.train.ckpt_every = 1000
    c.sample.eval_steps = (8, 128)
    return apply_variant(c, arg, VARIANTS)
