"""The command lines, the only place that defines flags:

    python -m sda_jax.train --config configs/afqmc.py [--workdir DIR] [--fresh] [--config.KEY=VALUE ...]
    python -m sda_jax.export --workdir DIR --out DIR [--params eval_ema|student|teacher]

Flags are defined when a command starts, never on import, so every sda_jax module imports
cleanly beside any other absl program. `--config NAME.py` that is not a file in the current
directory is looked up in the configs/ folder that ships with sda-jax.
"""

import os
import pathlib
import sys

from absl import app, flags, logging

import sda_jax
from sda_jax.errors import InputError, exit_with_error

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


def _resolve_config_flag(argv: list[str]) -> list[str]:
    """`--config NAME` resolved (`resolve_config_path`), and of a `--config.KEY=VALUE` given more
    than once only the last: ml_collections would join repeated tuple values into one tuple."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve_config_path(arg.removeprefix("--config="))
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config_path(out[i + 1])
    last = {arg.partition("=")[0]: i for i, arg in enumerate(out) if arg.startswith("--config.") and "=" in arg}
    return [arg for i, arg in enumerate(out) if not (arg.startswith("--config.") and "=" in arg) or last[arg.partition("=")[0]] == i]


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad flag or config override as a one-line error and exit 2."""
    try:
        return flags.FLAGS(_resolve_config_flag(argv))
    except (flags.Error, OSError, KeyError, AttributeError, TypeError, ValueError) as err:
        exit_with_error(err)


def run_train(argv: list[str] | None = None) -> None:
    """`python -m sda_jax.train`: train, evaluate, predict (see `sda_jax.train.train_and_evaluate`)."""
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
        _train(config.value, pathlib.Path(workdir.value or f"runs/{pathlib.Path(config_file.split(':')[0]).stem}"), fresh.value)

    app.run(main, argv=argv, flags_parser=_parse_flags)


def _train(config, workdir: pathlib.Path, fresh: bool) -> None:
    import jax

    from sda_jax import parallel, train
    from sda_jax.preemption import Preempted
    from sda_jax.settings import Settings
    from sda_jax.stopwatch import Stopwatch

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    # Resumed and repeated runs load their compiled programs instead of compiling them again.
    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir())
    clock = Stopwatch(start=sda_jax.IMPORTED_AT)
    clock.add("startup", clock.wall())  # Python, JAX and the other imports
    try:
        with clock.phase("startup"):
            parallel.initialize_distributed()
            settings = Settings.from_config(config)
        train.train_and_evaluate(settings, workdir, fresh=fresh, stopwatch=clock)
    except InputError as err:
        exit_with_error(err)
    except FloatingPointError as err:
        exit_with_error(err, status=3)
    except Preempted as err:
        print(str(err), file=sys.stderr)
        sys.exit(err.exit_code)


def compilation_cache_dir() -> str:
    """Where compiled programs are cached across runs (and, on a GPU, XLA's autotuning results,
    which JAX keeps beside them): $JAX_COMPILATION_CACHE_DIR, else ~/.cache/sda_jax/xla."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(pathlib.Path.home() / ".cache" / "sda_jax" / "xla")


def run_export(argv: list[str] | None = None) -> None:
    """`python -m sda_jax.export`: the best checkpoint of a run as a Hugging Face folder."""
    from sda_jax import export

    workdir = flags.DEFINE_string("workdir", None, "The run folder (the --workdir of sda_jax.train).")
    out = flags.DEFINE_string("out", None, "The folder to write (must not exist, or be empty).")
    params = flags.DEFINE_enum(
        "params", "eval_ema", export.PARAM_SETS,
        "Which parameters of the best checkpoint: eval_ema (what dev scored), student, or teacher (not a vote teacher).",
    )  # fmt: skip
    seed = flags.DEFINE_integer("seed", None, "Of a run of several seeds (train.seeds): the seed whose best model to export.")
    flags.mark_flags_as_required(["workdir", "out"])

    def main(args: list[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every operation at INFO
        try:
            info = export.export(pathlib.Path(workdir.value), pathlib.Path(out.value), params.value, seed.value)
        except InputError as err:
            exit_with_error(err)
        checkpoint = info["checkpoint"]
        accuracy = f", dev accuracy {checkpoint['accuracy']:.4f}" if "accuracy" in checkpoint else ""
        of_seed = f" of seed {info['seed']}" if info["seed"] is not None else ""
        print(f"Exported the {info['params']} parameters{of_seed} of step {checkpoint['step']}{accuracy} to {out.value}")

    app.run(main, argv=argv)
