"""The shipped context recipe reads noisy neighbours; the original recipe does not (at equal steps).

Task: runs (each token repeats the previous one with probability 0.75), where the exact Bayes
denoiser with context is far better than the per-position one. Measured at one flow time for
every position, at the t where context is worth the most, as a share of that Bayes gain.
"""

from __future__ import annotations

import pytest
from conftest import load_config

from discreteflow_jax.config.presets import CONTEXT_RECIPE, ORIGINAL_RECIPE
from discreteflow_jax.data import synthetic as syn
from discreteflow_jax.evaluation import context_study as cs

SETTINGS = cs.StudySettings(vocab_size=512, dim=64, num_layers=2, num_heads=2, seq_len=32, batch_size=32, steps=400)
TIMES = (0.1, 0.15, 0.2, 0.25, 0.3)


def recovered_at_most_informative_t(recipe: dict) -> tuple[float, dict]:
    task = syn.make_task("runs", SETTINGS.vocab_size, SETTINGS.repeat_prob)
    model, _ = cs.train(task, SETTINGS, recipe)
    result = cs.measure(model, task, TIMES, batch=64, seq_len=SETTINGS.seq_len)
    best_t = max(result, key=lambda t: result[t]["bayes_position_ce"] - result[t]["bayes_context_ce"])
    return result[best_t]["recovered"], result


def as_recipe(fields: dict) -> dict:
    """The model/flow fields of a preset recipe, in the study's dotted form (defaults dropped)."""
    defaults = {"flow.time_sampler": "uniform", "flow.time_param": 1.0}
    return {k: v for k, v in fields.items()
            if k.startswith(("model.", "flow.")) and v not in (0, 0.0, False) and defaults.get(k) != v}


def test_context_recipe_recovers_a_quarter_of_the_bayes_context_gain():
    share, result = recovered_at_most_informative_t(as_recipe(CONTEXT_RECIPE))
    assert share >= 0.25, result


def test_original_recipe_does_not():
    assert as_recipe(ORIGINAL_RECIPE) == {}
    share, result = recovered_at_most_informative_t({})
    assert share < 0.25, result



@pytest.mark.parametrize("name", ["shakespeare_baseline", "shakespeare_gumbel", "fineweb_baseline", "fineweb_gumbel"])
def test_cpu_variants_use_the_context_recipe_and_original_is_one_switch_away(name):
    for variant, recipe in (("cpu", CONTEXT_RECIPE), ("cpu,original", ORIGINAL_RECIPE), ("context", CONTEXT_RECIPE)):
        c = load_config(name, variant)
        for dotted, value in recipe.items():
            section, field = dotted.split(".")
            assert c[section][field] == value, (variant, dotted)
    with pytest.raises(ValueError, match="valid variants"):
        load_config(name, "cpu,bogus")


def test_cpu_baseline_samples_at_temperature_0_8_and_original_at_1():
    assert load_config("shakespeare_baseline", "cpu").sample.temperature == 0.8
    assert load_config("shakespeare_baseline", "cpu,original").sample.temperature == 1.0


def test_teacher_has_no_flow_recipes():
    with pytest.raises(ValueError, match="valid variants"):
        load_config("shakespeare_teacher", "original")
