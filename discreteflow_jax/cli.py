"""Plumbing shared by the command-line entry points (``main``, ``sample``, ``evaluate``, ``export``,
``plot_metrics``).

Each entry module keeps its flags in its own ``flags.FlagValues`` made by ``new_flags``, so several
entry modules can be imported into one process (the tests do) without clashing over common names
such as ``--workdir``. ``run`` starts an entry point through ``absl.app.run``; ``call`` runs the
same parsing and ``main`` in-process. ``--help`` prints the module docstring and the flags.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

USAGE_ERROR = 2  # exit code of a bad flag or a user error (argparse's convention): a message, no traceback


class _HelpFlag(flags.BooleanFlag):
    """``--help`` and friends: the entry point's docstring and its flags on stdout, then exit 0."""

    def __init__(self, name: str, text: str, fv: flags.FlagValues, doc: str, short_name: str | None = None):
        super().__init__(name, False, text, short_name=short_name)
        self._fv, self._doc = fv, doc

    def parse(self, argument: str) -> None:
        if self._parse(argument):
            print(usage(self._fv, self._doc))
            raise SystemExit(0)


def new_flags(doc: str | None) -> flags.FlagValues:
    """An empty FlagValues for one entry point, with ``--help`` (``-?``), ``--helpshort`` and
    ``--helpfull`` (all three print ``doc`` and every flag of this entry point)."""
    fv = flags.FlagValues()
    for name, short, text in (("help", "?", "show this help"), ("helpshort", None, "same as --help"),
                              ("helpfull", None, "same as --help: every flag of this command")):
        flags.DEFINE_flag(_HelpFlag(name, text, fv, doc or "", short), flag_values=fv)
    return fv


def usage(fv: flags.FlagValues, doc: str) -> str:
    """The help text: what the entry point does (its docstring, with examples) and its flags."""
    return f"{doc.strip()}\n\nflags:\n{fv.get_help(include_special_flags=False)}"


def parse(fv: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """Parses ``argv`` (program name first) into ``fv`` from scratch: flags not given take their
    defaults, even when ``fv`` was parsed before. Returns the positional arguments, program name
    first. A bad or missing flag prints a message and exits with ``USAGE_ERROR``."""
    fv.unparse_flags()
    for name in [n for n in fv if "." in n]:  # --config.x.y overrides an earlier parse defined
        delattr(fv, name)
    if (error := config_override_error(fv, argv)) is not None:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)
    saved, sys.argv = sys.argv, list(argv)  # config_flags looks for the --config.x.y overrides in sys.argv
    try:
        return fv(list(argv))
    except flags.Error as err:
        print(f"error: {err}\nRun with --help to see the flags.", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None
    finally:
        sys.argv = saved


def config_override_error(fv: flags.FlagValues, argv: Sequence[str]) -> str | None:
    """The message for a ``--config.a.b=...`` override that names no field of the config file, with
    the nearest valid names; None when every override names a field. Checked before parsing, since
    ml_collections reports it as a long traceback. A config file that does not load is left to the
    parser's own message."""
    for name in [n for n in fv if fv[n].parser.flag_type() == "config object"]:  # DEFINE_config_file
        spec, overrides = None, []
        for i, arg in enumerate(argv):
            key, _, value = arg.removeprefix("--").partition("=")
            if not arg.startswith("--"):
                continue
            if key == name:
                spec = value if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            elif key.startswith(name + "."):
                overrides.append(key[len(name) + 1:])
        if not overrides or not spec:
            continue
        try:
            config = _load_config_file(spec)
        except Exception:  # noqa: BLE001 - the parser reports a file that does not load
            continue
        for path in overrides:
            if (error := _missing_field(config, name, path)) is not None:
                return error
    return None


def _load_config_file(spec: str) -> Any:
    """``get_config(ARG)`` of ``PATH[:ARG]``, as ml_collections reads a ``--config`` value."""
    path, *args = spec.split(":", 1)
    module_spec = importlib.util.spec_from_file_location("discreteflow_jax_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*args)


def _missing_field(config: Any, name: str, path: str) -> str | None:
    node, where = config, name
    for part in path.split("."):
        if not hasattr(node, "keys"):
            return f"--{name}.{path}: {where} is a value, not a section with fields"
        if part not in node:
            valid = sorted(str(k) for k in node.keys())
            near = difflib.get_close_matches(part, valid, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            return (f"--{name}.{path}: {where} has no field {part!r}; {hint}"
                    f"valid fields: {', '.join(valid)}")
        node, where = node[part], f"{where}.{part}"
    return None


def call(main: Callable[[list[str]], int | None], fv: flags.FlagValues, args: Sequence[str],
         prog: str = "discreteflow_jax") -> int:
    """What the command line ``prog ARGS...`` does, in this process: parse ``args`` (flags and
    positional arguments, no program name) into ``fv`` and return ``main``'s exit code.

    The caller's logging configuration is restored afterwards: ``setup_logging`` binds a handler to
    the ``sys.stderr`` of the moment, which an in-process caller (a test, a notebook) may replace
    and close, and its INFO level would otherwise stay on for everything the caller runs next."""
    root, absl_logger = logging.getLogger(), logging.getLogger("absl")
    saved = root.handlers[:], root.level, absl_logger.level
    try:
        return main(parse(fv, [prog, *args])) or 0
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        absl_logger.setLevel(saved[2])


def in_process(main: Callable[[list[str]], int | None], fv: flags.FlagValues, module: str
               ) -> Callable[[Sequence[str]], int]:
    """``run(args)`` of an entry point: what ``python -m <module> ARGS...`` does, in this process."""

    def run(args: Sequence[str]) -> int:
        return call(main, fv, args, prog=f"python -m {module}")

    run.__doc__ = f"``python -m {module} ARGS...`` in this process; returns the exit code."
    return run


def positional_error(argv: Sequence[str]) -> int | None:
    """The exit code for stray positional arguments (every option is a --flag), else None."""
    if len(argv) > 1:
        return fail(f"unexpected arguments {list(argv[1:])}; every option is a --flag (see --help)")
    return None


def run(main: Callable[[list[str]], int | None], fv: flags.FlagValues) -> None:
    """Starts an entry point from ``sys.argv`` through ``absl.app.run`` (which exits with ``main``'s
    return value)."""

    def parser(argv: list[str]) -> list[str]:
        rest = parse(fv, argv)
        flags.FLAGS.mark_as_parsed()  # app.run insists its own (global) flags are parsed; none are used
        return rest

    app.run(main, flags_parser=parser)


def setup_logging() -> None:
    """INFO messages of the package on stderr, with time stamps; absl's own only from WARNING on."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)


def fail(err: BaseException | str) -> int:
    """Reports a user error (bad input, unreadable workdir) as one line on stderr; the exit code."""
    print(f"error: {err}", file=sys.stderr)
    return USAGE_ERROR
