r"""Steps-vs-quality sweep: samples every flow model at every K (and every teacher once), scores the
samples by Gen-PPL under a scoring model, unigram entropy and repeated n-grams, with each model's
validation loss (``discreteflow_jax.evaluation``).

    python -m discreteflow_jax.evaluate sweep \
        --models=baseline=runs/baseline,gumbel=runs/gumbel,teacher=runs/teacher \
        --scorer=runs/teacher --steps=1,2,4,8,16,32,128 --num_samples=64 --seed=0 --out=runs/sweep

writes ``sweep.md`` (tables), ``sweep.csv`` (one row per model and K), ``sweep.json``, ``sweep.png``
(Gen-PPL and entropy against K) and every sample as text under ``samples/`` into ``--out``.
Finished cells are cached in ``--out``/cells: adding a model or a K recomputes only what is new.

    python -m discreteflow_jax.evaluate jacobi --models=teacher=runs/teacher --scorer=runs/teacher \
        --steps=1,2,4,8,32 --num_samples=64 --seed=0 --out=runs/jacobi

samples the one teacher of ``--models`` as a K-call parallel sampler (Jacobi iteration of its
Gumbel-max decode with the noise a Gumbel student draws for the same seed,
``discreteflow_jax.evaluation.jacobi``) and writes ``jacobi.md`` and ``jacobi.json``: the reference a
K-step student has to beat.
"""

from __future__ import annotations

import json
import os

from absl import flags

from discreteflow_jax import cli
from discreteflow_jax.evaluation.genppl import Scorer
from discreteflow_jax.evaluation.jacobi import jacobi_rows, jacobi_table
from discreteflow_jax.evaluation.report import markdown_tables
from discreteflow_jax.evaluation.sweep import DEFAULT_STEPS, SweepSettings, check_model_dirs, parse_models, run_sweep
from discreteflow_jax.flow import TIME_GRIDS
from discreteflow_jax.inference.load import load
from discreteflow_jax.training.experiment import USER_ERRORS

COMMANDS = ("sweep", "jacobi")

FLAGS = cli.new_flags(__doc__)
flags.DEFINE_string("models", None, "name=WORKDIR,... flow models and teachers (workdirs or exports)",
                    flag_values=FLAGS)
flags.DEFINE_string("scorer", None, "teacher workdir/export, Hugging Face directory, or Hub id (gpt2)",
                    flag_values=FLAGS)
flags.DEFINE_enum("scorer_tokenizer", None, ["llama", "gpt2"],
                  "tokenizer of a Hugging Face scorer (default: by architecture)", flag_values=FLAGS)
