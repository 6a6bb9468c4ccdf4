"""Shared building blocks for the files in ``configs/``: every field with a comment."""

from __future__ import annotations

import ml_collections


def tokenflow_defaults() -> ml_collections.ConfigDict:
    """Experiment 1.1 (TokenFlow baseline on tiny_shakespeare); other configs override fields."""
    c = ml_collections.ConfigDict()
    c.task = "tokenflow"  # tokenflow | teacher | gumbel
    c.seed = 0  # every random stream (init, data order, noise) derives from this
    c.causal = False  # causal attention in the TokenFlow (experiment 1.2 / 3.x causal variants)

    c.data = ml_collections.ConfigDict()
    c.data.name = "shakespeare"  # shakespeare | fineweb
    c.data.tokenizer = "llama"  # llama (32000 pieces) | gpt2 (50257)
    c.data.seq_len = 128  # tokens per training window
    c.data.data_dir = ""  # offline data folder; empty: $DISCRETEFLOW_DATA_DIR, else online sources
    c.data.val_fraction = 0.1  # Shakespeare: last 10% of the tokens are validation
    c.data.fineweb_source = "HuggingFaceFW/fineweb"  # Hub dataset streamed for FineWeb runs
    c.data.fineweb_subset = "sample-10BT"  # its configuration name
    c.data.local_path = ""  # FineWeb offline: a parquet/jsonl file or folder with a `text` column
    c.data.val_rows = 256  # FineWeb: packed rows per process held out for validation

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 32000  # must equal the tokenizer's vocabulary
    c.model.dim = 512  # residual width d
    c.model.num_layers = 8  # transformer blocks
    c.model.num_heads = 8  # attention heads (dim must divide, head size even for RoPE)
    c.model.ffn_hidden = 0  # SwiGLU width; 0 = 8/3·dim rounded to 64; set = dim for the original
    c.model.max_len = 128  # longest sequence the model accepts (>= data.seq_len)
    c.model.tie_embeddings = True  # output logits through the (normalized) embedding matrix
    c.model.embed_scale = 0.0  # embedding row norm / sqrt(dim); 0 = 1/sqrt(dim) (unit rows)
    c.model.noise_scale = 0.0  # σ of the Gaussian source per coordinate; 0 = embed_scale
    c.model.singular_logits = True  # add the analytic log-posterior of the clean token
    c.model.singular_eps = 1e-3  # ε in 2σ²(1−t)²+ε², keeps the singular term finite at t=1
    c.model.fused_singular = True  # fold the singular term into the output matmul (exact, 1/3 fewer FLOPs)
    c.model.time_features = 256  # sinusoidal features of 1000·t
    c.model.rope_theta = 10000.0  # RoPE base
    c.model.cross_attention = False  # cross-attention sub-layers (only Gumbel "cross_attention" needs them)
    c.model.context_dim = 0  # cross-attention context width; 0 = flow_width (flow_dim, or dim when that is 0)
    c.model.dtype = "float32"  # activation dtype: float32 | bfloat16 (params, logits, losses stay fp32)
    c.model.remat = "none"  # none | full | save_dots: recompute block activations in the backward pass
    # Training loss: tokens per chunk (per device) of the fused output-layer + cross-entropy loop, so
    # the [batch, seq, vocab] logits and their gradient are never stored whole (same loss and
    # gradients up to float32 rounding, same FLOPs). 0 = form the full logits (the reference path).
    # 128: at d512/vocab 32000/batch 8×128 smaller chunks save no more memory (measured on the CPU);
    # larger ones mean fewer, bigger matmuls (accelerators) for chunk×vocab floats per buffer.
    c.model.loss_chunk = 128
    # Context levers (docs/context_ablation.md). 0/False everywhere is the original architecture.
    c.model.flow_dim = 0  # width of embeddings, noise and x_t; 0 = dim; smaller adds in/out maps (Plaid)
    c.model.output_modulation = False  # time-dependent shift/scale of the final norm (DiT final layer)
    c.model.self_condition = False  # feed back the previous estimate x̂₁ (training: half the sequences)
    c.model.time_warp_bins = 0  # parameters of the learned time sampler; set automatically for "learned"
    # Warm start (docs/warm_start.md): the network is the teacher's decoder with its weights (needs
    # config.teacher); dim/layers/heads/FFN come from the teacher. Full logits: set loss_chunk=0.
    c.model.warm_start = False
    c.model.warm_attention = "causal"  # causal | gated (learns to read later positions from a zero gate)
    # Initial flow space: "teacher" (principal directions of its embedding: alike tokens start close,
    # median nearest-neighbour cosine 0.99 for the :cpu teacher) | "random" (0.65: easier to denoise;
    # the warm recipe's, docs/distill_cpu.md).
    c.model.warm_flow_init = "teacher"
    c.model.warm_align = 0.0  # > 0: + weight·(1 − cos) to the teacher's last hidden state (logit-channel students)
    c.model.warm_input_topk = 0  # > 0: the input posterior over the k likeliest tokens only (cheaper); 0: all

    c.flow = ml_collections.ConfigDict()
    # uniform (original) | power (u**p, more small t) | logit_normal | learned (CDCD time warping)
    c.flow.time_sampler = "uniform"
    c.flow.time_param = 1.0  # p for power, std for logit_normal
    c.flow.num_buckets = 10  # equal t-buckets for the per-bucket validation loss
    # Conditional training (off by default): this fraction of sequences gets known positions that
    # enter clean and are not scored, so prompting/infilling with condition="clamp" improves.
    c.flow.condition_prob = 0.0
    c.flow.condition_prefix_prob = 0.5  # conditioned sequences: known prefix (else random spans)
    c.flow.condition_span_len = 8  # block length of the random known spans
    # Share of training sequences that draw one flow time per position instead of one per
    # sequence; mixed noise levels teach the network to read its neighbours. 0 = the original.
    c.flow.token_time_prob = 0.0
    # Share of training sequences whose times fall from left to right (t_j = clip((1+w)s − w·j/(T−1)),
    # s ~ U(0, 1), w = stagger_width): the configurations a staggered sampler (sample.stagger) visits.
    c.flow.stagger_prob = 0.0
    c.flow.stagger_width = 1.0

    c.sample = ml_collections.ConfigDict()
    c.sample.steps = 16  # default number of flow steps K
    c.sample.schedule = "uniform"  # time grid: uniform | cosine | power
    c.sample.schedule_param = 2.0  # exponent of the power grid
    c.sample.num_samples = 4  # samples printed/saved at each evaluation
    c.sample.temperature = 1.0  # divides the logits inside the sampler (1 = posterior mean)
    c.sample.eval_steps = (8, 128)  # K values sampled at each evaluation
    c.sample.stagger = 0.0  # > 0: left positions are denoised first (flow.staggered_times); 0 = one t

    c.train = ml_collections.ConfigDict()
    # The full-size setting (docs/experiments.md): 2 micro-batches of 64, i.e. 128 sequences per step.
    c.train.batch_size = 128  # global batch (sequences per optimizer step)
    c.train.grad_accum = 2  # micro-batches per step, accumulated inside the jitted step
    c.train.num_steps = 10000  # optimizer steps
    c.train.lr = 4e-4  # peak learning rate
    c.train.warmup_steps = 1000  # linear warm-up, then cosine decay
    c.train.min_lr_ratio = 0.0  # final lr as a fraction of the peak
    c.train.b1 = 0.9  # AdamW β1
    c.train.b2 = 0.98  # AdamW β2
    c.train.weight_decay = 0.02  # AdamW decay on matrices (not on norms, biases or the embedding)
    c.train.grad_clip = 1.0  # global-norm clipping
    c.train.log_every = 50  # console/metrics line every N steps
    c.train.eval_every = 500  # validation loss and samples every N steps
    c.train.eval_batches = 0  # validation batches per evaluation; 0 = every validation window once
    c.train.ckpt_every = 500  # checkpoint every N steps (and at the end)
    c.train.keep_checkpoints = 3  # keep the newest N checkpoints

    # The autoregressive teacher: Gumbel students distill it; a warm-started student starts from it.
    c.teacher = teacher_section()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size; -1 = all remaining devices
    c.mesh.fsdp = 1  # parameter/optimizer-state sharding axis size
    c.mesh.tensor = 1  # tensor-parallel axis size
    return c


