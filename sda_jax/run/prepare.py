"""A run's inputs, prepared once before anything compiles: data, models, mesh, buckets, workdir.

`prepare` reads and checks every input before the workdir is touched, so bad input leaves
nothing: the splits, the models of the model axis and their initial parameters (a checkpoint read
once for all of them), the mesh, the memory check, the bucket lengths. Then process 0 prepares the
workdir (`Workdir.prepare`: the fresh/resume rules) and writes its records.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.experimental import multihost_utils

from sda_jax import kernels
from sda_jax.config import Settings
from sda_jax.data import bucketing, input_pipeline, splits
from sda_jax.data.bucketing import BucketChoice
from sda_jax.errors import InputError
from sda_jax.hf.load import bert_config, load_models
from sda_jax.models.bert import flops_per_token, init_params
from sda_jax.parallel import distributed
from sda_jax.step import precision
from sda_jax.step.model_axis import Models
from sda_jax.stopwatch import Stopwatch
from sda_jax.workdir.layout import RunLock, Workdir


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    settings: Settings
    workdir: Workdir
    data: Any  # splits.Splits; of masked-LM pretraining, a pretrain_data.Corpus
    models: Models
    model: Any  # BertForSequenceClassification, or masked_lm.BertForMaskedLM
    params: Any  # float32 initial parameters, stacked over the models (host or default device)
    dropout_keys: jax.Array  # each model's dropout key, placed on the model axis
    dtype: Any  # the compute dtype
    mesh: jax.sharding.Mesh
    buckets: BucketChoice
    steps_per_epoch: int
    total_steps: int

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def prepare(
    settings: Settings, workdir: Workdir, *, fresh: bool, clock: Stopwatch, abstract_state, lock: RunLock, read_data=None,
    masked_lm: bool = False,
) -> Run:  # fmt: skip
    """The run's inputs, checked, and its workdir ready and held (`lock`, by process 0);
    `abstract_state(param_shapes, settings, total_steps, dtype, mesh, models, weight_copies)` gives the
    train state's shapes, for the memory check before anything is loaded. A fine-tuning run by default;
    masked-LM pretraining passes its `read_data(settings)` (a `pretrain_data.Corpus`, whose `train`
    its steps and bucket lengths follow) and `masked_lm`."""
    if workdir.path.exists():
        _on_process_0(lock.hold)  # a live run's folder is refused at once, before any input is read
    with clock.phase("data"):
        data = read_data(settings) if read_data else splits.load_splits(settings.data, settings.model.dir)
    models = Models.of(settings)
    dtype = precision.compute_dtype(settings.model.dtype, jax.devices()[0].platform)
    mesh = distributed.make_mesh(models.count)
    distributed.check_batch_size(settings.train.batch_size, mesh)
    steps_per_epoch = input_pipeline.steps_per_epoch(len(data.train), settings.train.batch_size)
    total_steps = settings.train.num_epochs * steps_per_epoch
    if settings.train.max_steps is not None:
        total_steps = min(total_steps, settings.train.max_steps)
    init_keys, dropout_keys = models.keys()
    with clock.phase("model"):
        config = bert_config(settings, len(data.tokenizer))
        shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), settings.model.scan_layers))
        forms = kernels.choose(settings.model.kernels, dtype, jax.devices()[0].platform, config, settings.data.max_seq_len)
        abstract = abstract_state(models.shapes(shapes), settings, total_steps, dtype, mesh, models, forms.weight_copies)
        models.check_fits(abstract, mesh)
        model, params, load_note = load_models(settings, len(data.tokenizer), models, init_keys, dtype, masked_lm, forms)
    # Every process reads the whole train set, so all of them choose the same lengths.
    buckets = bucketing.choose(
        settings.data, data.train.lengths, flops_per_token(model.config, settings.data.max_seq_len), jax.devices()[0].platform,
        total_steps / steps_per_epoch,
        models=models.count,
    )  # fmt: skip
    run = Run(
        settings=settings, workdir=workdir, data=data, models=models, model=model, params=params,
        dropout_keys=models.put(dropout_keys, mesh), dtype=dtype, mesh=mesh, buckets=buckets,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
    )  # fmt: skip

    def ready_workdir() -> None:
        workdir.prepare(settings, fresh=fresh, lock=lock, masked_lm=masked_lm)
        workdir.write_records(settings, model.config, data.tokenizer, masked_lm)
        print(f"{load_note} {models.count} model(s) on the model axis: seed {', '.join(map(str, models.seeds))}.")
        if buckets.note:
            print(buckets.note)

    _on_process_0(ready_workdir)
    multihost_utils.sync_global_devices("workdir ready")
    return run


def _on_process_0(action) -> None:
    """Runs `action` on process 0 alone; the InputError it raises is raised on every process."""
    message = None
    if jax.process_index() == 0:
        try:
            action()
        except InputError as err:
            message = str(err)
    message = distributed.agree(message)
    if message is not None:
        raise InputError(message)
