"""The command lines, the only place that defines flags:

    python -m sda_jax.train --config configs/afqmc.py [--workdir DIR] [--fresh] [--config.KEY=VALUE ...]
    python -m sda_jax.pretrain --config configs/afqmc_tapt.py [--workdir DIR] [--fresh] [--config.KEY=VALUE ...]
    python -m sda_jax.export --workdir DIR --out DIR [--params eval_ema|student|teacher] [--seed S | --model I]
    sda-jax train ... / sda-jax export ...    (the console script, `sda_jax.cli`)

Flags are defined when a command starts, never on import, so every sda_jax module imports
cleanly beside any other absl program. The commands receive the function they run
(`train.train_and_evaluate`, `export.export`) from their caller, so this module imports neither.
`--config NAME.py` that is not a file in the current directory is looked up in the configs/
folder that ships with sda-jax; `--config.KEY=None` sets a key to None ("off" or "auto", where
its comment in `sda_jax/config.py` says so).
"""

import gc
import os
import pathlib
import sys

from absl import app, flags, logging

import sda_jax
from sda_jax.errors import NO_SPACE_EXIT, InputError, NoSpaceError, exit_with_error

_CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(value: str) -> str:
    """`--config` as given if it names a file here, else the shipped config of that name, if any.

    "file.py:arg" passes arg to get_config and is resolved by its file part.
    """
    path, colon, arg = value.partition(":")
    if pathlib.Path(path).is_file() or pathlib.Path(path).parent != pathlib.Path("."):
        return value
    shipped = _CONFIGS_DIR / path
    return f"{shipped}{colon}{arg}" if shipped.is_file() else value


def _resolve_config_flag(argv: list[str]) -> tuple[list[str], list[str]]:
    """(`argv` with `--config NAME` resolved (`resolve_config_path`) and of a `--config.KEY=VALUE`
    given more than once only the last, the keys set to None). ml_collections would join repeated
    tuple values into one tuple, and cannot parse None for a key whose default is not None."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve_config_path(arg.removeprefix("--config="))
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config_path(out[i + 1])
    override = lambda arg: arg.startswith("--config.") and "=" in arg
    last = {arg.partition("=")[0]: i for i, arg in enumerate(out) if override(arg)}
    out = [arg for i, arg in enumerate(out) if not override(arg) or last[arg.partition("=")[0]] == i]
    nones = [arg.partition("=")[0].removeprefix("--config.") for arg in out if override(arg) and arg.partition("=")[2] == "None"]
    return [arg for arg in out if not (override(arg) and arg.partition("=")[2] == "None")], nones


_NONE_KEYS: list[str] = []  # the --config.KEY=None of the command being parsed
HELP_FLAGS = ("--help", "-h", "-help", "--helpshort", "-?")
_OVERRIDES = """Config overrides: every key of the config can be set on the command line as --config.SECTION.KEY=VALUE,
the last one given winning, e.g.

  {example}

--config.KEY=None sets a key to None ("off" or "auto" where its comment says so). Every key, its
default and its comment: docs/configuration.md, or `python -m sda_jax.config`. --helpfull also
lists the flags of absl and JAX."""


def help_text(usage: str, summary: str, names: list[str], example: str | None = None) -> str:
    """A command's --help: its usage, what it does, its own flags (not absl's or JAX's) and, for
    the commands that read a config, how overrides work."""
    lines = [f"usage: {usage}", "", summary, "", "flags:"]
    for name in names:
        flag = flags.FLAGS[name]
        default = "" if flag.default in (None, False) else f" (default: {flag.default_as_str})"
        lines.append(f"  --{name}{f' (-{flag.short_name})' if flag.short_name else ''}")
        lines.append(f"      {flag.help}{default}")
    if example:
        lines += ["", _OVERRIDES.format(example=example)]
    return "\n".join(lines)


def _parser(help_page: str):
    """absl flag parsing, with a bad flag or config override as a one-line error and exit 2, and
    --help printing `help_page` and exiting 0."""

    def parse(argv: list[str]) -> list[str]:
        if any(arg in HELP_FLAGS for arg in argv[1:]):
            print(help_page)
            sys.exit(0)
        return _parse_flags(argv)

    return parse


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad flag or config override as a one-line error and exit 2."""
    given = list(argv)
    try:
        argv, _NONE_KEYS[:] = _resolve_config_flag(argv)
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as err:  # ml_collections names only the missing part of an unknown key
        missing = str(err).strip("'\" ")
        unknown = [a.partition("=")[0] for a in given if a.startswith("--config.") and missing in a.partition("=")[0].split(".")]
        exit_with_error(f"{unknown[0]}: no such config key" if unknown else err)
    except (flags.Error, OSError, TypeError, ValueError) as err:
        exit_with_error(err)


