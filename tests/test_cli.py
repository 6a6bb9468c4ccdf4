"""The command-line entry points: importable together (each keeps its own flags), --help says what
each does, every command line written in the README and the docs parses, and a flag left out of a
second call takes its default again."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

from discreteflow_jax import cli
from discreteflow_jax.config import ConfigError, parse_config

ENTRY_POINTS = ("main", "sample", "evaluate", "export", "plot_metrics", "compile_check")


def entry(name: str):
    return importlib.import_module(f"discreteflow_jax.{name}")


def documented_command_lines() -> list[tuple[str, str, list[str]]]:
    """(where, entry point, arguments) of every `python -m discreteflow_jax.X ...` in the docs."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text().replace("\\\n", " ")  # shell line continuations
        for m in re.finditer(r"python3? -m discreteflow_jax\.(\w+)([^`|&>\n]*)", text):
            args = shlex.split(m.group(2).split(" #")[0])
            if not any(a.startswith("--") for a in args):
                continue  # a mention in running text, not a command line
            found.append((f"{path.name}: {m.group(0).strip()[:80]}", m.group(1), args))
    return found


def test_entry_points_import_together_and_explain_themselves(capsys):
    modules = [entry(name) for name in ENTRY_POINTS]  # one process: no flag clashes
    for name, module in zip(ENTRY_POINTS, modules):
        with pytest.raises(SystemExit) as info:
            module.run(["--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert module.__doc__.splitlines()[0] in text and f"python -m discreteflow_jax.{name}" in text
        own = [f for f in module.FLAGS if f not in ("help", "helpshort", "helpfull", "?")]
        assert own and all(f"--{f}:" in text or f"--[no]{f}:" in text for f in own if "." not in f), name


def test_missing_or_unknown_flags_exit_with_a_message(capsys):
    for args in ([], ["--workdir=x", "--no_such_flag=1"]):
        with pytest.raises(SystemExit) as info:
            entry("sample").run(args)
        assert info.value.code == cli.USAGE_ERROR
        assert "error:" in capsys.readouterr().err
    assert entry("evaluate").run(["--models=a=b", "--scorer=x", "--out=y"]) == cli.USAGE_ERROR  # no command
    assert "sweep" in capsys.readouterr().err


def test_every_documented_command_line_parses(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths in the docs are relative to the repository root
    commands = documented_command_lines()
    assert {name for _, name, _ in commands} >= {"main", "sample", "evaluate", "export"}
    for where, name, args in commands:
        module = entry(name)
        if any(a.startswith("--help") for a in args):
            with pytest.raises(SystemExit) as info:
                cli.parse(module.FLAGS, ["prog", *args])
            assert info.value.code == 0, where
            continue
        rest = cli.parse(module.FLAGS, ["prog", *args])
        assert rest[1:] in ([["sweep"], ["jacobi"]] if name == "evaluate" else [[]]), where
        if name == "main":  # the config the command builds is one training accepts
            try:
                parse_config(module.FLAGS.config)
            except ConfigError as err:
                pytest.fail(f"{where}: {err}")


def test_flags_left_out_take_their_defaults_again():
    sample = entry("sample")
    cli.parse(sample.FLAGS, ["prog", "--workdir=a", "--prompt=ROMEO:", "--quiet"])
    assert sample.FLAGS.prompt == "ROMEO:" and sample.FLAGS.quiet
    cli.parse(sample.FLAGS, ["prog", "--workdir=a"])
    assert sample.FLAGS.prompt is None and not sample.FLAGS.quiet


def test_a_misspelt_config_field_is_one_error_line():
    """The command line as a user runs it: one `error:` line naming the nearest valid fields, exit code 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "discreteflow_jax.main", "--config=configs/shakespeare_gumbel.py:smoke",
         "--config.model.dimm=3", "--workdir=unused"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == cli.USAGE_ERROR, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --config.model.dimm: config.model has no field 'dimm'; did you mean dim? "
                               "valid fields: context_dim, cross_attention, dim,"), lines[0]


@pytest.mark.parametrize(("override", "message"), [
    ("--config.modell.dim=3", "config has no field 'modell'; did you mean model? valid fields: causal, data,"),
    ("--config.seedd=1", "config has no field 'seedd'; did you mean seed?"),
    ("--config.gumbel.tauu=2", "config.gumbel has no field 'tauu'; did you mean tau? valid fields: chunk_size,"),
    ("--config.model.dim.x=1", "config.model.dim is a value, not a section with fields"),
])
def test_a_misspelt_config_field_at_any_depth_is_one_error_line(override, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as info:
        entry("main").run(["--config=configs/shakespeare_gumbel.py:smoke", override, "--workdir=unused"])
    assert info.value.code == cli.USAGE_ERROR
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {override.split('=')[0]}: {message}"), lines


def test_config_overrides_on_entry_points_without_a_config_are_one_error_line(capsys):
    for name in ENTRY_POINTS[1:]:
        with pytest.raises(SystemExit) as info:
            entry(name).run(["--config.model.dimm=3"])
        assert info.value.code == cli.USAGE_ERROR, name
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert errors == ["error: Unknown command line flag 'config.model.dimm'"], (name, errors)