flags.DEFINE_list("steps", [str(k) for k in DEFAULT_STEPS], "comma-separated K values", flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 64, "samples per model and K", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed (batch i uses a seed derived from it and i)", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "samples per sampler call", flag_values=FLAGS)
flags.DEFINE_enum("schedule", "uniform", list(TIME_GRIDS), "flow time grid", flag_values=FLAGS)
flags.DEFINE_float("schedule_param", 2.0, "exponent of the power grid", flag_values=FLAGS)
flags.DEFINE_float("temperature", 1.0, "flow sampler temperature", flag_values=FLAGS)
flags.DEFINE_float("stagger", None, "flow sampler: > 0 denoises left positions first (flow.staggered_times); "
                   "default: each model's sample.stagger", flag_values=FLAGS)
flags.DEFINE_float("teacher_temperature", 1.0, "autoregressive sampling temperature", flag_values=FLAGS)
flags.DEFINE_integer("ngram", 4, "n of the repeated-n-gram rate", flag_values=FLAGS)
flags.DEFINE_integer("length", 0, "tokens per sample (0: the shortest model's)", flag_values=FLAGS)
flags.DEFINE_bool("mauve", True, "MAUVE of every row against held-out validation text (scorer features)",
                  flag_values=FLAGS)
flags.DEFINE_bool("match_entropy", True, "Gen-PPL at the temperature that matches the validation text's entropy "
                  "(a temperature search per row)", flag_values=FLAGS)
flags.DEFINE_integer("match_evals", 4, "extra sampling runs per row for that search", flag_values=FLAGS)
flags.DEFINE_integer("polish_steps", 0, "logit-channel Gumbel students: Jacobi calls after the K flow steps "
                     "(each row then costs K + polish_steps network calls)", flag_values=FLAGS)
flags.DEFINE_integer("scorer_batch_size", 32, "sequences per scorer call", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "offline data folder (tokenizers, validation text)", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output folder for sweep.md/.csv/.json/.png and samples/", flag_values=FLAGS)
flags.mark_flags_as_required(["models", "scorer", "out"], flag_values=FLAGS)


def _ints(name: str, values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in values if x.strip())
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {','.join(values)!r}") from None


def jacobi() -> int:
    """The ``jacobi`` command: the teacher's Jacobi rows at every K."""
    try:
        models = parse_models(FLAGS.models)
        if len(models) != 1:
            raise ValueError(f"jacobi takes one teacher in --models (name=WORKDIR), got {len(models)}")
        check_model_dirs(models)
        (path,) = models.values()
        steps = _ints("steps", FLAGS.steps)
        teacher = load(path, FLAGS.data_dir)
        scorer = Scorer.load(FLAGS.scorer, FLAGS.data_dir, tokenizer=FLAGS.scorer_tokenizer,
                             batch_size=FLAGS.scorer_batch_size)
        rows = jacobi_rows(teacher, scorer, list(steps), num_samples=FLAGS.num_samples, seed=FLAGS.seed,
                           data_dir=FLAGS.data_dir, length=FLAGS.length)
    except (ValueError, *USER_ERRORS) as err:
        return cli.fail(err)
    os.makedirs(FLAGS.out, exist_ok=True)
    table = jacobi_table(rows)
    with open(os.path.join(FLAGS.out, "jacobi.json"), "w") as f:
        json.dump({"teacher": path, "scorer": scorer.name, "num_samples": FLAGS.num_samples, "seed": FLAGS.seed,
                   "rows": rows}, f, indent=1, default=float)
    with open(os.path.join(FLAGS.out, "jacobi.md"), "w") as f:
        f.write(f"Teacher {path}, scorer {scorer.name}, {FLAGS.num_samples} samples, seed {FLAGS.seed}\n\n{table}\n")
    print(table)
    print(f"wrote {os.path.join(FLAGS.out, 'jacobi.md')} and jacobi.json")
    return 0


def main(argv: list[str]) -> int:
    """Runs the command named by the one positional argument (``sweep`` or ``jacobi``)."""
    if len(argv[1:]) != 1 or argv[1] not in COMMANDS:
        return cli.fail(f"expected one command, one of {', '.join(COMMANDS)} (got {argv[1:] or 'none'}): "
                        "python -m discreteflow_jax.evaluate sweep --models=... --scorer=... --out=...")
    cli.setup_logging()
    if argv[1] == "jacobi":
        return jacobi()

    try:
        settings = SweepSettings(
            steps=_ints("steps", FLAGS.steps), num_samples=FLAGS.num_samples, seed=FLAGS.seed,
            batch_size=FLAGS.batch_size, schedule=FLAGS.schedule, schedule_param=FLAGS.schedule_param,
            temperature=FLAGS.temperature, stagger=FLAGS.stagger, teacher_temperature=FLAGS.teacher_temperature,
            ngram=FLAGS.ngram, length=FLAGS.length, mauve=FLAGS.mauve, match_entropy=FLAGS.match_entropy,
            match_evals=FLAGS.match_evals, polish_steps=FLAGS.polish_steps,
        )
        models = parse_models(FLAGS.models)
        report = run_sweep(models, FLAGS.scorer, settings, FLAGS.out, FLAGS.data_dir, FLAGS.scorer_tokenizer,
                           FLAGS.scorer_batch_size)
    except (ValueError, *USER_ERRORS) as err:  # readable messages for input errors (LoadError is a ValueError)
        return cli.fail(err)
    print(markdown_tables(report))
    print(f"wrote {os.path.join(FLAGS.out, 'sweep.md')}, sweep.csv, sweep.json, sweep.png and samples/")
    return 0


run = cli.in_process(main, FLAGS, "discreteflow_jax.evaluate")


if __name__ == "__main__":
    cli.run(main, FLAGS)