def _set_nones(config, keys: list[str]) -> None:
    """Sets each dotted key of `keys` to None; an unknown key is a one-line error."""
    for key in keys:
        *sections, name = key.split(".")
        node = config
        try:
            for section in sections:
                node = node[section]
            if name not in node:
                raise KeyError(name)
            node[name] = None
        except (KeyError, TypeError):
            exit_with_error(f"--config.{key}: no such config key")


TRAIN_SUMMARY = (
    "Fine-tunes the config's model with self-distillation averaging (SDA), scores dev every train.eval_every\n"
    "steps, keeps each model's best checkpoint and writes the test predictions into --workdir; rerun the\n"
    "same command to resume an interrupted run."
)
PRETRAIN_SUMMARY = (
    "Masked-LM pretraining on the task's own sentences (labels never read), scoring the held-out split every\n"
    "train.eval_every steps; export its best step and fine-tune from it with --config.model.dir."
)


def run_train(train_and_evaluate, argv: list[str] | None = None, *, command: str = "python -m sda_jax.train",
              summary: str = TRAIN_SUMMARY, config_example: str = "configs/afqmc.py") -> None:  # fmt: skip
    """`python -m sda_jax.train`: train, evaluate, predict with `train_and_evaluate` (sda_jax.train's);
    `python -m sda_jax.pretrain` passes `pretrain.pretrain`, which takes the same flags."""
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file(
        "config", None, f"Config file, e.g. configs/afqmc.py; a bare name not found here is read from {_CONFIGS_DIR}.",
        lock_config=True,
    )  # fmt: skip
    workdir = flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config name>).")
    fresh = flags.DEFINE_bool("fresh", False, "Discard the run in --workdir and start from step 0.")
    flags.DEFINE_alias("overwrite", "fresh")

    def main(args: list[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
        config_file = flags.FLAGS["config"].config_filename
        if not config_file:
            raise app.UsageError("--config is required, e.g. --config configs/afqmc.py")
        path = pathlib.Path(config_file.split(":")[0])
        if not path.is_file():
            bare = path.parent == pathlib.Path(".")
            exit_with_error(f"{config_file}: no such config file{f' here or in {_CONFIGS_DIR}' if bare else ''}")
        _set_nones(config.value, _NONE_KEYS)
        _train(train_and_evaluate, config.value, pathlib.Path(workdir.value or f"runs/{path.stem}"), fresh.value)

    usage = f"{command} --config FILE [--workdir DIR] [--fresh] [--config.KEY=VALUE ...]"
    example = f"{command} --config {config_example} --config.optim.learning_rate=3e-5 --config.train.max_steps=200"
    app.run(main, argv=argv, flags_parser=_parser(help_text(usage, summary, ["config", "workdir", "fresh"], example)))


def _train(train_and_evaluate, config, workdir: pathlib.Path, fresh: bool) -> None:
    import jax

    from sda_jax.config import Settings
    from sda_jax.parallel import distributed
    from sda_jax.run.preemption import Preempted
    from sda_jax.stopwatch import Stopwatch

    # The imports' objects (modules, classes, the libraries' tables) move to the collector's permanent
    # generation: its full collections, frequent while JAX traces, no longer rescan them.
    gc.freeze()
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    # Resumed and repeated runs load their compiled programs instead of compiling them again.
    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir())
    clock = Stopwatch(start=sda_jax.IMPORTED_AT)
    clock.add("startup", clock.wall())  # Python, JAX and the other imports
    try:
        with clock.phase("startup"):
            distributed.initialize_distributed()
            if jax.process_count() > 1 and jax.default_backend() == "cpu":
                # jaxlib 0.12's CPU backend: a cross-process program read from the cache never
                # completes (benchmarks/jax_cpu_cache_hang.md); such runs compile afresh.
                jax.config.update("jax_enable_compilation_cache", False)
            settings = Settings.from_config(config)
        train_and_evaluate(settings, workdir, fresh=fresh, stopwatch=clock)
    except InputError as err:
        exit_with_error(err)
    except NoSpaceError as err:
        exit_with_error(err, status=NO_SPACE_EXIT)
    except FloatingPointError as err:
        exit_with_error(err, status=3)
    except Preempted as err:
        print(str(err), file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:
        from sda_jax.parallel import peers

        if jax.process_count() > 1 and peers.collective_failed(err):  # a dead peer: one line naming it
            peers.await_verdict(err)
        raise


def compilation_cache_dir() -> str:
    """Where compiled programs are cached across runs (and, on a GPU, XLA's autotuning results,
    which JAX keeps beside them): $JAX_COMPILATION_CACHE_DIR, else ~/.cache/sda_jax/xla."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(pathlib.Path.home() / ".cache" / "sda_jax" / "xla")


def run_export(export, params_names: tuple[str, ...], argv: list[str] | None = None, *, command: str = "python -m sda_jax.export") -> None:
    """`python -m sda_jax.export`: the best checkpoint of a run as a Hugging Face folder, with
    `export` (sda_jax.export's) and the names of the parameter sets it can write."""
    workdir = flags.DEFINE_string("workdir", None, "The run folder (the --workdir of sda_jax.train).")
    out = flags.DEFINE_string("out", None, "The folder to write (must not exist, or be empty).")
    params = flags.DEFINE_enum(
        "params", "eval_ema", params_names,
        "Which parameters of the best checkpoint: eval_ema (what dev scored), student, or teacher (not a vote teacher).",
    )  # fmt: skip
    seed = flags.DEFINE_integer("seed", None, "Of a run of several models (a sweep): the seed whose best model to export.")
    model = flags.DEFINE_integer("model", None, "Of a run of several models: the index of the model to export (0, 1, ...).")
    values = flags.DEFINE_string("values", None, "Of a sweep: the swept values of the model to export, e.g. optim.learning_rate=3e-5,seed=2.")
    while_training = flags.DEFINE_bool(
        "while_training", False, "Export the best checkpoint so far of a run that is still training (refused otherwise)."
    )
    flags.mark_flags_as_required(["workdir", "out"])

    def main(args: list[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every operation at INFO
        try:
            info = export(
                pathlib.Path(workdir.value), pathlib.Path(out.value), params.value, seed.value, model.value,
                while_training=while_training.value, values=values.value,
            )  # fmt: skip
        except InputError as err:
            exit_with_error(err)
        except NoSpaceError as err:
            exit_with_error(err, status=NO_SPACE_EXIT)
        checkpoint = info["checkpoint"]
        scored = "held-out masked-LM" if "perplexity" in checkpoint else "dev"  # a pretraining run's checkpoint, or fine-tuning's
        accuracy = f", {scored} accuracy {checkpoint['accuracy']:.4f}" if "accuracy" in checkpoint else ""
        print(
            f"Exported the {info['params']} parameters of model {info['model']} (seed {info['seed']}) of step "
            f"{checkpoint['step']}{accuracy} to {out.value}"
        )

    usage = f"{command} --workdir DIR --out DIR [--params eval_ema|student|teacher] [--seed S | --model I | --values K=V,...]"
    summary = (
        "Writes the best checkpoint of a run (sda_jax.train's or sda_jax.pretrain's --workdir) as a Hugging Face\n"
        "folder that transformers' BertForSequenceClassification (or BertForMaskedLM) loads for serving."
    )
    names = ["workdir", "out", "params", "seed", "model", "values", "while_training"]
    app.run(main, argv=argv, flags_parser=_parser(help_text(usage, summary, names)))
