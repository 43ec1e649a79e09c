"""MetricsWriter (metrics.jsonl + TensorBoard events, one schema for one model or several) and the curves PNG."""

import json
import struct
import subprocess
import sys
import types

import numpy as np
import pytest

from sda_jax.errors import InputError
from sda_jax.workdir import metrics_log
from sda_jax.workdir.layout import Workdir
from sda_jax.workdir.metrics_log import MetricsWriter
from sda_jax.workdir.plots import plot_training_curves

TRAIN = [
    (10, {"loss": 0.71, "ce": 0.70, "kd": 0.01, "learning_rate": 1e-5, "skipped_steps": 0}),
    (20, {"loss": 0.65, "ce": 0.645, "kd": 0.005, "learning_rate": 2e-5, "skipped_steps": 1, "loss_scale": 32768.0}),
    (30, {"loss": 0.60, "ce": 0.598, "kd": np.float32(0.002), "learning_rate": 1.5e-5, "skipped_steps": np.int32(1)}),
]
# Two models: each one's window means beside the mean over them.
MODELS = {10: [{"loss": 0.70, "ce": 0.69}, {"loss": 0.72, "ce": 0.71}], 20: [], 30: [{"loss": 0.6, "ce": np.float32(0.598)}] * 2}
METRICS = lambda loss, accuracy, f1: {"loss": loss, "accuracy": accuracy, "f1": f1}
DEV = [
    (20, "student", METRICS(0.62, 0.70, 0.55)),
    (30, "eval_ema", {**METRICS(0.58, 0.72, 0.60), "std": METRICS(0.01, 0.02, 0.0), "ensemble": METRICS(0.57, 0.73, 0.61),
                      "models": [METRICS(0.57, 0.70, 0.60), METRICS(0.59, 0.74, 0.60)]}),
    (30, "teacher", METRICS(0.59, 0.71, 0.58)),
]  # fmt: skip


def write_run(workdir, **kwargs):
    with MetricsWriter(Workdir(workdir), **kwargs) as writer:
        for step, scalars in TRAIN:
            writer.write_train(step, scalars, MODELS[step])
            for dev_step, params, dev in DEV:
                if dev_step == step:
                    writer.write_dev(dev_step, params, dev)


