"""The TokenFlow model wrapper of the Python API: a trained TokenFlow (baseline or Gumbel) with
its config and tokenizer, sampling (unconditionally, after a prompt, filling a template) and
scoring text with its own flow loss. Programs are compiled once per shape and kept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from discreteflow_jax import flow
from discreteflow_jax import gumbel as gmb
from discreteflow_jax.conditioning import CONDITION_MODES, KNOWN_NOISE, conditional_sample, source_for
from discreteflow_jax.config import ExperimentConfig
from discreteflow_jax.data.tokenizers import Tokenizer
from discreteflow_jax.gumbel_distill import gumbel_distill_loss
from discreteflow_jax.inference.prompts import DEFAULT_BLANK_LENGTH, Known, build_known, text_windows
from discreteflow_jax.inference.teacher_model import TeacherModel
from discreteflow_jax.io.teacher import TeacherBundle, load_teacher
from discreteflow_jax.models.tokenflow import TokenFlow, TokenFlowConfig
from discreteflow_jax.tasks import summarize_flow

log = logging.getLogger(__name__)


def model_config(cfg: ExperimentConfig) -> Any:
    """The TokenFlowConfig the trained module was built with (a Gumbel task derives it from its
    ``gumbel`` section, e.g. cross-attention layers for conditioning="cross_attention")."""
    if cfg.task == "gumbel":
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
    def _program(self, condition: str, known_noise: str, stagger: float, polish_steps: int = 0) -> Callable:
        if (condition, known_noise, stagger, polish_steps) not in self._programs:
            graphdef, prior = self.graphdef, source_for(self.config, known_noise)
            gcfg = self._gumbel_config() if self.kind == "gumbel" else None

            def run(params, key, grid, known_tokens, known_mask, temperature):
                model = nnx.merge(graphdef, params)
                return conditional_sample(model, key, grid, known_tokens, known_mask, source=prior,
                                          temperature=temperature, condition=condition, gumbel=gcfg,
                                          stagger=stagger, polish_steps=polish_steps)

            self._programs[condition, known_noise, stagger, polish_steps] = jax.jit(run)
        return self._programs[condition, known_noise, stagger, polish_steps]

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
        stagger: float | None = None,
        polish_steps: int = 0,
    ) -> np.ndarray:
        """[n, length] sampled token ids (length defaults to the training context).

        Defaults for steps, schedule, temperature and stagger come from the training config's
        ``sample`` section (``stagger`` > 0: left positions are denoised first, see
        ``flow.staggered_times``). Known positions come from ``prompt`` (a prefix), ``template`` (text with blanks)
        or ``known_tokens`` + ``known_mask`` ([length], [1, length] or [n, length]); ``condition``
        is "clamp" or "path" (see ``discreteflow_jax.conditioning``); ``known_noise`` ("posterior" | "prior") is how a
        Gumbel model's noise at known positions is drawn (see ``conditioning.gumbel_prior``). ``polish_steps``
        Jacobi calls follow the flow of a logit-channel Gumbel student (``gumbel_sampling.polish``).
        """
        s = self.config.sample
        steps = s.steps if steps is None else steps
        schedule = s.schedule if schedule is None else schedule
        schedule_param = s.schedule_param if schedule_param is None else schedule_param
        temperature = s.temperature if temperature is None else temperature
        stagger = float(s.stagger if stagger is None else stagger)
        length = self.seq_len if length is None else length
        if n < 1:
            raise ValueError(f"n (the number of samples) must be >= 1, got {n}")
        if not 1 <= length <= self.config.model.max_len:
            raise ValueError(f"length must be in [1, {self.config.model.max_len}] (the model's max_len), got {length}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 <= stagger < float("inf"):
            raise ValueError(f"stagger must be a finite number >= 0 (0 = one time for every position), got {stagger}")
        if condition not in CONDITION_MODES:
            raise ValueError(f"condition must be one of {', '.join(CONDITION_MODES)}, got {condition!r}")
        self.check_polish(polish_steps)
        if stagger > 0 and steps < 1 + stagger:
            # Each position spends a share 1/(1 + w) of the grid on its way: under one step it jumps
            # from noise to data in one call, i.e. takes the argmax of its left context's prediction.
            log.warning("stagger %g with %d steps gives each position %.2f flow steps (< 1): positions are "
                        "decoded greedily from their left context; use steps >= %d for a flow per position",
                        stagger, steps, steps / (1 + stagger), int(np.ceil(2 * (1 + stagger))))
        if known_noise not in KNOWN_NOISE:
            raise ValueError(f"known_noise must be one of {', '.join(KNOWN_NOISE)}, got {known_noise!r}")
        grid = flow.time_grid(steps, schedule, schedule_param)
        known = build_known(self.tokenizer, n, length, prompt=prompt, template=template,
                            known_tokens=known_tokens, known_mask=known_mask, blank_length=blank_length)
        if known is None:
            known = Known(np.zeros((n, length), np.int32), np.zeros((n, length), bool))
        out = self._program(condition, known_noise, stagger, int(polish_steps))(
            self.params, jax.random.key(seed), grid, jnp.asarray(known.tokens), jnp.asarray(known.mask),
            jnp.asarray(temperature, jnp.float32),
        )
        return np.asarray(jax.device_get(out))

    def check_polish(self, polish_steps: int) -> None:
        if isinstance(polish_steps, bool) or not isinstance(polish_steps, (int, np.integer)) or polish_steps < 0:
            raise ValueError(f"polish_steps must be an integer >= 0, got {polish_steps!r}")
        if polish_steps and not (self.kind == "gumbel" and self._gumbel_config().logit_channel):
            raise ValueError(f"polish_steps={polish_steps}: polishing is Jacobi iteration with the Gumbel logit "
                             f"channel's noise; {self.source} is not a logit-channel Gumbel student")

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
        Gumbel noise of the text under its teacher (a logit-channel student: its loss, the KL to the
        teacher's conditional). ``teacher`` is that teacher (a model from
        ``load``, a ``teacher.TeacherBundle``, or a teacher workdir / Hugging Face path); by
        default the one its training config names. Other models take no teacher.
        """

        if self.kind != "gumbel" and teacher is not None:
            raise ValueError(f"teacher= only applies to Gumbel models; this is a {self.kind} model")
        t_module, bos = self._scoring_teacher(teacher) if self.kind == "gumbel" else (None, 0)
        windows, masks = text_windows(self.tokenizer, texts, self.seq_len)
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

                t_model = nnx.merge(t_graphdef, t_state)
                # The student's own objective: the logit channel's is the KL to the teacher's conditional.
                loss = gumbel_distill_loss if gcfg.logit_channel else gmb.gumbel_flow_loss
                sums = loss(model, t_model, tokens, mask, key, gcfg, bos_id=bos, source="data_posterior",
                            num_buckets=nb, t_B=t)[1]
                return {k: sums[k] for k in ("loss_sum", "tokens", "bucket_loss_sum", "bucket_tokens")}

            self._programs["score", t_graphdef, bos] = jax.jit(score_batch)
        sums = None
        for r in range(repeats):
            out = self._programs["score", t_graphdef, bos](self.params, t_state, tokens, mask, bucket,
                                                      jax.random.key(seed + r))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        summary = summarize_flow(jax.device_get(sums), "score", nb)
        return {k.removeprefix("score/"): v for k, v in summary.items()}

    def _gumbel_config(self) -> Any:
        return gmb.parse_gumbel_config(self.config.extra.get("gumbel"))

    def _scoring_teacher(self, teacher: Any) -> tuple[nnx.Module, int]:
        """The teacher module a Gumbel model is scored with, checked against this model up front."""

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
