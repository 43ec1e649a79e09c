"""The lost-peer watchdog's verdicts (a silent peer, a done one, a silent service) and the merge of a
job array's sweep tables, without SLURM."""


from __future__ import annotations

import json
import time

import pytest

from sda_jax import merge_sweeps
from sda_jax.parallel import peers


class FakeClient:
    """The coordination service's key-value store, in memory; `frozen` stands for a service that stopped answering."""

    def __init__(self):
        self.store, self.frozen = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.frozen:
            raise RuntimeError("UNAVAILABLE")
        self.store[key] = value

    def key_value_dir_get(self, prefix):
        if self.frozen:
            raise RuntimeError("UNAVAILABLE")
        return [(k, v) for k, v in self.store.items() if k.startswith(prefix)]


def test_watchdog_verdicts(monkeypatch):
    """A peer whose counter stops is lost after the timeout, one that said "done" never is, and a
    service that stops answering is the coordinator lost."""
    monkeypatch.setattr(peers, "BEAT_S", 0.05)
    client = FakeClient()
    dog = peers.Watchdog(client, process_id=0, num_processes=3, timeout=0.5)
    dog.seen = {1: ("", time.monotonic()), 2: ("", time.monotonic())}
    beat = __import__("threading").Thread(target=dog._beat, daemon=True)
    beat.start()
    for count in range(10):  # both peers beat
        client.store["sda/peers/1"] = client.store["sda/peers/2"] = str(count)
        time.sleep(0.1)
    assert dog.lost(time.monotonic()) is None
    client.store["sda/peers/2"] = "done"  # process 2 ended normally; process 1 goes silent
    time.sleep(0.2)
    assert dog.lost(time.monotonic()) is None
    time.sleep(0.6)
    assert dog.lost(time.monotonic()) == 1
    client.store["sda/peers/1"] = "again"
    time.sleep(0.2)
    assert dog.lost(time.monotonic()) is None
    client.frozen = True
    time.sleep(0.8)
    assert dog.lost(time.monotonic()) == 0
    dog.stopped.set()
    assert peers.jax_heartbeat_timeout_s() >= 2 * peers.timeout_s() + 30


class Ended(Exception):
    """What `end_lost` and `end_frozen` raise here instead of ending the test process."""


def _ended(what: str):
    raise Ended(what)


def test_a_process_frozen_itself_blames_no_peer(monkeypatch):
    """The judge's own freeze does not count against its peers; a freeze of about the timeout (its
    peers may have ended it, deciding from a beat read before the freeze) ends it, blaming no one."""
    monkeypatch.setattr(peers, "end_lost", lambda lost, *_: _ended(f"lost {lost}"))
    monkeypatch.setattr(peers, "end_frozen", lambda seconds, *_: _ended(f"frozen {seconds:.0f}"))
    dog = peers.Watchdog(FakeClient(), process_id=1, num_processes=2, timeout=30.0)
    start = 1000.0
    dog.last_answer, dog.seen = start, {0: ("7", start)}
    # Frozen for 20 s right after the last answer, then 12 s more without a beat: 32 s by the
    # clock, 13 of them the peers' silence. Without the freeze discounted, process 0 would be lost.
    dog.judge(start + 21.0, unscheduled=21.0)
    dog.judge(start + 32.0, unscheduled=peers.JUDGE_S)
    assert dog.lost(start + 32.0) is None
    assert dog.lost(start + 20.0 + 31.5) == 0  # 30 s of its peers' silence, the freeze aside
    # Frozen for 27 s: the peer may have ended it (it decides up to a beat early), so it ends.
    with pytest.raises(Ended, match="frozen 27"):
        dog.judge(start + 60.0, unscheduled=peers.DEFAULT_TIMEOUT_S - 3)
    # A short timeout: the judge's ordinary ticks (a little over a second) are no freeze.
    short = peers.Watchdog(FakeClient(), process_id=1, num_processes=2, timeout=5.0)
    short.last_answer, short.seen = start, {0: ("1", start)}
    short.judge(start + 1.2, unscheduled=1.2)
    with pytest.raises(Ended, match="frozen 4"):
        short.judge(start + 5.2, unscheduled=4.0)
    # A peer silent for the timeout while this process ran is lost.
    dog.last_answer, dog.seen = start + 90.0, {0: ("8", start + 60.0)}
    with pytest.raises(Ended, match="lost 0"):
        dog.judge(start + 91.0, unscheduled=peers.JUDGE_S)


def test_merge_sweeps_of_an_array(tmp_path):
    """Two runs (batch sizes 16 and 32) of two learning rates each: one table of four rows, the best over both."""
    workdirs = []
    for batch, accuracies in ((16, (0.70, 0.72)), (32, (0.75, 0.71))):
        workdir = tmp_path / f"bs{batch}"
        workdir.mkdir()
        (workdir / "settings.json").write_text(json.dumps({"train": {"batch_size": batch}}))
        rows = [{"optim.learning_rate": lr, "seeds": [1], "models": [i], "best_steps": [10], "dev_accuracy_mean": acc,
                 "dev_accuracy_std": 0.0, "dev_f1_mean": 0.5, "dev_f1_std": 0.0}
                for i, (lr, acc) in enumerate(zip((1e-5, 2e-5), accuracies))]  # fmt: skip
        single = {"model": 0, "optim.learning_rate": 1e-5, "seed": 1, "best_step": 10, "dev_accuracy": max(accuracies),
                  "dev_f1": 0.5, "label": "single best model"}  # fmt: skip
        (workdir / "summary.json").write_text(json.dumps({"combinations": rows, "best_model": single}))
        workdirs.append(workdir)
    merge_sweeps.main(["--out", str(tmp_path / "grid"), *map(str, workdirs)])
    csv_lines = (tmp_path / "grid" / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].startswith("train.batch_size,workdir,optim.learning_rate,") and len(csv_lines) == 5
    table = json.loads((tmp_path / "grid" / "sweep.json").read_text())
    assert (
        table["best_combination"]["train.batch_size"] == 32 and table["best_combination"]["optim.learning_rate"] == 1e-5
    )
    assert "train.batch_size=32" in (tmp_path / "grid" / "sweep.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        merge_sweeps.main(["--out", str(tmp_path / "grid"), str(tmp_path / "missing")])
    assert exit_info.value.code == 2
