"""What a run reports: the dev line after each evaluation, the summary at the end, and what to make of it.

The summary (`summary.json` and one screen of text) holds each model's best dev figures and step,
their mean ± std and their ensemble's (one schema for one model or several), the counts of steps
and compiled programs, where the wall time went (`Stopwatch` phases), and notes a newcomer needs to
tell a working run from a broken one: a run whose test predictions are all one class is flagged,
and a from-scratch run says that it is expected to stay at the class prior.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sda_jax.data import splits
from sda_jax.stopwatch import format_phases


def dev_line(step: int, params_name: str, scores: Any, improved: list[bool]) -> str:
    """After each evaluation: the scored set's dev metrics (the mean over the models, their spread
    and their ensemble when there are several), and which models reached a new best."""
    mean = scores.mean
    line = f"step {step}: dev loss {mean['loss']:.4f} accuracy {mean['accuracy']:.4f} f1 {mean['f1']:.4f} ({params_name})"
    if len(scores.models) > 1:
        std, ensemble = scores.std, scores.ensemble
        line += (
            f", ± {std['accuracy']:.4f} / {std['f1']:.4f} over {len(scores.models)} models, ensemble accuracy "
            f"{ensemble['accuracy']:.4f} f1 {ensemble['f1']:.4f}"
        )
    if any(improved):
        line += " *best*" if len(improved) == 1 else f" *best for {sum(improved)} models*"
    return line


def build(
    run, programs, *, counts, best_metrics, table, prediction, ensemble_dev, test_logits, start_step, examples_seen,
    stopwatch, to_first_step,
) -> dict[str, Any]:  # fmt: skip
    """The run's summary record (see the module docstring): `best_metrics` per model, the sweep's
    `table` (`sweep_results.summary`), what the submission came from (`prediction`), the dev
    metrics of all the models' best eval EMAs' ensemble, and the submission's test logits
    [models, examples, classes]."""
    settings, data, buckets = run.settings, run.data, run.buckets
    times = stopwatch.breakdown()
    train_seconds = times.get("train loop", 0.0)
    label_names = settings.data.label_names
    predicted = np.bincount(np.argmax(test_logits.mean(axis=0), -1), minlength=len(label_names))
    models = [
        {**described, "best_dev_accuracy": m["accuracy"], "best_dev_f1": m["f1"], "best_step": m["step"], "best_params": m["params"]}
        for described, m in zip(run.models.describe(), best_metrics, strict=True)
    ]  # fmt: skip
    accuracy = np.asarray([m["accuracy"] for m in best_metrics])
    f1 = np.asarray([m["f1"] for m in best_metrics])
    summary = {
        "best_dev_accuracy": float(accuracy.mean()), "best_dev_accuracy_std": float(accuracy.std()),
        "best_dev_f1": float(f1.mean()), "best_dev_f1_std": float(f1.std()),
        "ensemble_dev_accuracy": ensemble_dev["accuracy"], "ensemble_dev_f1": ensemble_dev["f1"],
        "models": models,
        **table,
        "prediction": prediction,
        "steps": int(np.max(counts["step"])),
        "resumed_from_step": start_step,
        # What the (re)start cost before its first new step, by phase (None: no step was left to run).
        "seconds_to_first_step": None if to_first_step is None else {k: round(v, 3) for k, v in to_first_step.items()},
        "skipped_steps": int(np.max(counts["skipped_steps"])),
        "train_examples": examples_seen,
        "train_seconds": train_seconds,
        "train_samples_per_second": examples_seen / max(train_seconds, 1e-9),
        "train_step_compilations": programs.train_fn.num_compilations,
        "train_step_compile_seconds": programs.train_fn.compile_seconds,
        "eval_step_compilations": programs.eval.eval_fn.num_compilations,
        "compile_wall_seconds": programs.compile_wall,
        "num_buckets": len(buckets.lengths),
        "bucket_lengths": list(buckets.lengths),
        "bucket_choice": buckets.how,
        "train_padding_fraction": round(buckets.padded_fraction, 4),
        "wall_seconds": times["wall"],
        "seconds_by_phase": {name: round(seconds, 3) for name, seconds in times.items() if name != "wall"},
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} processes)",
        "compute_dtype": jnp.dtype(run.dtype).name,
        "predictions": str(run.workdir.predictions(settings)),
        "test_rows": len(data.test),
        "test_predictions_by_label": {name: int(n) for name, n in zip(label_names, predicted, strict=True)},
    }  # fmt: skip
    summary["notes"] = notes(summary, settings, data)
    return summary


def notes(summary: dict[str, Any], settings, data: splits.Splits) -> list[str]:
    """What the figures mean, where a newcomer could misread them."""
    out = []
    counts = summary["test_predictions_by_label"]
    if max(counts.values()) == sum(counts.values()):
        label = max(counts, key=counts.get)
        out.append(
            f"warning: every test prediction is label {label!r}: the model learned no more than the class "
            "prior, and its F1 says so"
        )
    if settings.model.from_scratch:
        majority, share = splits.class_prior(data.dev)
        out.append(
            "note: this BERT was trained from scratch (model.from_scratch=True). On AFQMC-sized data such a "
            f"model is expected to stay near the class prior (dev accuracy {share:.3f}, the share of label "
            f"{settings.data.label_names[majority]!r}, with F1 near 0); the published 74-76% AFQMC dev accuracy "
            "comes from a pretrained encoder (bert-base-chinese, chinese-roberta-wwm-ext, ERNIE 3.0): set "
            "model.dir to one (README, Pretrained checkpoints)"
        )
    return out


def format_summary(summary: dict[str, Any]) -> str:
    resumed = f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""
    breakdown = format_phases(summary["seconds_by_phase"])
    count = len(summary["models"])
    values = lambda m: ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items() if k == "seed" or "." in k)
    best, prediction = summary["best_combination"], summary["prediction"]
    best_rows = [
        *(
            (f"model {m['model']} ({values(m)})",
             f"best dev accuracy {m['best_dev_accuracy']:.4f} F1 {m['best_dev_f1']:.4f} at step {m['best_step']} ({m['best_params']})")
            for m in summary["models"]
        ),
        ("mean ± std", (f"accuracy {summary['best_dev_accuracy']:.4f} ± {summary['best_dev_accuracy_std']:.4f}, "
         f"F1 {summary['best_dev_f1']:.4f} ± {summary['best_dev_f1_std']:.4f} over {count} model(s)")),
        ("ensemble", f"dev accuracy {summary['ensemble_dev_accuracy']:.4f} F1 {summary['ensemble_dev_f1']:.4f} (mean logits of the models' best)"),
        *([("best combination", f"{values(best) or '-'}: dev accuracy {best['dev_accuracy_mean']:.4f} ± {best['dev_accuracy_std']:.4f} "
            f"over its {len(best['seeds'])} seed(s) (sweep.md)")] if len(summary["combinations"]) > 1 else []),
        ("submission", f"from the {prediction['with'].replace('_', ' ')}: models {prediction['models']}, dev accuracy "
         f"{prediction['dev_accuracy']:.4f} F1 {prediction['dev_f1']:.4f}"),
    ]  # fmt: skip
    rows = [
        *best_rows,
        ("steps run", f"{summary['steps']} ({summary['skipped_steps']} skipped for fp16 overflow{resumed})"),
        ("wall time", f"{summary['wall_seconds']:.1f} s: {breakdown}"),
        (
            "throughput",
            f"{summary['train_samples_per_second']:.1f} samples/s on {summary['devices']}, {summary['compute_dtype']}",
        ),
        (
            "compiled programs",
            (
                f"{summary['train_step_compilations']} train + {summary['eval_step_compilations']} eval for "
                f"{summary['num_buckets']} bucket lengths ({summary['compile_wall_seconds']:.1f} s wall)"
            ),
        ),
        ("predictions", f"{summary['predictions']} ({summary['test_rows']} rows)"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(["", "=" * 72, *lines, *summary["notes"], "=" * 72])
