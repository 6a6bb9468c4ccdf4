"""Evaluation: sample statistics and Gen-PPL against hand-computed values, self-scoring of a random
LM (perplexity ≈ exp(entropy)), re-tokenization, and a smoke sweep over saved random workdirs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED_DATA, load_config
from flax import nnx

from discreteflow_jax import evaluate
from discreteflow_jax import sample as sample_cli
from discreteflow_jax.data.tokenizers import Tokenizer
from discreteflow_jax.evaluation import metrics
from discreteflow_jax.evaluation.genppl import Scorer, gen_ppl
from discreteflow_jax.models.generate import generate
from discreteflow_jax.models.llama import Llama, LlamaConfig

# -- toy tokenizers and models ---------------------------------------------------------------


class CharTokenizer(Tokenizer):
    """One id per character of ``alphabet``, after BOS (0) and EOS (1); ``offset`` shifts the ids
    so that two instances with different names disagree about every id."""

    def __init__(self, alphabet: str, name: str, offset: int = 0):
        self.alphabet, self.name, self.offset = alphabet, name, offset
        self.bos_id, self.eos_id, self.pad_id = 0, 1, 1
        self.vocab_size = 2 + offset + len(alphabet)

    def encode(self, text: str) -> list[int]:
        return [2 + self.offset + self.alphabet.index(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i - 2 - self.offset] for i in ids if i >= 2 + self.offset)


@dataclasses.dataclass(frozen=True)
class FixedConfig:
    vocab_size: int
    max_len: int
    dtype: str = "float32"


class FixedLM(nnx.Module):
    """Logits that ignore the input: every position predicts softmax(bias)."""

    def __init__(self, config: FixedConfig, bias: np.ndarray):
        self.config = config
        self.bias = nnx.Param(jnp.asarray(bias, jnp.float32))

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return jnp.broadcast_to(self.bias[...], (*tokens_BT.shape, self.config.vocab_size))


def fixed_scorer(probs: list[float], max_len: int = 8, tokenizer: Tokenizer | None = None) -> Scorer:
    tokenizer = tokenizer or CharTokenizer("abcdef", "chars")
    bias = np.full(tokenizer.vocab_size, -1e9, np.float32)
    bias[: len(probs)] = np.log(probs)
    module = FixedLM(FixedConfig(tokenizer.vocab_size, max_len), bias)
    return Scorer(module, tokenizer, bos_id=0, batch_size=3)


# -- statistics against hand-computed values -------------------------------------------------


def test_unigram_entropy_and_repeated_ngrams_by_hand():
    # counts {1: 2, 2: 1, 3: 1}: H = -(1/2 ln 1/2 + 2 · 1/4 ln 1/4) = 1.5 ln 2
    assert metrics.unigram_entropy([1, 1, 2, 3]) == pytest.approx(1.5 * math.log(2))
    assert metrics.unigram_entropy([5, 5, 5]) == 0.0
    assert metrics.unigram_entropy([]) == 0.0
    # bigrams 12 21 12 21 12: 5 of them, 2 distinct -> 3 repeats
    assert metrics.repeated_ngram_rate([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(3 / 5)
    assert metrics.repeated_ngram_rate([1, 2, 3, 4, 5], n=4) == 0.0
    assert math.isnan(metrics.repeated_ngram_rate([1, 2, 3], n=4))
    assert metrics.truncate_at_eos([4, 5, 1, 6, 1], eos_id=1) == [4, 5]
    assert metrics.truncate_at_eos(np.array([4, 5]), eos_id=1) == [4, 5]

    stats = metrics.sample_statistics([[1, 1, 2, 3], [], [7, 7, 7, 7, 7]], ngram=4)
    # the empty sample counts as entropy 0; it has no 4-grams and is left out of the repeat rate
    assert stats["entropy"] == pytest.approx(1.5 * math.log(2) / 3)
    assert stats["rep4"] == pytest.approx((0.0 + 1 / 2) / 2)
    assert stats["num_empty"] == 1 and stats["mean_length"] == pytest.approx(3.0)


def test_perplexity_by_hand_with_eos_cut_and_windows():
    # p = (·, ·, 1/2, 1/4, 1/4) over ids 2, 3, 4 (ids 0, 1 are BOS/EOS and get ~0 mass)
    probs = [1e-30, 1e-30, 0.5, 0.25, 0.25]
    scorer = fixed_scorer(probs)
    tok = scorer.tokenizer
    # "abca" -> ids 2 3 4 2: NLL = ln2 + ln4 + ln4 + ln2 = 6 ln 2 over 4 tokens -> PPL 2^1.5
    out = scorer.score([tok.encode("abca")], tok)
    assert out["scored_tokens"] == 4
    assert out["nll"] == pytest.approx(1.5 * math.log(2), rel=1e-5)
    assert out["gen_ppl"] == pytest.approx(2**1.5, rel=1e-5)
    # everything from the first EOS on is not scored
    cut = scorer.score([tok.encode("ab") + [tok.eos_id] + tok.encode("cccc")], tok)
    assert cut["scored_tokens"] == 2
    assert cut["nll"] == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-5)
    # sequences longer than the scorer's context are scored in windows: same sums, all tokens counted
    short = fixed_scorer(probs, max_len=3)
    nll, counts = short.sequence_nll([tok.encode("abcaab"), tok.encode("a")])
    assert list(counts) == [6, 1]
    assert nll[0] == pytest.approx(3 * math.log(2) + 3 * math.log(4), rel=1e-5)  # a a a: ln2; b b c: ln4
    # more sequences than one batch (batch_size=3), in order
    many = short.sequence_nll([tok.encode("a" * (i + 1)) for i in range(7)])
    np.testing.assert_allclose(many[0], [math.log(2) * (i + 1) for i in range(7)], rtol=1e-5)
    with pytest.raises(ValueError, match="outside the scorer's vocabulary"):
        scorer.sequence_nll([[99]])


def test_different_tokenizers_are_bridged_through_text():
    sampler_tok = CharTokenizer("abcdef", "chars")
    scorer_tok = CharTokenizer("abcdef", "shifted", offset=2)  # same text, every id different
    probs = [1e-30] * 4 + [0.5, 0.25, 0.25]  # scorer ids 4, 5, 6 = a, b, c
    scorer = fixed_scorer(probs, tokenizer=scorer_tok)
    samples = [sampler_tok.encode("abca") + [sampler_tok.eos_id] + sampler_tok.encode("bb")]
    assert scorer.prepare(samples, sampler_tok) == [scorer_tok.encode("abca")]
    out = scorer.score(samples, sampler_tok)
    assert out["scored_tokens"] == 4 and out["gen_ppl"] == pytest.approx(2**1.5, rel=1e-5)
    assert gen_ppl(["abca"], scorer)["gen_ppl"] == pytest.approx(2**1.5, rel=1e-5)


def test_scorer_from_a_hugging_face_directory(tmp_path, data_dir):
    """A converted HF LLaMA directory scores exactly like the module it was written from."""
    from discreteflow_jax.data import load_tokenizer
    from discreteflow_jax.io.hf import export_llama_to_hf

    config = LlamaConfig(vocab_size=32000, dim=16, num_layers=1, num_heads=2, ffn_hidden=32, max_len=32,
                         bos_id=1, eos_id=2, dtype="bfloat16")
    model = Llama(config, rngs=nnx.Rngs(0))
    export_llama_to_hf(model, config, str(tmp_path / "hf"))
    loaded = Scorer.load(str(tmp_path / "hf"), data_dir, tokenizer="llama")
    tok = load_tokenizer("llama", data_dir)
    direct = Scorer(model, tok, bos_id=1)  # rebuilt in fp32 although the module computes in bf16
    samples = [tok.encode("ROMEO: I will go."), tok.encode("To be, or not to be") + [tok.eos_id, 5, 6]]
    a, b = loaded.score(samples, tok), direct.score(samples, tok)
    assert a["scored_tokens"] == b["scored_tokens"] == len(samples[0]) + len(samples[1]) - 3
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
    fp32 = Scorer(Llama(dataclasses.replace(config, dtype="float32"), rngs=nnx.Rngs(0)), tok, bos_id=1)
    assert fp32.score(samples, tok)["nll"] == pytest.approx(b["nll"], rel=1e-6)


# -- a model scored on its own samples ---------------------------------------------------------


def test_self_scored_perplexity_matches_entropy():
    """Samples drawn at temperature 1 and scored by the same model: the mean NLL per token is an
    unbiased estimate of the average conditional entropy, so Gen-PPL ≈ exp(entropy)."""
    vocab, length, n = 12, 8, 1024
    config = LlamaConfig(vocab_size=vocab, dim=16, num_layers=1, num_heads=2, ffn_hidden=32, max_len=length + 1,
                         init_std=0.5, bos_id=0)
    model = Llama(config, rngs=nnx.Rngs(3))
    out = generate(model, jnp.zeros((n, 1), jnp.int32), max_new_tokens=length, rng=jax.random.key(0))
    samples = np.asarray(out.tokens)
    tok = CharTokenizer("abcdefghij", "toy")  # 12 ids
    tok.eos_id = -1  # generate ran without EOS: id 1 is an ordinary token here, nothing is cut
    scorer = Scorer(model, tok, bos_id=0, batch_size=256)
    result = scorer.score(samples, tok)
    assert result["scored_tokens"] == n * length

    inputs = jnp.concatenate([jnp.zeros((n, 1), jnp.int32), jnp.asarray(samples[:, :-1])], axis=1)
    logp = jax.nn.log_softmax(model(inputs), axis=-1)
    entropy = float(-(jnp.exp(logp) * logp).sum(-1).mean())
    assert 0.5 < entropy < math.log(vocab) - 0.1  # a peaked distribution, not the uniform one
    assert result["nll"] == pytest.approx(entropy, abs=max(4 * result["nll_se"], 0.02))
    assert result["gen_ppl"] == pytest.approx(math.exp(entropy), rel=0.05)


# -- smoke sweep and sampling CLI over saved random-initialized workdirs ------------------------


def _save_random_workdir(config_name: str, workdir: str, data_dir: str, **overrides: str) -> None:
    from discreteflow_jax.tasks import build_task
    from discreteflow_jax.training import experiment
    from discreteflow_jax.training.trainer import Trainer

    config = load_config(config_name, "smoke")
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        config[section][field] = value
    cfg, tokenizer, dataset = experiment.prepare(config, data_dir)
    trainer = Trainer(cfg, build_task(cfg), workdir, dataset, tokenizer)
    trainer.save(trainer.init_state(), force=True)
    trainer.ckpt.wait_until_finished()
    trainer.ckpt.close()


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict[str, str]:
    """A random-initialized TokenFlow, teacher and Gumbel TokenFlow (smoke sizes) as step-0 checkpoints."""
    if not (SHARED_DATA / "tiny_shakespeare" / "input.txt").exists():
        pytest.skip(f"offline data folder not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("workdirs")
    dirs = {name: str(root / name) for name in ("flow", "teacher", "gumbel")}
    dirs["data"] = str(SHARED_DATA)
    _save_random_workdir("shakespeare_baseline", dirs["flow"], dirs["data"])
    _save_random_workdir("shakespeare_teacher", dirs["teacher"], dirs["data"])
    _save_random_workdir("shakespeare_gumbel", dirs["gumbel"], dirs["data"], **{"teacher.checkpoint": dirs["teacher"]})
    return dirs


def test_smoke_sweep_writes_table_csv_and_plot(tmp_path, workdirs):
    flow_dir, teacher_dir, gumbel_dir = workdirs["flow"], workdirs["teacher"], workdirs["gumbel"]
    out = str(tmp_path / "sweep")
    models = f"--models=flow={flow_dir},gumbel={gumbel_dir}"
    argv = ["sweep", models, f"--scorer={teacher_dir}", "--steps=1,2",
            "--num_samples=4", "--batch_size=2", "--seed=0", f"--data_dir={workdirs['data']}", f"--out={out}"]
    assert evaluate.run(argv) == 0
    # Adding a teacher (listed first) computes its cell only: the flow cells are reused.
    before = os.path.getmtime(os.path.join(out, "cells", "flow_K1.json"))
    argv[1] = f"--models=teacher={teacher_dir},flow={flow_dir},gumbel={gumbel_dir}"
    assert evaluate.run(argv) == 0
    assert os.path.getmtime(os.path.join(out, "cells", "flow_K1.json")) == before
    for name in ("sweep.md", "sweep.csv", "sweep.json", "sweep.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    rows = list(csv.DictReader(open(os.path.join(out, "sweep.csv"))))
    cells = {(r["model"], r["K"]) for r in rows}
    assert cells == {("validation text", ""), ("flow", "1"), ("flow", "2"), ("gumbel", "1"), ("gumbel", "2"),
                     ("teacher", "")}
    assert {r["kind"] for r in rows} == {"data", "tokenflow", "gumbel", "teacher"}
    # Flow cells record the stagger they were sampled with (here each model's config default).
    assert {r["stagger"] for r in rows if r["kind"] in ("tokenflow", "gumbel")} == {"0.0"}
    for r in rows:
        assert float(r["gen_ppl"]) > 1 and 0 <= float(r["entropy"]) <= math.log(15) + 1e-6
        assert r["kind"] == "data" or math.isfinite(float(r["val_loss"]))
        assert r["num_samples"] == "4" and r["length"] == "15"  # the teacher's 16-slot context holds BOS + 15
    # Each validation loss is labelled with the objective it measures (a logit-channel student's is a KL).
    objectives = {r["model"]: r["val_objective"] for r in rows if r["kind"] != "data"}
    assert objectives == {"flow": "flow cross-entropy", "gumbel": "flow cross-entropy", "teacher": "next-token NLL"}
    table = open(os.path.join(out, "sweep.md")).read()
    assert "| teacher | teacher | next-token NLL |" in table and "| flow | tokenflow | flow cross-entropy |" in table
    for fact in ("N = 4 samples", "15 tokens", "seed 0", "K = 1, 2", "time grid uniform", "sampling dtype float32"):
        assert fact in table
    assert os.path.isfile(os.path.join(out, "samples", "flow_K2.txt"))

    # A third run with one more K reuses the finished cells and adds the new one.
    assert evaluate.run(argv[:3] + ["--steps=1,2,4"] + argv[4:]) == 0
    assert os.path.getmtime(os.path.join(out, "cells", "flow_K1.json")) == before
    assert os.path.isfile(os.path.join(out, "cells", "flow_K4.json"))


def test_a_logit_channel_students_validation_loss_is_labelled_a_kl():
    """The logit channel trains on the KL to the teacher's conditional; its validation loss must not
    share the flows' cross-entropy label (the numbers are not comparable)."""
    from types import SimpleNamespace

    from discreteflow_jax.evaluation.metrics import validation_objective
    from discreteflow_jax.evaluation.report import markdown_tables

    def model(kind, **gumbel):
        return SimpleNamespace(kind=kind, config=SimpleNamespace(extra={"gumbel": gumbel} if gumbel else {}))

    models = {"baseline": model("tokenflow"), "gumbel": model("gumbel", logit_channel=False),
              "logit": model("gumbel", conditioning="none", logit_channel=True), "teacher": model("gpt2")}
    objectives = {name: validation_objective(m) for name, m in models.items()}
    assert objectives == {"baseline": "flow cross-entropy", "gumbel": "flow cross-entropy",
                          "logit": "KL to the teacher", "teacher": "next-token NLL"}
    report = {"settings": {"ngram": 4, "schedule": "uniform", "num_samples": 1, "seed": 0, "batch_size": 1,
                           "steps": [1], "temperature": 1.0, "teacher_temperature": 1.0},
              "length": 8, "scorer": "s", "sampling_dtype": {}, "backend": "cpu", "rows": [],
              "val_losses": {"baseline": {"loss": 6.31}, "logit": {"loss": 2.56}}, "val_objectives": objectives}
    table = markdown_tables(report)
    assert "| logit |  | KL to the teacher | 2.560 |" in table
    assert "| baseline |  | flow cross-entropy | 6.310 |" in table


