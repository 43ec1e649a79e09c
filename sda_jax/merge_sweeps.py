"""Merges the sweep tables of several runs (a SLURM job array's, one run per batch size) into one.

    python -m sda_jax.merge_sweeps --out DIR WORKDIR [WORKDIR ...]

A sweep cannot vary the batch size (every model of a run shares its batches), so a whole CLUE grid
(batch size {16, 32, 64} × learning rate × seed) is one run per batch size: slurm/clue_grid.sbatch
runs them as the tasks of a job array. Each run's summary.json holds its table (`sweep_results`);
this writes DIR/sweep.csv, DIR/sweep.md and DIR/sweep.json with every run's combinations, a
`train.batch_size` column first (and `workdir`, which run each row came from), the best
combination over all of them (highest mean dev accuracy over its seeds) and the single best model.
A run that has not finished (no summary.json) is a one-line error naming it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from sda_jax.evaluation import sweep_results
from sda_jax.workdir import atomic_write
from sda_jax.workdir.layout import Workdir


def merged_table(workdirs: list[pathlib.Path]) -> dict[str, Any]:
    rows, singles = [], []
    for workdir in workdirs:
        run_folder = Workdir(workdir)
        summary_file, settings_file = run_folder.summary_file, run_folder.settings_file
        if not summary_file.is_file() or not settings_file.is_file():
            raise FileNotFoundError(f"{workdir}: no {summary_file.name} (the run has not finished)")
        summary, settings = json.loads(summary_file.read_text()), json.loads(settings_file.read_text())
        run = {"train.batch_size": settings["train"]["batch_size"], "workdir": str(workdir)}
        rows += [{**run, **row} for row in summary["combinations"]]
        singles.append({**run, **summary["best_model"]})
    best = max(rows, key=lambda row: row["dev_accuracy_mean"])  # the first of equals
    single = max(singles, key=lambda model: model["dev_accuracy"])
    return {
        "combinations": rows,
        "best_combination": {**best, "label": "highest mean dev accuracy over its seeds"},
        "best_model": single,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", required=True, type=pathlib.Path, help="the folder for sweep.csv, sweep.md, sweep.json"
    )
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path, help="the runs' workdirs")
    args = parser.parse_args(argv)
    try:
        table = merged_table(args.workdirs)
    except (OSError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write.write_text(args.out / "sweep.csv", sweep_results.to_csv(table))
    atomic_write.write_text(args.out / "sweep.md", sweep_results.to_markdown(table))
    atomic_write.write_text(args.out / "sweep.json", json.dumps(table, indent=1) + "\n")
    print(sweep_results.to_markdown(table), end="")


if __name__ == "__main__":
    main()