def teacher_section() -> ml_collections.ConfigDict:
    """The ``teacher`` section: which autoregressive model a student learns from (or starts from)."""
    t = ml_collections.ConfigDict()
    t.checkpoint = ""  # workdir of our teacher run (configs/shakespeare_teacher.py); or set hf
    t.step = 0  # which checkpoint of teacher.checkpoint; 0 = its newest
    t.hf = ""  # Hugging Face id (e.g. "gpt2") or local HF directory; or set checkpoint
    t.dtype = "float32"  # teacher compute dtype in the step: float32 | bfloat16 (params stay fp32)
    return t


# The training recipe that reads context (docs/context_ablation.md): the default of every `:cpu`
# variant, and the `:context` variant of the full configs.
CONTEXT_RECIPE: dict = {
    "flow.token_time_prob": 0.5,
    "model.flow_dim": 32,
}
# Warm start from the teacher (docs/warm_start.md): `:cpu,warm`, `:smoke,warm`, and for Gumbel
# students `:cpu,logit_channel,warm`. Needs --config.teacher.checkpoint (or .hf). Samples at
# temperature 1: the recipe is judged without a tuned temperature.
WARM_RECIPE: dict = {
    "model.warm_start": True, "model.loss_chunk": 0, "model.self_condition": False,
    "model.output_modulation": False, "sample.temperature": 1.0, "train.lr": 3e-4,
    # The input posterior over its 64 likeliest tokens: exact at t = 1, and the V-wide input matmul
    # (as large as the output layer's) becomes a gather.
    "model.warm_input_topk": 64,
}
# Warm Gumbel (logit-channel) students: a random flow table. The teacher's principal directions
# pack alike tokens together (nearest-neighbour cosine 0.987), which blurs mid-t inputs: with
# random rows the student's mid-t KL is 4-7x lower and its few-step samples better. The warm
# baseline keeps the teacher's table, whose samples were better (docs/distill_cpu.md).
WARM_GUMBEL_RECIPE: dict = {
    "gumbel.logit_channel": True, "gumbel.conditioning": "none", "model.singular_logits": False,
    **WARM_RECIPE, "model.warm_flow_init": "random",
}
# The original recipe (one uniform t per sequence, embedding width = model width, no
# self-conditioning, no output modulation, sampling at temperature 1 with one t): `:original`, also
# after another variant (`:cpu,original`).
ORIGINAL_RECIPE: dict = {
    "flow.token_time_prob": 0.0, "flow.time_sampler": "uniform", "flow.time_param": 1.0,
    "model.flow_dim": 0, "model.output_modulation": False, "model.self_condition": False,
    "model.time_warp_bins": 0, "flow.stagger_prob": 0.0, "sample.stagger": 0.0, "sample.temperature": 1.0,
}
RECIPE_VARIANTS = {"context": CONTEXT_RECIPE, "original": ORIGINAL_RECIPE}


def apply_variant(
    c: ml_collections.ConfigDict, arg: str | None, variants: dict[str, dict]
) -> ml_collections.ConfigDict:
    """Applies named variants given as {'section.field': value}, comma-separated and in order
    (``cpu,original``). Besides a config's own variants, TokenFlow configs accept the training
    recipes ``context`` and ``original``. Unknown names list the valid ones."""
    if not arg:
        return c
    flow_model = c.get("task", "tokenflow") != "teacher"
    available = dict(variants, **(RECIPE_VARIANTS if flow_model else {}))
    for name in arg.split(","):
        if name not in available:
            raise ValueError(f"unknown config variant {name!r}; valid variants: {', '.join(sorted(available))}")
        set_fields(c, available[name])
    return c


def set_fields(c: ml_collections.ConfigDict, fields: dict[str, object]) -> ml_collections.ConfigDict:
    """Sets {'section.field': value} entries in place and returns the config."""
    for dotted, value in fields.items():
        node = c
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
