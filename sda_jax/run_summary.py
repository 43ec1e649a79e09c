"""What a run prints: the dev line after each evaluation and the one-screen summary at the end."""

from __future__ import annotations

from typing import Any


def dev_line(step: int, dev: dict[str, float], params_name: str, improved: bool) -> str:
    return (
        f"step {step}: dev loss {dev['loss']:.4f} accuracy {dev['accuracy']:.4f} f1 {dev['f1']:.4f}"
        f" ({params_name}){' *best*' if improved else ''}"
    )


def format_summary(summary: dict[str, Any]) -> str:
    resumed = f", resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else ""
    rows = [
        ("best dev accuracy", f"{summary['best_dev_accuracy']:.4f} at step {summary['best_step']} ({summary['best_params']})"),
        ("best dev F1", f"{summary['best_dev_f1']:.4f}"),
        ("steps run", f"{summary['steps']} ({summary['skipped_steps']} skipped for fp16 overflow{resumed})"),
        ("wall time", f"{summary['wall_seconds']:.1f} s (train loop {summary['train_seconds']:.1f} s)"),
        (
            "throughput",
            f"{summary['train_samples_per_second']:.1f} samples/s on {summary['devices']}, {summary['compute_dtype']}",
        ),
        (
            "train step compilations",
            (
                f"{summary['train_step_compilations']} for {summary['num_buckets']} bucket lengths"
                f" ({summary['train_step_compile_seconds']:.1f} s)"
            ),
        ),
        ("predictions", f"{summary['predictions']} ({summary['test_rows']} rows)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["", "=" * 72, *(f"{name:<{width}}  {value}" for name, value in rows), "=" * 72])
