"""The `sda-jax` console script: `sda-jax train ...`, `sda-jax pretrain ...` and `sda-jax export ...`.

The same commands as `python -m sda_jax.train`, `python -m sda_jax.pretrain` and `python -m
sda_jax.export` (flags and all, see `sda_jax.commands`); this module only picks one by its first argument.
"""

from __future__ import annotations

import sys

USAGE = (
    "usage: sda-jax train --config FILE [--workdir DIR] [...] | sda-jax pretrain --config FILE [--workdir DIR] [...] | "
    "sda-jax export --workdir DIR --out DIR [...]"
)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    command, rest = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    program = f"{argv[0]} {command}"
    if command == "train":
        from sda_jax import commands, train

        commands.run_train(train.train_and_evaluate, [program, *rest], command="sda-jax train")
    elif command == "pretrain":
        from sda_jax import commands, pretrain

        commands.run_train(pretrain.pretrain, [program, *rest], command="sda-jax pretrain", summary=commands.PRETRAIN_SUMMARY,
                           config_example="configs/afqmc_tapt.py")  # fmt: skip
    elif command == "export":
        from sda_jax import commands, export

        commands.run_export(export.export, export.PARAM_SETS, [program, *rest], command="sda-jax export")
    elif command in ("--help", "-h", "help"):
        print(f"{USAGE}\n\nEach command's own flags: sda-jax train --help, sda-jax pretrain --help, sda-jax export --help.")
    else:
        print(USAGE, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
