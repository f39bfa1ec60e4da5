"""Command-line interface: ``keras-coherence`` / ``python -m keras_coherence``.

Each subcommand is a workflow of :mod:`keras_coherence.workflows`: its options are the
fields of the workflow's ``Config`` dataclass (help text, check and choices come from the
field), and the command runs ``run(config, out_dir, log)``. This module only parses
arguments into configs, stages ``--out`` (replaced only when the run succeeds), and prints
a :class:`~keras_coherence.workflows.ConfigError` or an unusable ``--out`` as a one-line
usage error with exit status 2.

* ``coherence``, ``aggregate``, ``quantize``, ``bnn`` -- the four jobs (``--help`` of each);
* ``demo`` -- short versions of them (what ``make demo`` runs);
* ``edge-export``, ``edge-lce``, ``edge-keras-train`` -- the steps around ``python -m edge``,
  each printing one JSON line.

Adding a subcommand is one entry in :data:`COMMANDS` naming a workflow module, its run
function and its config class.
"""
from __future__ import annotations

import os

# Quiet TensorFlow's C++ logging when nothing imported TensorFlow yet (e.g.
# ``python -c "from keras_coherence.cli import main"`` in a fresh process). When the
# package was imported first -- ``python -m keras_coherence`` and the console script
# always do -- TensorFlow has already read it; main() then silences the one noisy
# device-initialisation step instead (see _quiet_device_init).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import List, NamedTuple, Optional  # noqa: E402

from keras_coherence._output import OutputDirError, staged_output  # noqa: E402
from keras_coherence.workflows._common import ConfigError, flag_of  # noqa: E402

__all__ = ["COMMANDS", "Command", "UsageError", "build_parser", "main"]

PROG = "keras-coherence"

#: A bad command line, printed as one line with exit status 2 (the workflows' error).
UsageError = ConfigError


class Command(NamedTuple):
    """A subcommand: ``workflow`` (a module of keras_coherence.workflows), its ``run``
    function and ``config`` class; ``staged`` commands get ``--out`` and run into a
    staging folder, the others print their summary as one JSON line."""

    workflow: str
    run: str = "run"
    config: str = "Config"
    staged: bool = True
    help: Optional[str] = None


COMMANDS = {
    "coherence": Command("coherence"),
    "aggregate": Command("aggregate"),
    "quantize": Command("quantize"),
    "bnn": Command("bnn"),
    "demo": Command("demo"),
    "edge-export": Command("edge", "run_export", "ExportConfig", staged=False),
    "edge-lce": Command("edge", "run_lce", "LceConfig", staged=False),
    "edge-keras-train": Command("edge", "run_keras_train", "KerasTrainConfig", staged=False),
}


def _module(command: Command):
    return importlib.import_module(f"keras_coherence.workflows.{command.workflow}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` except for options whose default is None or False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or isinstance(action, argparse._HelpAction):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (plus a pointer to --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _argument_type(check):
    """A field's ``check`` as an argparse type: its ValueError becomes argparse's message."""
    def convert(text):
        try:
            return check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = check.__name__
    return convert


def add_config_options(parser: argparse.ArgumentParser, config_class) -> None:
    """One option per documented field of the dataclass ``config_class``: booleans as
    ``--x`` (default False) or ``--x/--no-x`` (default True), the rest typed by the
    field's ``check``, with its ``choices``, ``metavar`` and ``action``."""
    for field in dataclasses.fields(config_class):
        meta = field.metadata
        if not meta.get("help"):
            continue
        kwargs = {"dest": field.name, "default": field.default, "help": meta["help"]}
        if isinstance(field.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction if field.default else "store_true"
        else:
            if meta.get("check") is not None:
                kwargs["type"] = _argument_type(meta["check"])
            kwargs.update({k: meta[k] for k in ("choices", "metavar", "action", "required") if meta.get(k)})
        parser.add_argument(flag_of(field), **kwargs)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The argparse parser with every subcommand of :data:`COMMANDS`."""
    from keras_coherence import __version__

    parser = _Parser(prog=prog, description="Gradient coherence for TensorFlow / Keras 2: measure how aligned "
                                            "per-example gradients are while a network trains.",
                     epilog=f"Run '{prog} COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        module = _module(command)
        config_class = getattr(module, command.config)
        description = " ".join((config_class.__doc__ or "").split())
        p = sub.add_parser(name, help=command.help or getattr(module, "HELP", None) or description.split(". ")[0],
                           description=description, formatter_class=_HelpFormatter)
        add_config_options(p, config_class)
        if command.staged:
            p.add_argument("--out", default=os.path.join("runs", name), metavar="DIR",
                           help="output directory" + ("; each section writes to DIR/<section>/" if name == "demo"
                                                      else ""))
    return parser


def config_from_args(args: argparse.Namespace):
    """The parsed ``args`` of a subcommand as its workflow's config (ConfigError if bad)."""
    command = COMMANDS[args.command]
    config_class = getattr(_module(command), command.config)
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
                           if hasattr(args, f.name)})


def _run(args: argparse.Namespace) -> int:
    command = COMMANDS[args.command]
    module = _module(command)
    if not command.staged:
        print(json.dumps(getattr(module, command.run)(config_from_args(args))))
        return 0
    with staged_output(args.out) as stage:  # checked before any work; replaced only on success
        config = config_from_args(args)
        summary = getattr(module, command.run)(config, stage.path,
                                               log=lambda line: print(stage.public(line), flush=True))
        if args.command == "demo":
            print(f"\ndemo finished in {summary['seconds']:.0f} s; results in {args.out}/")
            for s in summary["sections"]:
                print(f"  {s['name']:<12} {stage.public(s['result'])}  ({s['seconds']:.0f} s)")
    return 0


def main(argv: Optional[List[str]] = None, prog: str = PROG) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status
    (0 success, 2 bad arguments, 130 interrupted). ``--help`` and ``--version`` return 0."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)

    from keras_coherence._keras import tf

    with _quiet_python_logging(tf):
        with _quiet_device_init():
            tf.config.list_physical_devices()
        try:
            return _run(args)
        except (ConfigError, OutputDirError) as err:
            print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{prog} {args.command}: interrupted", file=sys.stderr)
            return 130


@contextlib.contextmanager
def _quiet_device_init():
    """Send native stderr to /dev/null while TensorFlow first enumerates devices.

    On machines without a GPU, TensorFlow 2.21 logs a harmless ``failed call to
    cuInit`` error there, which ``TF_CPP_MIN_LOG_LEVEL`` can no longer hide once
    TensorFlow is imported. Skipped when the user set ``TF_CPP_MIN_LOG_LEVEL`` to 0/1.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") in ("0", "1"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def _quiet_python_logging(tf):
    """TensorFlow's Python logger and absl (used by tensorflow_datasets, e.g. about
    half-prepared data folders) at ERROR while a command runs; restored afterwards so
    that calling main() in-process leaves logging as it was."""
    logger = tf.get_logger()
    saved_level = logger.level
    logger.setLevel("ERROR")
    try:
        from absl import logging as absl_logging
    except ImportError:  # pragma: no cover - absl is a TensorFlow dependency
        absl_logging = None
    saved_verbosity = absl_logging.get_verbosity() if absl_logging else None
    if absl_logging:
        absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved_level)
        if absl_logging:
            absl_logging.set_verbosity(saved_verbosity)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
