"""Python API: load a trained model in one call, sample from it (unconditionally, after a prompt,
or filling blanks of a template), and score text.

    import discreteflow_jax as dfj
    model = dfj.load("runs/baseline")            # a workdir (newest checkpoint) or an export
    model.sample(4, steps=32, seed=0)            # four unconditional samples
    model.sample(2, steps=32, prompt="ROMEO:")   # continuations of a prompt
    model.sample(1, steps=32, template="To be or ____ to be")  # infilling

Conditional generation (flow models). The sampler integrates every position, and known positions
are overwritten before each step, in one of two ways (``condition=``):

* ``"clamp"`` (default): known positions are set to their clean embedding ``e_known`` at every
  step, so the network sees them fully from the first step on. This is exactly the input a model
  trained with ``flow.condition_prob > 0`` sees at its known spans.
* ``"path"``: known positions are held on their own noise path, ``x_t = t·e_known + (1−t)·x0``
  with the same x0 the sampler started from: the input distribution of unconditional training,
  but a known token then carries only as much evidence as a noisy position at time t, so free
  positions commit to a continuation before the known tokens can steer them.

Measured (``benchmarks/conditional_toy.py``: counting sequences, V = 11, T = 8, 32 steps, 200
rows; fraction of generated tokens right with 1 / 2 / 4 known positions): the exact posterior of
the data (the best an unconditionally trained model can do) reaches 0.16 / 0.23 / 0.72 with
"path" and 0.76 / 0.99 / 1.00 with "clamp"; a tiny TokenFlow trained with
``flow.condition_prob=0.5`` reaches 0.13 / 0.19 / 0.46 ("path") and 0.52 / 0.81 / 0.95
("clamp"), the same TokenFlow trained without it 0.13 / 0.17 / 0.21 and 0.20 / 0.31 / 0.39.
Either way the returned tokens at known positions are exactly the given ones.

Templates mark each blank with a run of three or more underscores (``BLANK_PATTERN``); every blank
stands for ``blank_length`` tokens (default ``DEFAULT_BLANK_LENGTH``). The template is placed at
the start of the sequence; positions after it are generated freely.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax.config import ConfigError, ExperimentConfig, parse_config
from discreteflow_jax.data.tokenizers import Tokenizer, load_tokenizer
from discreteflow_jax.models.tokenflow import TokenFlow, TokenFlowConfig

BLANK_PATTERN = r"_{3,}"
DEFAULT_BLANK_LENGTH = 4
CONDITION_MODES = ("clamp", "path")
KNOWN_NOISE = ("posterior", "prior")


class LoadError(ValueError):
    """A path that is neither a workdir with a finished checkpoint nor an export directory."""


# ---------------------------------------------------------------------------------------------
# Known positions: prompts, templates, explicit masks (checked before anything compiles)


@dataclasses.dataclass(frozen=True)
class Known:
    """Known tokens and where they are: tokens [B, T] int32, mask [B, T] bool."""

    tokens: np.ndarray
    mask: np.ndarray


def parse_template(template: str, tokenizer: Tokenizer, blank_length: int = DEFAULT_BLANK_LENGTH) -> Known:
    """Token ids and known-mask [1, L] of a template such as ``"To be or ____ to be"``."""
    if blank_length < 1:
        raise ValueError(f"blank_length must be >= 1, got {blank_length}")
    pieces = re.split(BLANK_PATTERN, template)
    if len(pieces) == 1:
        raise ValueError(
            f"the template {template!r} has no blank; mark each gap with three or more underscores, "
            "e.g. 'To be or ____ to be' (or use prompt= for a plain prefix)"
        )
    ids: list[int] = []
    known: list[bool] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            ids += [0] * blank_length
            known += [False] * blank_length
        text = piece.strip()
        if text:
            seg = _encode_segment(tokenizer, text, first=not ids)
            ids += seg
            known += [True] * len(seg)
    return Known(np.asarray([ids], np.int32), np.asarray([known], bool))


def _encode_segment(tokenizer: Tokenizer, text: str, first: bool) -> list[int]:
    # SentencePiece puts a word-start marker before every segment by itself; byte-level BPE (GPT-2)
    # needs the space spelled out or the segment would glue onto the blank before it.
    if tokenizer.name == "gpt2" and not first:
        text = " " + text
    return tokenizer.encode(text)


def build_known(
    tokenizer: Tokenizer,
    n: int,
    length: int,
    *,
    prompt: str | Sequence[int] | None = None,
    template: str | None = None,
    known_tokens: Any = None,
    known_mask: Any = None,
    blank_length: int = DEFAULT_BLANK_LENGTH,
) -> Known | None:
    """Turns one of prompt / template / (known_tokens, known_mask) into [n, length] arrays.

    Raises ValueError with a readable message for every inconsistent request; returns None when
    nothing is known (unconditional sampling).
    """
    given = [name for name, v in (("prompt", prompt), ("template", template), ("known_tokens", known_tokens))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of prompt, template and known_tokens/known_mask (got {', '.join(given)})")
    if known_mask is not None and known_tokens is None:
        raise ValueError("known_mask needs known_tokens")
    if not given:
        return None
    if prompt is not None:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= length:
            raise ValueError(
                f"the prompt is {len(ids)} tokens long but the model generates {length} tokens "
                f"(its context); use a prompt shorter than {length} tokens"
            )
        tokens = np.zeros((1, length), np.int32)
        tokens[0, : len(ids)] = ids
        mask = np.zeros((1, length), bool)
        mask[0, : len(ids)] = True
        return Known(np.repeat(tokens, n, 0), np.repeat(mask, n, 0))
    if template is not None:
        parsed = parse_template(template, tokenizer, blank_length)
        size = parsed.tokens.shape[1]
        if size > length:
            raise ValueError(
                f"the template is {size} tokens long (blanks included) but the model generates {length} "
                "tokens (its context); shorten the template or the blanks"
            )
        tokens = np.zeros((1, length), np.int32)
        mask = np.zeros((1, length), bool)
        tokens[:, :size], mask[:, :size] = parsed.tokens, parsed.mask
        return Known(np.repeat(tokens, n, 0), np.repeat(mask, n, 0))
    tokens = np.asarray(known_tokens)
    if known_mask is None:
        raise ValueError("known_tokens needs known_mask (True where the token is given)")
    mask = np.asarray(known_mask)
    if tokens.shape != mask.shape:
        raise ValueError(f"known_tokens has shape {tokens.shape} but known_mask has shape {mask.shape}")
    if tokens.ndim == 1:
        tokens, mask = tokens[None], mask[None]
    if tokens.ndim != 2 or tokens.shape[1] != length or tokens.shape[0] not in (1, n):
        raise ValueError(
            f"known_tokens/known_mask must have shape [{length}], [1, {length}] or [{n}, {length}] "
            f"(n samples × the model's {length} positions), got {tuple(np.asarray(known_tokens).shape)}"
        )
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"known_tokens must be integer token ids, got dtype {tokens.dtype}")
    if mask.dtype != bool:
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError("known_mask must be boolean (or 0/1)")
        mask = mask.astype(bool)
    vocab = tokenizer.vocab_size
    if np.any(mask & ((tokens < 0) | (tokens >= vocab))):
        raise ValueError(f"known_tokens has ids outside the vocabulary [0, {vocab})")
    tokens = np.where(mask, tokens, 0).astype(np.int32)
    if tokens.shape[0] == 1:
        tokens, mask = np.repeat(tokens, n, 0), np.repeat(mask, n, 0)
    return Known(tokens, mask)


# ---------------------------------------------------------------------------------------------
# Flow sampling with known positions (pure; jitted by the model classes)


# source(key, model, known_tokens [B, T], known_mask [B, T]) -> (x0 [B, T, d], context or None)
SourceFn = Callable[[jax.Array, TokenFlow, jax.Array, jax.Array], tuple[jax.Array, jax.Array | None]]


def gaussian_prior(key: jax.Array, model: TokenFlow, known_tokens: jax.Array, known_mask: jax.Array
                   ) -> tuple[jax.Array, None]:
    """The baseline source: x0 ~ N(0, σ²I), no context (the known tokens do not change it)."""
    b, seq_len = known_tokens.shape
    return flow.gaussian_source(key, b, seq_len, model), None


def gumbel_prior(gumbel_section: dict | None, known_noise: str = "posterior") -> SourceFn:
    """The source of a Gumbel student: G from the prior, reduced to (x0, context) as in training.

    With ``known_noise="posterior"`` the noise at known positions is drawn from the exact
    posterior given that the known token won the Gumbel argmax under a flat teacher (ℓ uniform),
    so the noise the student reads agrees with the tokens it is told; ``"prior"`` keeps plain
    prior noise there. With no known position both equal ``gumbel.gumbel_source`` exactly (same
    keys, same draws).
    """
    from discreteflow_jax import gumbel as gmb  # only Gumbel models need it

    if known_noise not in KNOWN_NOISE:
        raise ValueError(f"known_noise must be one of {', '.join(KNOWN_NOISE)}, got {known_noise!r}")
    gcfg = gmb.parse_gumbel_config(gumbel_section)

    def source(key: jax.Array, model: TokenFlow, known_tokens: jax.Array, known_mask: jax.Array
               ) -> tuple[jax.Array, jax.Array | None]:
        b, seq_len = known_tokens.shape
        if known_noise == "prior":
            return gmb.gumbel_source(model, key, b, seq_len, gcfg)
        g_key, x0_key = jax.random.split(key)  # the split gumbel_source makes
        emb = model.embeddings()
        vocab = emb.shape[0]
        chunk = gmb.resolve_chunk(seq_len, b, vocab, gcfg.chunk_size)
        flat_logp = jnp.full((b, chunk, vocab), -jnp.log(float(vocab)), jnp.float32)

        def noise_fn(start: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
            xi, m = gmb.chunk_draws(g_key, positions, b, vocab)
            tok = jax.lax.dynamic_slice_in_dim(known_tokens, start, chunk, axis=1)
            known = jax.lax.dynamic_slice_in_dim(known_mask, start, chunk, axis=1)
            post = gmb.posterior_from_draws(flat_logp, tok, xi, m)
            g = jnp.where(known[..., None], post, xi)
            return gcfg.sample_temperature * g, jnp.zeros((b, chunk), jnp.float32)

        ctx = gmb.chunked_context(noise_fn, emb, seq_len=seq_len, chunk=chunk, tau=gcfg.tau, remat=False)[0]
        x0, context = gmb.student_inputs(model, ctx, gcfg)
        if x0 is None:
            x0 = flow.gaussian_source(x0_key, b, seq_len, model)
        return x0, context

    return source


def conditional_sample(
    model: TokenFlow,
    key: jax.Array,
    grid: jax.Array,
    known_tokens_BT: jax.Array,
    known_mask_BT: jax.Array,
    *,
    source: SourceFn = gaussian_prior,
    temperature: jax.Array | float = 1.0,
    condition: str = "clamp",
) -> jax.Array:
    """Samples [B, T] tokens; positions where ``known_mask_BT`` is True are held (see the module
    docstring for ``condition``) and returned unchanged. An all-False mask is plain sampling."""
    if condition not in CONDITION_MODES:
        raise ValueError(f"condition must be one of {CONDITION_MODES}, got {condition!r}")
    x0, context = source(key, model, known_tokens_BT, known_mask_BT)
    e_known = model.embed(known_tokens_BT)
    mask = known_mask_BT[..., None]

    def clamp(x: jax.Array, t: jax.Array) -> jax.Array:
        target = e_known if condition == "clamp" else t * e_known + (1.0 - t) * x0
        return jnp.where(mask, target, x)

    tokens, _ = flow.sample_flow(model, x0, grid, context=context, temperature=temperature, clamp_fn=clamp)
    return jnp.where(known_mask_BT, known_tokens_BT, tokens)


# ---------------------------------------------------------------------------------------------
# Loaded models


def _source_for(cfg: ExperimentConfig, known_noise: str = "posterior") -> SourceFn:
    """How a task draws (x0, context) at sampling time; Gumbel models use their Gumbel prior."""
    if cfg.task == "gumbel":
        return gumbel_prior(cfg.extra.get("gumbel"), known_noise)
    return gaussian_prior


def model_config(cfg: ExperimentConfig) -> Any:
    """The TokenFlowConfig the trained module was built with (a Gumbel task derives it from its
    ``gumbel`` section, e.g. cross-attention layers for conditioning="cross_attention")."""
    if cfg.task == "gumbel":
        from discreteflow_jax import gumbel as gmb

        return gmb.student_config(cfg.model, gmb.parse_gumbel_config(cfg.extra.get("gumbel")))
    return cfg.model


class TokenFlowModel:
    """A trained TokenFlow (baseline or Gumbel) with its config and tokenizer.

    ``config`` is the ExperimentConfig the model was trained with (``config.raw`` is the plain
    dict). Parameters live on the default device; programs are compiled once per shape.
    """

    kind = "tokenflow"

    def __init__(self, cfg: ExperimentConfig, graphdef: Any, params: Any, tokenizer: Tokenizer, source: str,
                 step: int | None = None):
        self.config = cfg
        self.graphdef = graphdef
        self.params = params
        self.tokenizer = tokenizer
        self.source = source
        self.step = step
        self._programs: dict[Any, Callable] = {}
        if cfg.task == "gumbel":
            self.kind = "gumbel"

    def __repr__(self) -> str:
        m = self.config.model
        return (f"TokenFlowModel(kind={self.kind!r}, source={self.source!r}, step={self.step}, dim={m.dim}, "
                f"layers={m.num_layers}, causal={m.causal}, seq_len={self.seq_len})")

    @property
    def seq_len(self) -> int:
        return self.config.data.seq_len

    @property
    def sample_length(self) -> int:
        """Tokens one sample has by default: the training context."""
        return self.seq_len

    @property
    def architecture(self) -> TokenFlowConfig:
        """The module's config (for Gumbel models it includes what the gumbel section derives)."""
        return model_config(self.config)

    def model(self) -> TokenFlow:
        return nnx.merge(self.graphdef, self.params)

    # -- sampling ----------------------------------------------------------------------------
    def _program(self, condition: str, known_noise: str) -> Callable:
        if (condition, known_noise) not in self._programs:
            graphdef, prior = self.graphdef, _source_for(self.config, known_noise)

            def run(params, key, grid, known_tokens, known_mask, temperature):
                model = nnx.merge(graphdef, params)
                return conditional_sample(model, key, grid, known_tokens, known_mask, source=prior,
                                          temperature=temperature, condition=condition)

            self._programs[condition, known_noise] = jax.jit(run)
        return self._programs[condition, known_noise]

    def sample_tokens(
        self,
        n: int,
        steps: int | None = None,
        seed: int = 0,
        *,
        schedule: str | None = None,
        schedule_param: float | None = None,
        temperature: float | None = None,
        prompt: str | Sequence[int] | None = None,
        template: str | None = None,
        known_tokens: Any = None,
        known_mask: Any = None,
        blank_length: int = DEFAULT_BLANK_LENGTH,
        condition: str = "clamp",
        known_noise: str = "posterior",
        length: int | None = None,
    ) -> np.ndarray:
        """[n, length] sampled token ids (length defaults to the training context).

        Defaults for steps, schedule and temperature come from the training config's ``sample``
        section. Known positions come from ``prompt`` (a prefix), ``template`` (text with blanks)
        or ``known_tokens`` + ``known_mask`` ([length], [1, length] or [n, length]); ``condition``
        is "path" or "clamp" (module docstring); ``known_noise`` ("posterior" | "prior") is how a
        Gumbel model's noise at known positions is drawn (see ``gumbel_prior``).
        """
        s = self.config.sample
        steps = s.steps if steps is None else steps
        schedule = s.schedule if schedule is None else schedule
        schedule_param = s.schedule_param if schedule_param is None else schedule_param
        temperature = s.temperature if temperature is None else temperature
        length = self.seq_len if length is None else length
        if n < 1:
            raise ValueError(f"n (the number of samples) must be >= 1, got {n}")
        if not 1 <= length <= self.config.model.max_len:
            raise ValueError(f"length must be in [1, {self.config.model.max_len}] (the model's max_len), got {length}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if condition not in CONDITION_MODES:
            raise ValueError(f"condition must be one of {', '.join(CONDITION_MODES)}, got {condition!r}")
        if known_noise not in KNOWN_NOISE:
            raise ValueError(f"known_noise must be one of {', '.join(KNOWN_NOISE)}, got {known_noise!r}")
        grid = flow.time_grid(steps, schedule, schedule_param)
        known = build_known(self.tokenizer, n, length, prompt=prompt, template=template,
                            known_tokens=known_tokens, known_mask=known_mask, blank_length=blank_length)
        if known is None:
            known = Known(np.zeros((n, length), np.int32), np.zeros((n, length), bool))
        out = self._program(condition, known_noise)(
            self.params, jax.random.key(seed), grid, jnp.asarray(known.tokens), jnp.asarray(known.mask),
            jnp.asarray(temperature, jnp.float32),
        )
        return np.asarray(jax.device_get(out))

    def sample(self, n: int, steps: int | None = None, seed: int = 0, **kwargs: Any) -> list[str]:
        """``n`` texts (each up to its first EOS); keyword arguments as in ``sample_tokens``."""
        tokens = self.sample_tokens(n, steps, seed, **kwargs)
        return [self.tokenizer.decode_until_eos(row) for row in tokens]

    # -- scoring -----------------------------------------------------------------------------
    def score(self, texts: Sequence[str], *, seed: int = 0, repeats: int = 1, teacher: Any = None
              ) -> dict[str, float]:
        """Flow loss of the given texts: the mean and one value per t-bucket.

        Each text is cut into windows of the training length (the last one padded and masked),
        and every window is scored once in every t-bucket (at a random time inside it), so each
        bucket sees all the text; ``repeats`` > 1 averages over more noise draws.

        A Gumbel model is scored with its own source, as in its validation: the exact posterior
        Gumbel noise of the text under its teacher. ``teacher`` is that teacher (a model from
        ``load``, a ``teacher.TeacherBundle``, or a teacher workdir / Hugging Face path); by
        default the one its training config names. Other models take no teacher.
        """
        from discreteflow_jax.tasks import summarize_flow

        if self.kind != "gumbel" and teacher is not None:
            raise ValueError(f"teacher= only applies to Gumbel models; this is a {self.kind} model")
        t_module, bos = self._scoring_teacher(teacher) if self.kind == "gumbel" else (None, 0)
        windows, masks = _windows(self.tokenizer, texts, self.seq_len)
        nb = self.config.flow.num_buckets
        tokens = jnp.asarray(np.repeat(windows, nb, axis=0))
        mask = jnp.asarray(np.repeat(masks, nb, axis=0))
        bucket = jnp.tile(jnp.arange(nb, dtype=jnp.float32), windows.shape[0])
        t_graphdef, t_state = nnx.split(t_module) if t_module is not None else (None, None)
        if ("score", t_graphdef, bos) not in self._programs:  # compiled once per number of windows
            graphdef = self.graphdef
            gcfg = self._gumbel_config() if t_module is not None else None

            def score_batch(params, t_state, tokens, mask, bucket, key):
                model = nnx.merge(graphdef, params)
                t = (bucket + jax.random.uniform(jax.random.fold_in(key, 1), bucket.shape)) / nb
                if t_state is None:
                    return flow.flow_loss(model, tokens, mask, key, num_buckets=nb, t_B=t)[1]
                from discreteflow_jax import gumbel as gmb

                t_model = nnx.merge(t_graphdef, t_state)
                sums = gmb.gumbel_flow_loss(model, t_model, tokens, mask, key, gcfg, bos_id=bos,
                                            source="data_posterior", num_buckets=nb, t_B=t)[1]
                return {k: v for k, v in sums.items() if k != "teacher_nll_sum"}

            self._programs["score", t_graphdef, bos] = jax.jit(score_batch)
        sums = None
        for r in range(repeats):
            out = self._programs["score", t_graphdef, bos](self.params, t_state, tokens, mask, bucket,
                                                      jax.random.key(seed + r))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        summary = summarize_flow(jax.device_get(sums), "score", nb)
        return {k.removeprefix("score/"): v for k, v in summary.items()}

    def _gumbel_config(self) -> Any:
        from discreteflow_jax import gumbel as gmb

        return gmb.parse_gumbel_config(self.config.extra.get("gumbel"))

    def _scoring_teacher(self, teacher: Any) -> tuple[nnx.Module, int]:
        """The teacher module a Gumbel model is scored with, checked against this model up front."""
        from discreteflow_jax.tasks.teacher import TeacherBundle, load_teacher

        section = dict(self.config.extra.get("teacher") or {})
        how = ("pass teacher= (the teacher it was distilled from: a model from discreteflow_jax.load(TEACHER_WORKDIR), "
               "a teacher workdir or a Hugging Face GPT-2/LLaMA directory)")
        try:
            if teacher is None:
                bundle = load_teacher(section)
            elif isinstance(teacher, str):
                is_workdir = os.path.isdir(os.path.join(os.path.expanduser(teacher), "checkpoints"))
                bundle = load_teacher({"checkpoint": teacher} if is_workdir else {"hf": teacher})
            else:
                bundle = teacher
        except Exception as e:
            named = section.get("checkpoint") or section.get("hf") or "none"
            raise ValueError(
                f"a Gumbel model is scored with its own source, the posterior Gumbel noise of the text under its "
                f"teacher, and its training teacher ({named}) could not be loaded ({type(e).__name__}: {e}); {how}"
            ) from e
        if isinstance(bundle, TeacherBundle):
            module, bos = bundle.model(), bundle.bos_id
        elif isinstance(bundle, TeacherModel):
            module, bos = bundle.module, bundle.bos_id
        else:
            raise ValueError(f"teacher={type(teacher).__name__} is not a teacher model; {how}")
        vocab = self.config.model.vocab_size
        if module.config.vocab_size != vocab:
            raise ValueError(f"the teacher has a vocabulary of {module.config.vocab_size} tokens but this model "
                             f"{vocab}; {how}")
        if module.config.max_len < self.seq_len or bos is None or not 0 <= int(bos) < vocab:
            raise ValueError(f"the teacher must handle {self.seq_len} tokens and have a valid BOS id; {how}")
        return module, int(bos)

    def gen_ppl(self, texts: Sequence[str], teacher: Any, **kwargs: Any) -> Any:
        return _gen_ppl(texts, teacher, self.tokenizer, **kwargs)


def _windows(tokenizer: Tokenizer, texts: Sequence[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(texts, str):
        texts = [texts]
    rows, masks = [], []
    for ids in tokenizer.encode_batch(list(texts)):
        for start in range(0, max(len(ids), 1), seq_len):
            chunk = ids[start : start + seq_len]
            rows.append(chunk + [tokenizer.pad_id] * (seq_len - len(chunk)))
            masks.append([1.0] * len(chunk) + [0.0] * (seq_len - len(chunk)))
    if not rows or not any(any(m) for m in masks):
        raise ValueError("nothing to score: the texts are empty")
    return np.asarray(rows, np.int32), np.asarray(masks, np.float32)


def _gen_ppl(texts: Sequence[str], teacher: Any, tokenizer: Tokenizer, **kwargs: Any) -> Any:
    try:
        from discreteflow_jax import evaluate
    except ImportError as e:
        raise NotImplementedError("Gen-PPL needs discreteflow_jax.evaluate, which is not available") from e
    fn = getattr(evaluate, "gen_ppl", None)
    if fn is None:
        raise NotImplementedError("discreteflow_jax.evaluate has no gen_ppl function")
    return fn(texts, teacher, tokenizer=tokenizer, **kwargs)


class TeacherModel:
    """A trained autoregressive LLaMA teacher (ours, or an exported one)."""

    kind = "llama"

    def __init__(self, cfg: ExperimentConfig | None, model: nnx.Module, tokenizer: Tokenizer, source: str,
                 step: int | None = None):
        self.config = cfg
        self.module = model
        self.tokenizer = tokenizer
        self.source = source
        self.step = step
        self._score: Callable | None = None
        mc = model.config
        self.bos_id = mc.bos_id if mc.bos_id is not None else tokenizer.bos_id
        self.eos_id = mc.eos_id if mc.eos_id is not None else tokenizer.eos_id

    def __repr__(self) -> str:
        return f"TeacherModel(source={self.source!r}, step={self.step}, max_len={self.module.config.max_len})"

    @property
    def seq_len(self) -> int:
        return self.config.data.seq_len if self.config is not None else self.module.config.max_len - 1

    @property
    def sample_length(self) -> int:
        """Tokens one sample has by default: the training context, less the KV-cache slot BOS takes."""
        return min(self.seq_len, self.module.config.max_len - 1)

    def model(self) -> nnx.Module:
        return self.module

    def sample_tokens(
        self,
        n: int,
        steps: int | None = None,
        seed: int = 0,
        *,
        temperature: float | None = None,
        prompt: str | Sequence[int] | None = None,
        template: str | None = None,
        known_tokens: Any = None,
        known_mask: Any = None,
        length: int | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        **unused: Any,
    ) -> np.ndarray:
        """[n, length] ids: the prompt (if any) followed by sampled tokens (after EOS: EOS).
        ``steps`` is ignored: generation takes one model call per token."""
        from discreteflow_jax.models.generate import generate

        del steps, unused
        if template is not None or known_tokens is not None or known_mask is not None:
            raise ValueError("an autoregressive teacher only continues a prefix: use prompt=, not a template or mask")
        length = self.sample_length if length is None else length
        max_len = self.module.config.max_len
        if not 1 <= length <= max_len - 1:
            raise ValueError(f"length must be in [1, {max_len - 1}] (max_len minus the BOS slot), got {length}")
        ids: list[int] = []
        if prompt is not None:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
            if len(ids) >= length:
                raise ValueError(f"the prompt is {len(ids)} tokens long; use one shorter than {length} tokens")
        temperature = 1.0 if temperature is None else temperature
        prompt_arr = jnp.asarray([[self.bos_id] + ids] * n, jnp.int32)
        out = generate(self.module, prompt_arr, max_new_tokens=length - len(ids), rng=jax.random.key(seed),
                       temperature=temperature, top_k=top_k, top_p=top_p, eos_id=self.eos_id)
        new = np.asarray(jax.device_get(out.tokens))
        return np.concatenate([np.asarray(prompt_arr)[:, 1:], new], axis=1).astype(np.int32)

    def sample(self, n: int, steps: int | None = None, seed: int = 0, **kwargs: Any) -> list[str]:
        tokens = self.sample_tokens(n, steps, seed, **kwargs)
        return [self.tokenizer.decode_until_eos(row) for row in tokens]

    def continue_rows(self, prefixes: Sequence[Sequence[int]], length: int, seed: int = 0, *,
                      temperature: float | None = None, top_k: int = 0, top_p: float = 1.0,
                      **unused: Any) -> np.ndarray:
        """[B, length]: each prefix (ids, BOS added here) followed by sampled tokens, in one batch."""
        from discreteflow_jax.models.generate import generate

        del unused
        shortest = min(len(p) for p in prefixes)
        if length > self.module.config.max_len - 1:
            raise ValueError(f"length must be <= {self.module.config.max_len - 1} (max_len minus the BOS slot)")
        width = 1 + max(len(p) for p in prefixes)
        prompt = np.zeros((len(prefixes), width), np.int32)
        mask = np.zeros((len(prefixes), width), bool)
        for j, p in enumerate(prefixes):
            prompt[j, : 1 + len(p)] = [self.bos_id, *p]
            mask[j, : 1 + len(p)] = True
        # Right-padded prompts are re-aligned inside generate, so every row gets the same number of
        # new tokens; enough for the shortest prefix, and longer rows are cut back to ``length``.
        out = generate(self.module, jnp.asarray(prompt), jnp.asarray(mask), max_new_tokens=length - shortest,
                       rng=jax.random.key(seed), temperature=1.0 if temperature is None else temperature,
                       top_k=top_k, top_p=top_p, eos_id=self.eos_id)
        new = np.asarray(jax.device_get(out.tokens))
        rows = np.zeros((len(prefixes), length), np.int32)
        for j, p in enumerate(prefixes):
            rows[j, : len(p)] = p
            rows[j, len(p) :] = new[j, : length - len(p)]
        return rows

    def score(self, texts: Sequence[str]) -> dict[str, float]:
        """Next-token loss and perplexity of the texts (windows of the context, BOS first)."""
        from discreteflow_jax.flow import cross_entropy
        from discreteflow_jax.tasks.teacher import teacher_inputs

        windows, masks = _windows(self.tokenizer, texts, self.seq_len)
        if self._score is None:  # one compiled program instead of one per eager op
            graphdef, state = nnx.split(self.module)
            bos = self.bos_id

            def token_nll(state, tokens):
                logits = nnx.merge(graphdef, state)(teacher_inputs(tokens, bos))
                return cross_entropy(logits, tokens)

            self._score = functools.partial(jax.jit(token_nll), state)
        nll = np.asarray(self._score(jnp.asarray(windows)))
        loss = float((nll * masks).sum() / masks.sum())
        return {"loss": loss, "ppl": float(np.exp(min(loss, 50.0)))}

    def gen_ppl(self, texts: Sequence[str], teacher: Any, **kwargs: Any) -> Any:
        return _gen_ppl(texts, teacher, self.tokenizer, **kwargs)


# ---------------------------------------------------------------------------------------------
# Continuations of given prefixes (the conditional-generation sweep)


def continue_prefixes(
    model: TokenFlowModel | TeacherModel,
    prefixes: Sequence[str] | Sequence[Sequence[int]],
    steps: Sequence[int] = (1, 4, 16, 128),
    *,
    seed: int = 0,
    length: int | None = None,
    batch_size: int = 64,
    return_tokens: bool = False,
    **sample_kwargs: Any,
) -> dict[int, list[str]] | dict[int, list[np.ndarray]]:
    """Continuations of each prefix (text, or token ids such as real validation windows cut short)
    for every number of steps K: ``{K: [continuation of prefix 0, ...]}``.

    A sample is ``length`` tokens (default: the training context) with the prefix held at its
    start; the continuation is what follows the prefix, decoded up to its first EOS (or, with
    ``return_tokens``, its ids). Rows are sampled ``batch_size`` at a time, each batch with a seed
    derived from ``seed`` and its first row, so keep ``batch_size`` fixed when comparing runs.
    Teachers ignore K (one model call per token) and return the same continuations for every K.
    Extra keyword arguments (``condition``, ``temperature``, ``schedule``) go to ``sample_tokens``.
    """
    length = model.sample_length if length is None else length
    ids = [model.tokenizer.encode(p) if isinstance(p, str) else [int(i) for i in p] for p in prefixes]
    for i, row in enumerate(ids):
        if not row or len(row) >= length:
            raise ValueError(f"prefix {i} is {len(row)} tokens long; each prefix needs 1 to {length - 1} tokens")
    out: dict[int, list] = {}
    for k in steps:
        results: list = []
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            tokens = np.zeros((len(chunk), length), np.int32)
            mask = np.zeros((len(chunk), length), bool)
            for j, row in enumerate(chunk):
                tokens[j, : len(row)], mask[j, : len(row)] = row, True
            seed_k = seed + start
            if isinstance(model, TeacherModel):
                sampled = model.continue_rows(chunk, length, seed_k, **sample_kwargs)
            else:
                sampled = model.sample_tokens(len(chunk), k, seed_k, known_tokens=tokens, known_mask=mask,
                                              length=length, **sample_kwargs)
            for j, row in enumerate(chunk):
                cont = np.asarray(sampled[j, len(row) :])
                results.append(cont if return_tokens else model.tokenizer.decode_until_eos(cont))
        out[int(k)] = results
    return out


# ---------------------------------------------------------------------------------------------
# load()


def load(path: str, data_dir: str | None = None, *, step: int | None = None) -> TokenFlowModel | TeacherModel:
    """Loads a trained model from a workdir (its newest checkpoint, or ``step``) or an export
    directory (``python -m discreteflow_jax.export``). ``data_dir`` is where tokenizer files are
    looked up when the export does not carry them (see ``discreteflow_jax.data``)."""
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        raise LoadError(f"{path} does not exist or is not a directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return _load_workdir(path, data_dir, step)
    from discreteflow_jax import export

    missing = [f for f in export.REQUIRED_FILES if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise LoadError(
            f"{path} is neither a training workdir (no checkpoints/ folder) nor an export: missing "
            f"{', '.join(missing)}. Export a workdir with `python -m discreteflow_jax.export --workdir=DIR --out=DIR`."
        )
    return export.load_export(path, data_dir)


def _config_from_raw(raw: dict) -> ExperimentConfig:
    return parse_config(ml_collections.ConfigDict(raw))


def tokenizer_folder(cfg: ExperimentConfig, data_dir: str | None, source: str | None = None) -> str | None:
    """Where a model's tokenizer loads from: the caller's ``data_dir``; else the copy a workdir or
    an export carries; else the training config's data folder (or $DISCRETEFLOW_DATA_DIR / the Hub)."""
    from discreteflow_jax.data.tokenizers import WORKDIR_TOKENIZER, has_tokenizer_files

    if data_dir:
        return data_dir
    if source and "://" not in str(source):
        for folder in (os.path.join(source, WORKDIR_TOKENIZER), source):
            if has_tokenizer_files(cfg.data.tokenizer, folder):
                return folder
    return cfg.data.data_dir or None


def _tokenizer_for(cfg: ExperimentConfig, data_dir: str | None, source: str | None = None) -> Tokenizer:
    return load_tokenizer(cfg.data.tokenizer, tokenizer_folder(cfg, data_dir, source))


def abstract_tokenflow(cfg: ExperimentConfig) -> tuple[Any, Any]:
    """(graphdef, abstract pure-dict params) of the TokenFlow a config describes; nothing allocated."""
    model_cfg = model_config(cfg)
    abstract = nnx.eval_shape(lambda: TokenFlow(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(state)


def _restore_tokenflow_params(mngr: Any, step: int, cfg: ExperimentConfig, abstract_params: Any) -> Any:
    """Parameters of one checkpoint step on the default device (CheckpointDamagedError when it
    does not read)."""
    from discreteflow_jax.io import checkpoint as ckpt
    from discreteflow_jax.training.trainer import TrainState, make_optimizer

    tx = make_optimizer(cfg.train)
    abstract_state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), abstract_params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state)
    return ckpt.guarded(mngr, step, lambda: ckpt.restore(mngr, step, target))[0].params


def _load_workdir(workdir: str, data_dir: str | None, step: int | None) -> TokenFlowModel | TeacherModel:
    """The model of ``step``, or of the newest checkpoint that loads: a damaged newer one is
    reported (logged) and left in place; a damaged ``step`` raises, naming the steps that load."""
    from discreteflow_jax.io import checkpoint as ckpt

    mngr = ckpt.manager(workdir, keep=1000, async_save=False)
    try:
        if not mngr.all_steps():
            raise LoadError(f"{os.path.join(workdir, 'checkpoints')} holds no finished checkpoint yet")

        def load_step(s: int) -> tuple[ExperimentConfig, Any]:
            meta = ckpt.guarded(mngr, s, lambda: ckpt.read_meta(mngr, s))
            if not isinstance(meta.get("config"), dict):
                raise ckpt.damaged(mngr, s, "its metadata carries no config")
            cfg = _config_from_raw(meta["config"])
            if cfg.task == "teacher":
                from discreteflow_jax.tasks.teacher import restore_teacher_step

                return cfg, restore_teacher_step(mngr, workdir, s)
            ckpt.verify(mngr, s)
            graphdef, abstract_params = abstract_tokenflow(cfg)
            return cfg, (graphdef, _restore_tokenflow_params(mngr, s, cfg, abstract_params))

        (cfg, loaded), step, _ = ckpt.select(mngr, load_step, step=step, how="step={} (--step={} on the command line)")
    finally:
        mngr.close()
    tokenizer = _tokenizer_for(cfg, data_dir, workdir)
    if cfg.task == "teacher":
        return TeacherModel(cfg, loaded.model(), tokenizer, workdir, step)
    graphdef, params = loaded
    return TokenFlowModel(cfg, graphdef, params, tokenizer, workdir, step)


__all__ = [
    "BLANK_PATTERN",
    "CONDITION_MODES",
    "ConfigError",
    "DEFAULT_BLANK_LENGTH",
    "Known",
    "LoadError",
    "TeacherModel",
    "TokenFlowModel",
    "build_known",
    "conditional_sample",
    "continue_prefixes",
    "load",
    "parse_template",
]
