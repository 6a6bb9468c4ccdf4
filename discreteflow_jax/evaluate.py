"""Evaluation of samples (SPEC §9): generative perplexity under a scoring model, unigram entropy,
repeated-n-gram rate, validation loss, and the command line of the steps-vs-quality sweep.

    python -m discreteflow_jax.evaluate sweep \
        --models=baseline=runs/baseline,gumbel=runs/gumbel,teacher=runs/teacher \
        --scorer=runs/teacher --steps=1,2,4,8,16,32,128 --num_samples=64 --seed=0 --out=runs/sweep

writes ``sweep.md`` (tables), ``sweep.csv`` (one row per model and K), ``sweep.json``, ``sweep.png``
(Gen-PPL and entropy against K) and every sample as text under ``samples/`` into ``--out``.

Conventions (those of the diffusion/flow LM literature, so numbers are comparable):

* **Gen-PPL** = exp(total NLL / total scored tokens) of the samples under the scoring model, in fp32.
  Each sample is cut at its first EOS (the EOS and everything after it are not scored). When the
  sampler and the scorer share a tokenizer, the token ids are scored directly; otherwise the text is
  re-tokenized with the scorer's tokenizer. The scorer reads ``[BOS] + ids[:-1]`` and predicts every
  id (the teacher convention of ``discreteflow_jax.tasks.teacher``); a sample longer than the scorer's
  context is scored in consecutive windows, each starting again from BOS.
* **Entropy** = unigram entropy (nats) of each sample's own token counts, averaged over samples.
  Low entropy exposes repetitive text that fools Gen-PPL. Real validation windows of the same
  length are reported beside it (the value depends on the length: at most ln(length)).
* **Repeated n-grams** = the fraction of a sample's n-grams (n = 4 by default) that already occurred
  earlier in the same sample, averaged over samples.
* Validation loss: each model's own training objective on the validation windows training uses.

The sweep itself (teachers as reference lines, fixed seeds, common length, cached cells) lives in
``discreteflow_jax.evaluation.sweep``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from discreteflow_jax.data.tokenizers import Tokenizer, load_tokenizer
from discreteflow_jax.flow import TIME_GRIDS, cross_entropy

DEFAULT_STEPS = (1, 2, 4, 8, 16, 32, 128)


# ---------------------------------------------------------------------------------------------
# Statistics of token sequences (pure Python/numpy; one sample = one list of ids)


def truncate_at_eos(ids: Sequence[int], eos_id: int | None) -> list[int]:
    """The ids before the first EOS (all of them when there is none)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return ids


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy (nats) of the empirical distribution of one sample's tokens; 0 for an empty sample."""
    counts = np.asarray(list(Counter(int(i) for i in ids).values()), np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def repeated_ngram_rate(ids: Sequence[int], n: int = 4) -> float:
    """Fraction of the sample's n-grams that occurred earlier in the same sample; NaN below n tokens."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = [int(i) for i in ids]
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return math.nan
    return 1.0 - len(set(grams)) / len(grams)


def sample_statistics(samples: Sequence[Sequence[int]], ngram: int = 4) -> dict[str, float]:
    """Mean unigram entropy and repeated-n-gram rate over samples (already cut at EOS).

    Empty samples (EOS first) count as entropy 0 in the mean: a sampler that stops at once is
    degenerate, and leaving it out would flatter it. ``num_empty`` says how many there were.
    """
    if not samples:
        raise ValueError("no samples to evaluate")
    entropies = np.asarray([unigram_entropy(s) for s in samples])
    rates = np.asarray([repeated_ngram_rate(s, ngram) for s in samples])
    lengths = np.asarray([len(s) for s in samples])
    valid = ~np.isnan(rates)
    return {
        "entropy": float(entropies.mean()),
        "entropy_std": float(entropies.std()),
        f"rep{ngram}": float(rates[valid].mean()) if valid.any() else math.nan,
        "mean_length": float(lengths.mean()),
        "num_empty": int((lengths == 0).sum()),
    }


# ---------------------------------------------------------------------------------------------
# Scoring model


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
        if os.path.isdir(os.path.join(path, "checkpoints")) or _is_export(path):
            from discreteflow_jax.inference.load import load
            from discreteflow_jax.inference.teacher_model import TeacherModel

            model = load(path, data_dir)
            if not isinstance(model, TeacherModel):
                raise ValueError(
                    f"the scorer {spec} is a {model.kind} model; Gen-PPL needs an autoregressive LM: "
                    "a teacher workdir (configs/shakespeare_teacher.py), a converted HF model, or gpt2"
                )
            return cls(model.module, model.tokenizer, bos_id=model.bos_id, name=f"{spec} (step {model.step})",
                       batch_size=batch_size)
        from discreteflow_jax.io.hf import load_hf_checkpoint
        from discreteflow_jax.models.gpt2 import GPT2

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
        """A scorer from a loaded teacher (``api.TeacherModel``: module, tokenizer, BOS id, source)."""
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


def _is_export(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            return "format_version" in json.load(f)
    except (OSError, ValueError):
        return False


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


FLOW_KINDS = ("tokenflow", "gumbel")


def is_autoregressive(model: Any) -> bool:
    """True for the teachers that ``api.load`` returns, False for TokenFlow (baseline or Gumbel)."""
    return getattr(model, "kind", "") not in FLOW_KINDS


# ---------------------------------------------------------------------------------------------
# Validation loss of a loaded model (its own training objective on the validation windows)


def validation_loss(model: Any, dataset: Any) -> dict[str, float]:
    """The validation metrics training logs (same windows, same eval key): flow loss and its
    t-buckets for flow models, next-token loss and perplexity for teachers."""
    from discreteflow_jax.tasks import build_task
    from discreteflow_jax.training.trainer import stream_key, validation_batches

    cfg = model.config
    task = build_task(cfg)
    if is_autoregressive(model):
        graphdef, params = nnx.split(model.module)
    else:
        graphdef, params = model.graphdef, model.params

    @jax.jit
    def eval_step(params, aux, tokens, key):
        return task.eval_fn(nnx.merge(graphdef, params), aux, tokens, key)

    eval_key = stream_key(cfg.seed, "eval")  # the key Trainer.evaluate uses
    sums = None
    for i, batch in enumerate(validation_batches(dataset, cfg.train.batch_size, cfg.train.eval_batches)):
        out = eval_step(params, task.aux, jnp.asarray(batch, jnp.int32), jax.random.fold_in(eval_key, i))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    summary = task.summarize(jax.device_get(sums), "val")
    return {k.removeprefix("val/"): float(v) for k, v in summary.items()}


# ---------------------------------------------------------------------------------------------
# CLI


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m discreteflow_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sw = sub.add_parser("sweep", help="steps-vs-quality sweep: every model at every K, table + CSV + plot")
    sw.add_argument("--models", required=True, help="name=WORKDIR,... flow models and teachers (workdirs or exports)")
    sw.add_argument("--scorer", required=True, help="teacher workdir/export, Hugging Face directory, or Hub id (gpt2)")
    sw.add_argument("--scorer_tokenizer", default=None, choices=["llama", "gpt2"],
                    help="tokenizer of a Hugging Face scorer (default: by architecture)")
    sw.add_argument("--steps", type=_csv_ints, default=DEFAULT_STEPS, help="comma-separated K values")
    sw.add_argument("--num_samples", type=int, default=64)
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--batch_size", type=int, default=64, help="samples per sampler call")
    sw.add_argument("--schedule", default="uniform", choices=list(TIME_GRIDS), help="flow time grid")
    sw.add_argument("--schedule_param", type=float, default=2.0, help="exponent of the power grid")
    sw.add_argument("--temperature", type=float, default=1.0, help="flow sampler temperature")
    sw.add_argument("--teacher_temperature", type=float, default=1.0, help="autoregressive sampling temperature")
    sw.add_argument("--ngram", type=int, default=4, help="n of the repeated-n-gram rate")
    sw.add_argument("--length", type=int, default=0, help="tokens per sample (0: the shortest model's)")
    sw.add_argument("--scorer_batch_size", type=int, default=32)
    sw.add_argument("--data_dir", default=None, help="offline data folder (tokenizers, validation text)")
    sw.add_argument("--out", required=True, help="output folder for sweep.md/.csv/.json/.png and samples/")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from discreteflow_jax.evaluation.sweep import SweepSettings, markdown_tables, parse_models, run_sweep
    from discreteflow_jax.inference.load import LoadError
    from discreteflow_jax.training.experiment import USER_ERRORS

    settings = SweepSettings(
        steps=args.steps, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
        schedule=args.schedule, schedule_param=args.schedule_param, temperature=args.temperature,
        teacher_temperature=args.teacher_temperature, ngram=args.ngram, length=args.length,
    )
    try:
        models = parse_models(args.models)
        report = run_sweep(models, args.scorer, settings, args.out, args.data_dir, args.scorer_tokenizer,
                           args.scorer_batch_size)
    except (ValueError, LoadError, *USER_ERRORS) as err:  # readable messages for input errors
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_tables(report))
    print(f"wrote {os.path.join(args.out, 'sweep.md')}, sweep.csv, sweep.json, sweep.png and samples/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
