"""What a sweep found: per combination of the swept values (other than `seed`), its seeds' best dev
figures as mean ± std; the best combination by mean dev accuracy; the single best model.

The two answers are different questions and are labelled so: the best combination is what a
recipe should use (its mean over seeds is the figure to expect); the single best model is what
leaderboards such as PaddleNLP's CLUE benchmark report (the maximum over seeds too). The table
goes to `sweep.csv` and `sweep.md` in the workdir and into the summary.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Combination:
    values: dict[str, Any]  # the swept values other than seed
    models: list[int]  # its models on the model axis, one per seed
    seeds: list[int]
    best_steps: list[int]
    accuracy: list[float]  # each model's best dev accuracy
    f1: list[float]  # ... and the F1 of that step

    def row(self) -> dict[str, Any]:
        acc, f1 = np.asarray(self.accuracy), np.asarray(self.f1)
        return {
            **self.values, "seeds": self.seeds, "models": self.models, "best_steps": self.best_steps,
            "dev_accuracy_mean": float(acc.mean()), "dev_accuracy_std": float(acc.std()),
            "dev_f1_mean": float(f1.mean()), "dev_f1_std": float(f1.std()),
        }  # fmt: skip


def combinations(described: list[dict[str, Any]], best_metrics: list[dict[str, Any]]) -> list[Combination]:
    """The models grouped by their values other than seed, in grid order (`Models.describe()` and
    each model's best metrics)."""
    groups: dict[tuple, list[int]] = {}
    for model in described:
        values = tuple((k, v) for k, v in model.items() if k not in ("model", "seed"))
        groups.setdefault(values, []).append(model["model"])
    return [
        Combination(
            values=dict(values), models=indices, seeds=[described[i]["seed"] for i in indices],
            best_steps=[best_metrics[i]["step"] for i in indices], accuracy=[best_metrics[i]["accuracy"] for i in indices],
            f1=[best_metrics[i]["f1"] for i in indices],
        )  # fmt: skip
        for values, indices in groups.items()
    ]


def best_combination(combos: list[Combination]) -> Combination:
    """The highest mean dev accuracy over its seeds (the first of equals)."""
    return max(combos, key=lambda c: float(np.mean(c.accuracy)))


def best_model(best_metrics: list[dict[str, Any]]) -> int:
    """The model of the highest best dev accuracy (the first of equals)."""
    return int(np.argmax([m["accuracy"] for m in best_metrics]))


def summary(described: list[dict[str, Any]], best_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The table and its two answers, as the summary holds them."""
    combos = combinations(described, best_metrics)
    best, single = best_combination(combos), best_model(best_metrics)
    return {
        "combinations": [c.row() for c in combos],
        "best_combination": {**best.row(), "label": "highest mean dev accuracy over its seeds"},
        "best_model": {**described[single], "best_step": best_metrics[single]["step"],
                       "dev_accuracy": best_metrics[single]["accuracy"], "dev_f1": best_metrics[single]["f1"],
                       "label": "single best model (a maximum over seeds too, as CLUE leaderboards report)"},
    }  # fmt: skip


def to_csv(table: dict[str, Any]) -> str:
    rows = table["combinations"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
    return out.getvalue()


def to_markdown(table: dict[str, Any]) -> str:
    rows = table["combinations"]
    swept = [k for k in rows[0] if k not in ("seeds", "models", "best_steps") and not k.startswith("dev_")]
    head = [*swept, "seeds", "dev accuracy (mean ± std)", "dev F1 (mean ± std)", "best steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            *(f"{row[k]:g}" if isinstance(row[k], float) else str(row[k]) for k in swept),
            ", ".join(map(str, row["seeds"])), f"{row['dev_accuracy_mean']:.4f} ± {row['dev_accuracy_std']:.4f}",
            f"{row['dev_f1_mean']:.4f} ± {row['dev_f1_std']:.4f}", ", ".join(map(str, row["best_steps"])),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    best, single = table["best_combination"], table["best_model"]
    described = lambda values: ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()) or "(no values swept but seed)"
    lines += [
        "",
        f"* Best combination ({best['label']}): {described({k: best[k] for k in swept})}: dev accuracy "
        f"{best['dev_accuracy_mean']:.4f} ± {best['dev_accuracy_std']:.4f} over seeds {', '.join(map(str, best['seeds']))}.",
        f"* {single['label'].capitalize()}: model {single['model']} "
        f"({described({k: v for k, v in single.items() if k not in ('model', 'best_step', 'dev_accuracy', 'dev_f1', 'label')})}): "
        f"dev accuracy {single['dev_accuracy']:.4f}, F1 {single['dev_f1']:.4f} at step {single['best_step']}.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"