def _plain(value):
    """Numbers as JSON holds them, nested records too."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return np.asarray(value).item()


def _flat(prefix, record):
    """{tag: value} as TensorBoard gets a record: nested groups joined by "/", models as model_<i>."""
    out = {}
    for name, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(f"{prefix}/{name}", value))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                out.update(_flat(f"{prefix}/model_{i}", item))
        else:
            out[f"{prefix}/{name}"] = float(value)
    return out


def read_events(logdir):
    """(tag, step, value) of every scalar in the event files, checking the TFRecord framing and CRCs."""
    metrics_log._summary_writer_class()  # imports tensorboardX without torch
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked(data):
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    scalars, purges = [], []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked(header)
            payload = data[pos + 12 : pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == masked(payload)
            pos += 16 + length
            event = event_pb2.Event.FromString(payload)
            if event.HasField("session_log"):
                purges.append(event.step)
            for value in event.summary.value:
                scalars.append((value.tag, event.step, value.simple_value))
    return scalars, purges


def test_jsonl_records(tmp_path):
    write_run(tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    expected = []
    for step, scalars in TRAIN:
        models = {"models": _plain(MODELS[step])} if MODELS[step] else {}
        expected.append({"step": step, "split": "train", **_plain(scalars), **models})
        expected += [{"step": s, "split": "dev", "params": p, **_plain(d)} for s, p, d in DEV if s == step]
    assert [json.loads(line) for line in lines] == expected
    # The exact bytes train.py wrote before: json.dumps per record, keys in the caller's order.
    assert lines[0] == json.dumps(expected[0])
    last_train = [json.loads(line) for line in lines if '"train"' in line][-1]
    assert type(last_train["skipped_steps"]) is int and type(last_train["kd"]) is float  # from np.int32, np.float32
    # Wall-clock figures stay out: metrics.jsonl must be reproducible by a resumed run.
    assert all("steps_per_second" not in json.loads(line) for line in lines)


def test_appends_to_an_existing_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "split": "train", "loss": 1.0}\n')
    with MetricsWriter(Workdir(tmp_path)) as writer:
        writer.write_train(10, {"loss": 0.5})
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 10]


def test_tensorboard_events(tmp_path):
    write_run(tmp_path)
    scalars, purges = read_events(tmp_path / "tensorboard")
    assert purges == []
    expected = {}
    for step, train in TRAIN:
        expected.update({(tag, step): v for tag, v in _flat("train", {**train, "models": MODELS[step]}).items()})
    for step, params, dev in DEV:
        expected.update({(tag, step): v for tag, v in _flat(f"dev/{params}", dev).items()})
    values = {(tag, step): value for tag, step, value in scalars}
    assert {tag for tag, _ in values} == {tag for tag, _ in expected} | {"train/steps_per_second"}
    assert {"train/model_1/ce", "dev/eval_ema/std/accuracy", "dev/eval_ema/ensemble/f1", "dev/eval_ema/model_1/loss"} <= {t for t, _ in values}
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, rel=1e-6), key
    # Speed is measured from the second train record on: 20 -> 30 after the dev write at 20.
    speed = sorted(step for tag, step, _ in scalars if tag == "train/steps_per_second")
    assert speed == [20, 30] and all(v > 0 for (t, _), v in values.items() if t == "train/steps_per_second")


def test_explicit_steps_per_second(tmp_path):
    with MetricsWriter(Workdir(tmp_path)) as writer:
        writer.write_train(10, {"loss": 0.5, "steps_per_second": 12.5})
    scalars, _ = read_events(tmp_path / "tensorboard")
    assert ("train/steps_per_second", 10, 12.5) in scalars
    assert "steps_per_second" not in (tmp_path / "metrics.jsonl").read_text()


def test_tensorboard_reads_the_events(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    # tensorboard.compat.notf makes TensorBoard use its own stub instead of importing TensorFlow.
    monkeypatch.setitem(sys.modules, "tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing import event_accumulator

    write_run(tmp_path)
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert "dev/eval_ema/accuracy" in accumulator.Tags()["scalars"]
    assert [(e.step, e.value) for e in accumulator.Scalars("train/ce")] == [
        (step, pytest.approx(t["ce"])) for step, t in TRAIN
    ]
    assert [(e.step, e.value) for e in accumulator.Scalars("dev/eval_ema/accuracy")] == [(30, pytest.approx(0.72))]
    # A run resumed from step 20 logs step 30 again: TensorBoard shows only the new value.
    with MetricsWriter(Workdir(tmp_path), resume_step=20) as writer:
        writer.write_train(30, {"ce": 0.25})
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("train/ce")] == [
        (10, pytest.approx(0.70)),
        (20, pytest.approx(0.645)),
        (30, pytest.approx(0.25)),
    ]


def test_resume_purges_later_steps(tmp_path):
    write_run(tmp_path)
    with MetricsWriter(Workdir(tmp_path), resume_step=20) as writer:
        writer.write_train(30, {"loss": 0.1})
    _, purges = read_events(tmp_path / "tensorboard")
    # TensorBoard hides the first attempt's events at steps >= 21 when it meets this marker.
    assert purges == [21]
    # A second writer within the same second gets its own file (tensorboardX names files by the
    # second and opens them with "wb").
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricsWriter(Workdir(workdir), enabled=False) as writer:
        writer.write_train(10, {"loss": 0.5})
        writer.write_dev(10, "student", {"accuracy": 0.5})
    assert not workdir.exists()


def test_bad_values(tmp_path):
    with MetricsWriter(Workdir(tmp_path)) as writer:
        with pytest.raises(TypeError, match="metric 'loss' must be a single number"):
            writer.write_train(1, {"loss": np.zeros(3)})
        with pytest.raises(TypeError, match="metric 'note' must be a number"):
            writer.write_train(1, {"note": "x"})
        with pytest.raises(ValueError, match="params_name"):
            writer.write_dev(1, "a/b", {"accuracy": 0.5})
    with pytest.raises(ValueError, match="closed"):
        writer.write_train(2, {"loss": 0.5})


def test_does_not_import_torch():
    code = (
        "import sys, tempfile; from sda_jax.workdir.metrics_log import MetricsWriter; from sda_jax.workdir.layout import Workdir\n"
        "with MetricsWriter(Workdir(tempfile.mkdtemp())) as w: w.write_train(1, {'loss': 0.5})\n"
        "print('torch' in sys.modules, 'tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("models", [1, 3])
def test_plot_training_curves(tmp_path, models):
    with MetricsWriter(Workdir(tmp_path)) as writer:
        for step in range(20, 1001, 20):
            writer.write_train(
                step, {"loss": 1 / step**0.2 + 0.01, "ce": 1 / step**0.2, "kd": 0.01, "learning_rate": 2e-5}
            )
            if step % 200 == 0:
                params = "eval_ema" if step > 500 else "student"
                each = [METRICS(0.6, 0.7 + step / 1e4 + i / 100, 0.6) for i in range(models)]
                record = {**METRICS(0.6, float(np.mean([m["accuracy"] for m in each])), 0.6), "std": METRICS(0, 0.01, 0),
                          "ensemble": METRICS(0.59, 0.75, 0.6), "models": each}  # fmt: skip
                writer.write_dev(step, params, record)
    path = plot_training_curves(Workdir(tmp_path))
    assert path == tmp_path / "training_curves.png"
    assert png_size(path) == (1500, 840)
    assert path.stat().st_size > 20_000
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_with_only_train_rows_or_one_dev_row(tmp_path):
    with MetricsWriter(Workdir(tmp_path)) as writer:
        writer.write_train(10, {"loss": 0.7, "ce": 0.69, "kd": 0.01, "learning_rate": 1e-5, "loss_scale": 65536.0})
    assert png_size(plot_training_curves(Workdir(tmp_path))) == (1500, 840)
    with MetricsWriter(Workdir(tmp_path)) as writer:
        writer.write_dev(10, "student", {"loss": 0.6, "accuracy": 0.7, "f1": 0.5})
    assert png_size(plot_training_curves(Workdir(tmp_path))) == (1500, 840)


def test_plot_edge_files(tmp_path):
    with pytest.raises(InputError, match=r"metrics\.jsonl: no such file"):
        plot_training_curves(Workdir(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("")
    assert png_size(plot_training_curves(Workdir(tmp_path))) == (1500, 840)  # empty panels that say so
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n{"step": 2,\n')
    with pytest.raises(InputError, match=r"metrics\.jsonl:2: malformed JSON"):
        plot_training_curves(Workdir(tmp_path))
