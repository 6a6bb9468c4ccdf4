"""Experiment 3.2: a TokenFlow distilled by Gumbel reflow from the pretrained GPT-2 (124M) on
FineWeb sample-10BT with the GPT-2 tokenizer, context 1024, 12 layers, 12 heads, dim 768
(non-causal; causal with --config.causal=True).

    python -m discreteflow_jax.main --config=configs/fineweb_gumbel.py:warm --workdir=DIR   # recommended
    python -m discreteflow_jax.main --config=configs/fineweb_gumbel.py --workdir=DIR        # the original's

`:warm` (recommended) starts the student from GPT-2 itself (the 3.2 student has its exact shape), a
logit-channel student with a random flow table, the recipe that won the Shakespeare study
(docs/distill_cpu.md; not trained at FineWeb scale here). Without it, experiment 3.2 as the
original defines it: a cold student with cross-attention conditioning.

The teacher is the Hugging Face `gpt2` checkpoint (downloaded when online); offline, pass a local
HF directory with --config.teacher.hf=DIR and data with --config.data.local_path=FILE_OR_DIR.
Variants: `:cpu` (context 64, small student, the full GPT-2 teacher: the teacher pass dominates,
a few seconds per step on 2 cores) and `:smoke` (seconds, tests; point teacher.hf at a tiny model).
"""

from discreteflow_jax.config.presets import CONTEXT_RECIPE, WARM_GUMBEL_RECIPE, apply_variant, tokenflow_defaults
from discreteflow_jax.tasks.gumbel import add_gumbel_sections

VARIANTS = {
    "cpu": {
        "model.dim": 256, "model.num_layers": 4, "model.num_heads": 4, "model.max_len": 64,
        "data.seq_len": 64, "train.batch_size": 8, "train.grad_accum": 1, "train.num_steps": 300,
        "train.lr": 1e-3, "train.warmup_steps": 50, "train.log_every": 10, "train.eval_every": 100,
        "train.ckpt_every": 100, "train.eval_batches": 2, "data.val_rows": 16,
        # The recipe that reads context (docs/context_ablation.md); `:cpu,original` drops it.
        **CONTEXT_RECIPE,
    },
    # Warm start from GPT-2 (docs/warm_start.md): the student is GPT-2 itself (the 3.2 shape) with a
    # flow space, a time map and the logit channel; `:warm` alone, or after `cpu` / `smoke`.
    "warm": {**WARM_GUMBEL_RECIPE, "model.flow_dim": 64},
    "smoke": {
        "model.dim": 32, "model.num_layers": 2, "model.num_heads": 2, "model.max_len": 32,
        "data.seq_len": 32, "train.batch_size": 4, "train.grad_accum": 1, "train.num_steps": 4,
        "train.warmup_steps": 1, "train.log_every": 2, "train.eval_every": 4, "train.ckpt_every": 4,
        "train.eval_batches": 1, "sample.num_samples": 2, "sample.eval_steps": (2,), "data.val_rows": 4,
        "gumbel.chunk_size": 8,
    },
}


def get_config(arg=None):
    c = add_gumbel_sections(tokenflow_defaults())  # task, gumbel and teacher sections, untied output
    c.data.name = "fineweb"  # HuggingFaceFW/fineweb sample-10BT, streamed (or data.local_path offline)
    c.data.tokenizer = "gpt2"  # the teacher's tokenizer (50257 tokens)
    c.data.seq_len = 1024  # context (GPT-2's maximum)
    c.model.vocab_size = 50257  # must equal the teacher's vocabulary
    c.model.dim = 768  # experiment 3.2, as 3.1 (docs/experiments.md)
    c.model.num_layers = 12  # transformer blocks
    c.model.num_heads = 12  # attention heads
    c.model.max_len = 1024  # >= data.seq_len
    c.gumbel.conditioning = "cross_attention"  # docs/experiments.md
    c.teacher.hf = "gpt2"  # Hugging Face GPT-2 124M, converted to Flax on load
    c.train.batch_size = 256  # as experiment 3.1: 4 micro-batches of 64 per step
    c.train.grad_accum = 4  # micro-batches per step
    c.train.num_steps = 30000  # docs/experiments.md
    c.train.warmup_steps = 2000  # linear warm-up, then cosine decay
    c.train.eval_every = 1000  # validation loss, teacher NLL and samples every N steps
    c.train.ckpt_every = 1000  # checkpoint every N steps
    c.sample.eval_steps = (8, 128)  # K values sampled at each evaluation
    return apply_variant(c, arg, VARIANTS)
