"""Checkpoint files: a write cut short is never picked up; the best checkpoint survives restarts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sda_jax.workdir.checkpoints import BestCheckpoint, TrainCheckpoints
from sda_jax.workdir.layout import Workdir


@pytest.mark.api_surface
def test_half_written_checkpoint_is_ignored(tmp_path):
    state = {"w": jnp.arange(4.0), "step": jnp.int32(10)}
    folder = Workdir(tmp_path).train_checkpoints
    checkpoints = TrainCheckpoints(folder, keep=2)
    checkpoints.save(10, state, {"step": 10})
    checkpoints.close()
    # What a kill during the write of step 20 leaves: orbax's temporary folder, never renamed.
    partial = folder / "20.orbax-checkpoint-tmp-1795570090123456"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    reopened = TrainCheckpoints(folder, keep=2)
    assert reopened.latest_step() == 10
    restored = reopened.restore(10, jax.tree.map(jnp.zeros_like, state))
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    reopened.close()


@pytest.mark.api_surface
def test_best_checkpoint_only_improves_and_survives_reopen(tmp_path):
    params = {"student": {"w": jnp.ones(2)}, "teacher": {"w": jnp.ones(2)}, "eval_ema": {"w": jnp.ones(2)}}
    best = BestCheckpoint(tmp_path)
    assert best.offer(5, params, {"accuracy": 0.7, "f1": 0.1, "loss": 0.6, "params": "student"})
    assert not best.offer(10, params, {"accuracy": 0.7, "f1": 0.5, "loss": 0.5, "params": "student"})
    doubled = jax.tree.map(lambda x: 2 * x, params)
    assert best.offer(15, doubled, {"accuracy": 0.75, "f1": 0.2, "loss": 0.5, "params": "eval_ema"})
    best.close()
    reopened = BestCheckpoint(tmp_path)
    assert reopened.best_metrics["step"] == 15 and reopened.best_metrics["accuracy"] == 0.75
    assert not reopened.offer(20, params, {"accuracy": 0.74, "f1": 0.2, "loss": 0.5, "params": "eval_ema"})
    restored, metrics = reopened.restore(params)
    np.testing.assert_array_equal(restored["eval_ema"]["w"], [2.0, 2.0])
    assert metrics["step"] == 15
    reopened.close()


@pytest.mark.api_surface
def test_every_checkpoint_folder_of_a_run_has_barriers_of_its_own(tmp_path):
    """Orbax names a save's cross-process barriers by the step: without a prefix of their own, the
    train and best checkpoints saved at one step met in each other's barriers (a hang with two
    processes). The prefixes tell a run's folders apart and are the same wherever a host mounts the
    workdir."""
    from sda_jax.workdir.checkpoints import _barriers_of

    def prefixes(root):
        workdir = Workdir(root)
        folders = [workdir.train_checkpoints, *(workdir.best_checkpoint(i) for i in range(3))]
        return [_barriers_of(folder.resolve()).barrier_sync_key_prefix for folder in folders]

    here = prefixes(tmp_path / "host_a" / "run")
    assert len(set(here)) == 4, here
    assert prefixes(tmp_path / "elsewhere" / "mnt" / "run") == here