def test_sweep_rejects_bad_inputs_before_loading(tmp_path, capsys):
    assert evaluate.run(["sweep", "--models=a", "--scorer=x", f"--out={tmp_path}"]) == 2
    assert "name=WORKDIR" in capsys.readouterr().err
    assert evaluate.run(["sweep", f"--models=a={tmp_path / 'missing'}", "--scorer=x", f"--out={tmp_path}"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert evaluate.run(["sweep", f"--models=a={tmp_path}", "--scorer=x", "--steps=0", f"--out={tmp_path}"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert evaluate.run(["sweep", f"--models=a={tmp_path}", "--scorer=x", "--stagger=-1", f"--out={tmp_path}"]) == 2
    assert "--stagger" in capsys.readouterr().err


def test_sample_cli_flow_and_teacher(tmp_path, workdirs, capsys):
    data = f"--data_dir={workdirs['data']}"
    assert sample_cli.run([f"--workdir={workdirs['flow']}", "--num_samples=3", "--steps=2", "--batch_size=2",
                            "--quiet", data]) == 0
    written = os.path.join(workdirs["flow"], "samples", "sample_K2_seed0.txt")
    assert open(written).read().count("=== sample") == 3
    out = str(tmp_path / "teacher.txt")
    assert sample_cli.run([f"--workdir={workdirs['teacher']}", "--num_samples=2", "--prompt=ROMEO:", data,
                            f"--out={out}"]) == 0
    text = open(out).read()
    assert text.count("=== sample") == 2 and text.count("ROMEO:") == 2
    assert "ROMEO:" in capsys.readouterr().out  # printed to the console too


def test_sample_cli_errors_are_readable(tmp_path, workdirs, capsys):
    def fails(*argv: str) -> str:
        assert sample_cli.run(list(argv)) == 2
        return capsys.readouterr().err

    assert "not a directory" in fails(f"--workdir={tmp_path / 'missing'}")
    assert "not both" in fails(f"--workdir={tmp_path}", "--prompt=a", "--template=a ___ b")
    assert "--steps" in fails(f"--workdir={tmp_path}", "--steps=0")
    assert "--temperature" in fails(f"--workdir={tmp_path}", "--temperature=0")
    assert "neither a training workdir" in fails(f"--workdir={tmp_path}")  # an empty folder
    data = f"--data_dir={workdirs['data']}"
    assert "prefix" in fails(f"--workdir={workdirs['teacher']}", "--template=To be ___ be", data)
    assert "shorter than" in fails(f"--workdir={workdirs['flow']}", "--prompt=" + "word " * 40, data)
    # Polishing needs the logit channel's noise: a plain flow model and the smoke Gumbel student (cross-attention)
    # are told so, by the sample command and by a sweep before it samples anything.
    for name in ("flow", "gumbel"):
        assert "not a logit-channel Gumbel student" in fails(f"--workdir={workdirs[name]}", "--polish_steps=2", data)
    argv = ["sweep", f"--models=flow={workdirs['flow']}", f"--scorer={workdirs['teacher']}", "--steps=1",
            "--num_samples=2", "--polish_steps=2", data, f"--out={tmp_path / 'sweep'}"]
    assert evaluate.run(argv) == 2
    assert "not a logit-channel Gumbel student" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "sweep" / "cells")


def test_sample_cli_reproduces_a_sweep_cell_given_the_same_settings(tmp_path, workdirs):
    """The rows ``sample`` writes are the sweep's for the same seed, batch size and sampling settings
    (the defaults differ: the model config's temperature here, the sweep's 1.0 there)."""
    from discreteflow_jax.evaluation.sweep import SweepSettings, draw_samples
    from discreteflow_jax.inference.load import load

    model = load(workdirs["flow"], workdirs["data"])
    settings = SweepSettings(steps=(2,), num_samples=3, batch_size=2, seed=5, temperature=0.7)
    rows = draw_samples(model, 2, settings, model.sample_length)
    out = str(tmp_path / "samples.txt")
    assert sample_cli.run([f"--workdir={workdirs['flow']}", "--num_samples=3", "--steps=2", "--batch_size=2",
                            "--seed=5", "--temperature=0.7", "--quiet", f"--data_dir={workdirs['data']}",
                            f"--out={out}"]) == 0
    texts = [block.split(" ===\n", 1)[1].rstrip("\n") for block in open(out).read().split("=== sample ")[1:]]
    assert texts == [model.tokenizer.decode_until_eos(row) for row in rows]


def test_gen_ppl_through_the_python_api(workdirs):
    from discreteflow_jax.inference.load import load

    teacher = load(workdirs["teacher"], workdirs["data"])
    flow_model = load(workdirs["flow"], workdirs["data"])
    out = gen_ppl(["ROMEO: I will go.", "To be"], teacher)
    assert out["scored_tokens"] == len(teacher.tokenizer.encode("ROMEO: I will go.")) + len(
        teacher.tokenizer.encode("To be"))
    assert out["gen_ppl"] > 1
    with pytest.raises(ValueError, match="cannot score"):
        gen_ppl(["x"], flow_model)


def test_jacobi_command_writes_the_teachers_rows_and_rejects_a_flow_model(tmp_path, workdirs, capsys):
    data, teacher = f"--data_dir={workdirs['data']}", workdirs["teacher"]
    out = tmp_path / "jacobi"
    argv = ["jacobi", f"--models=teacher={teacher}", f"--scorer={teacher}", "--steps=1,15", "--num_samples=4",
            "--seed=0", data, f"--out={out}"]
    assert evaluate.run(argv) == 0
    rows = json.load(open(out / "jacobi.json"))["rows"]
    assert [r["K"] for r in rows] == [1, 15]
    for r in rows:
        assert float(r["gen_ppl"]) > 1 and 0 <= float(r["entropy"]) <= math.log(15) + 1e-6
    assert "| 15 |" in open(out / "jacobi.md").read()
    capsys.readouterr()
    assert evaluate.run(["jacobi", f"--models=flow={workdirs['flow']}"] + argv[2:]) == 2
    assert "autoregressive teacher" in capsys.readouterr().err
