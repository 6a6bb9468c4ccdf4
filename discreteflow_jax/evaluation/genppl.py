"""Generative perplexity (Gen-PPL) of samples under an autoregressive scoring model, in fp32.

Gen-PPL = exp(total NLL / total scored tokens). Each sample is cut at its first EOS (the EOS and
everything after it are not scored). When the sampler and the scorer share a tokenizer, the token
ids are scored directly; otherwise the text is re-tokenized with the scorer's tokenizer. The
scorer reads ``[BOS] + ids[:-1]`` and predicts every id (the teacher convention); a sample longer
than the scorer's context is scored in consecutive windows, each starting again from BOS. These
are the conventions of the diffusion/flow LM literature, so numbers are comparable.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from discreteflow_jax.data.tokenizers import Tokenizer, load_tokenizer
from discreteflow_jax.evaluation.metrics import truncate_at_eos
from discreteflow_jax.flow import cross_entropy
from discreteflow_jax.inference.load import load
from discreteflow_jax.inference.teacher_model import TeacherModel
from discreteflow_jax.io.export_format import is_export
from discreteflow_jax.io.hf import load_hf_checkpoint
from discreteflow_jax.models.gpt2 import GPT2


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return a.name == b.name and a.vocab_size == b.vocab_size


def _fp32_module(module: nnx.Module) -> tuple[Any, Any]:
    """(graphdef, params) of ``module`` rebuilt with an fp32 compute dtype (parameters are fp32 already)."""
    config = module.config
    graphdef, params = nnx.split(module)
    if getattr(config, "dtype", "float32") != "float32":
        fp32 = dataclasses.replace(config, dtype="float32")
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(module)(fp32, rngs=nnx.Rngs(0))))
    return graphdef, params


class Scorer:
    """An autoregressive LM that scores token sequences in fp32 (Gen-PPL).

    ``module`` is a ``Llama`` or ``GPT2`` (``__call__(tokens) -> logits`` and ``config.max_len``),
    ``tokenizer`` the tokenizer it was trained with, ``bos_id`` what it reads before the first token.
    """

    def __init__(self, module: nnx.Module, tokenizer: Tokenizer, *, bos_id: int, name: str = "scorer",
                 batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.bos_id = int(bos_id)
        self.name = name
        self.batch_size = batch_size
        self.max_len = int(module.config.max_len)
        self.vocab_size = int(module.config.vocab_size)
        self.graphdef, self.params = _fp32_module(module)
        graphdef = self.graphdef

        def row_nll(params, inputs_BT, targets_BT, mask_BT):
            logits = nnx.merge(graphdef, params)(inputs_BT)
            return jnp.sum(cross_entropy(logits, targets_BT) * mask_BT, axis=-1)

        self._row_nll = jax.jit(row_nll)

        def position_features(params, inputs_BT):
            module = nnx.merge(graphdef, params)
            norm = module.ln_f if hasattr(module, "ln_f") else module.final_norm
            return norm(module.hidden(inputs_BT)).astype(jnp.float32)

        self._position_features = jax.jit(position_features)

    def __repr__(self) -> str:
        return f"Scorer({self.name!r}, tokenizer={self.tokenizer.name}, max_len={self.max_len})"

    @classmethod
    def load(cls, spec: str, data_dir: str | None = None, *, tokenizer: str | None = None,
             batch_size: int = 32) -> Scorer:
        """A scorer from one of our teacher workdirs or exports, a Hugging Face directory, or a Hub id.

        ``tokenizer`` names the tokenizer of a Hugging Face model (default: ``gpt2`` for GPT-2
        checkpoints, ``llama`` for LLaMA ones); our workdirs and exports carry their own.
        """
        path = os.path.expanduser(spec)
        if os.path.isdir(os.path.join(path, "checkpoints")) or is_export(path):
            model = load(path, data_dir)
            if not isinstance(model, TeacherModel):
                raise ValueError(
                    f"the scorer {spec} is a {model.kind} model; Gen-PPL needs an autoregressive LM: "
                    "a teacher workdir (configs/shakespeare_teacher.py), a converted HF model, or gpt2"
                )
            return cls(model.module, model.tokenizer, bos_id=model.bos_id, name=f"{spec} (step {model.step})",
                       batch_size=batch_size)
        try:
            module, config = load_hf_checkpoint(spec, dtype="float32")
        except ValueError:  # ConversionError: the message already names the key or field
            raise
        except Exception as e:  # Hub, network or cache failures: one message saying what to pass instead
            raise ValueError(
                f"could not load the scorer {spec!r}: it is not a workdir or export of ours, and loading it as a "
                f"Hugging Face model failed ({type(e).__name__}: {e}). Pass a teacher workdir, or a local "
                "directory with config.json and *.safetensors of a GPT-2 or LLaMA checkpoint."
            ) from e
        tok_name = tokenizer or ("gpt2" if isinstance(module, GPT2) else "llama")
        tok = load_tokenizer(tok_name, data_dir)
        if tok.vocab_size > config.vocab_size:
            raise ValueError(
                f"the {tok_name} tokenizer has {tok.vocab_size} tokens but the scorer {spec} only "
                f"{config.vocab_size}; pass the scorer's tokenizer with --scorer_tokenizer"
            )
        bos = config.bos_id if config.bos_id is not None else tok.bos_id
        return cls(module, tok, bos_id=bos, name=spec, batch_size=batch_size)

    @classmethod
    def from_model(cls, model: Any, batch_size: int = 32) -> Scorer:
        """A scorer from a loaded teacher (``TeacherModel``: module, tokenizer, BOS id, source)."""
        if not hasattr(model, "module") or not hasattr(model, "tokenizer"):
            raise ValueError(f"cannot score with {type(model).__name__}: pass a teacher from discreteflow_jax.load, "
                             "a Scorer, or a workdir / Hugging Face directory")
        return cls(model.module, model.tokenizer, bos_id=model.bos_id, name=str(model.source), batch_size=batch_size)

    # -- token sequences -------------------------------------------------------------------
    def prepare(self, samples: Sequence[Sequence[int]], tokenizer: Tokenizer) -> list[list[int]]:
        """Sampler token ids -> scorer token ids: cut at the sampler's EOS, re-tokenized if needed."""
        cut = [truncate_at_eos(s, tokenizer.eos_id) for s in samples]
        if same_tokenizer(tokenizer, self.tokenizer):
            return cut
        return self.tokenizer.encode_batch([tokenizer.decode(s) for s in cut])

    def sequence_nll(self, sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Per-sequence (sum of NLL in nats, number of scored tokens) of scorer token ids."""
        pieces: list[tuple[int, list[int]]] = []
        for j, ids in enumerate(sequences):
            ids = [int(i) for i in ids]
            if any(i < 0 or i >= self.vocab_size for i in ids):
                raise ValueError(f"sequence {j} has token ids outside the scorer's vocabulary [0, {self.vocab_size})")
            pieces += [(j, ids[s : s + self.max_len]) for s in range(0, len(ids), self.max_len)]
        nll = np.zeros(len(sequences), np.float64)
        counts = np.zeros(len(sequences), np.int64)
        if not pieces:
            return nll, counts
        # One padded length for all batches (a multiple of 16 up to the context): few compilations.
        width = min(self.max_len, -(-max(len(p) for _, p in pieces) // 16) * 16)
        b = self.batch_size
        with jax.default_matmul_precision("float32"):  # TPUs otherwise multiply fp32 in bf16 passes
            for start in range(0, len(pieces), b):
                chunk = pieces[start : start + b]
                inputs = np.zeros((b, width), np.int32)
                targets = np.zeros((b, width), np.int32)
                mask = np.zeros((b, width), np.float32)
                for r, (_, ids) in enumerate(chunk):
                    inputs[r, 0] = self.bos_id
                    inputs[r, 1 : len(ids)] = ids[:-1]
                    targets[r, : len(ids)] = ids
                    mask[r, : len(ids)] = 1.0
                # Right padding is harmless: the scorer is causal, so no real position sees it.
                out = np.asarray(self._row_nll(self.params, inputs, targets, mask), np.float64)
                for r, (j, ids) in enumerate(chunk):
                    nll[j] += out[r]
                    counts[j] += len(ids)
        return nll, counts

    def features(self, sequences: Sequence[Sequence[int]], every_position: bool = True) -> np.ndarray:
        """Text features for MAUVE: the scorer's final-normed hidden state after each token
        ([sum of lengths, D], every position of every sequence) or after each sequence's last token
        ([N, D]); reading [BOS] + the first max_len − 1 scorer token ids. Per-position features see
        whether each prefix reads like text; the last token alone hardly separates word salad from
        real text when only a few dozen texts are compared (docs/sampling.md)."""
        width = self.max_len
        b = self.batch_size
        out = []
        with jax.default_matmul_precision("float32"):
            for start in range(0, len(sequences), b):
                chunk = [list(map(int, s))[: width - 1] for s in sequences[start : start + b]]
                inputs = np.zeros((b, width), np.int32)
                for r, ids in enumerate(chunk):
                    inputs[r, 0] = self.bos_id
                    inputs[r, 1 : 1 + len(ids)] = ids
                feats = np.asarray(self._position_features(self.params, inputs))
                for r, ids in enumerate(chunk):
                    rows = feats[r, 1 : 1 + len(ids)] if every_position else feats[r, len(ids) : len(ids) + 1]
                    out.append(rows)
        return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)

    def score(self, samples: Sequence[Sequence[int]], tokenizer: Tokenizer) -> dict[str, Any]:
        """Gen-PPL of sampler token ids (any tokenizer): cut at EOS, re-tokenized if needed, scored."""
        nll, counts = self.sequence_nll(self.prepare(samples, tokenizer))
        return summarize_nll(nll, counts)

    def score_texts(self, texts: Sequence[str]) -> dict[str, Any]:
        """Gen-PPL of plain texts (tokenized with the scorer's tokenizer)."""
        nll, counts = self.sequence_nll(self.tokenizer.encode_batch(list(texts)))
        return summarize_nll(nll, counts)


def summarize_nll(nll: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """Gen-PPL = exp(Σ NLL / Σ tokens) plus the standard error of the per-sample mean NLL."""
    total = int(counts.sum())
    if total == 0:
        return {"gen_ppl": math.nan, "nll": math.nan, "nll_se": math.nan, "scored_tokens": 0}
    mean_nll = float(nll.sum() / total)
    scored = counts > 0
    per_sample = nll[scored] / counts[scored]
    se = float(per_sample.std(ddof=1) / math.sqrt(per_sample.size)) if per_sample.size > 1 else math.nan
    return {"gen_ppl": math.exp(mean_nll), "nll": mean_nll, "nll_se": se, "scored_tokens": total}


def as_scorer(scorer: Any, data_dir: str | None = None) -> Scorer:
    """A Scorer from a Scorer, a spec string (see ``Scorer.load``) or a loaded teacher."""
    if isinstance(scorer, Scorer):
        return scorer
    if isinstance(scorer, str):
        return Scorer.load(scorer, data_dir)
    return Scorer.from_model(scorer)


def gen_ppl(texts: Sequence[str] | str, scorer: Any, *, tokenizer: Tokenizer | None = None,
            data_dir: str | None = None) -> dict[str, Any]:
    """Gen-PPL of texts under ``scorer`` (a Scorer, a teacher model, or a spec for ``Scorer.load``).

    Texts are tokenized with the scorer's tokenizer; ``tokenizer`` (the sampler's) is accepted for
    a uniform call signature. To score sampler token ids exactly, use ``Scorer.score``.
    """
    del tokenizer
    if isinstance(texts, str):
        texts = [texts]
    return as_scorer(scorer, data_dir).score_texts(texts)
