"""The model axis: a run trains N >= 1 models side by side, and this is the one module that knows how.

The models of a run are the grid of its sweep (`sweep.<key>`: the Cartesian product of the swept
keys' values), or its one model. Model i is the run of its own values: its seed (`sweep.seed`, or
the run's `seed`) draws its initial weights (or, on a pretrained encoder, its fresh heads) and its
dropout stream, its other values are the arrays of its `Hyperparameters`; the batches are shared
(their order comes from the run's `seed`). Everything with a per-model value, the train state and each parameter
set evaluation scores, carries the models on a leading axis, split over the mesh's `models`
axis, and the train and eval steps are `vmap`ped over it.

One model is the same run with the axis squeezed away in device memory: its programs are the
one-model functions themselves, so that a single model's run is exactly the program of the plain
train step (bit for bit: XLA fuses a program with size-1 reshapes in it differently, which moves
results in the last bit). `Models` is the one place that tells the two apart: its `lift`,
`stack`, `take`, `expand`, `sharding` and `put` give every caller the same view, the axis there
on the host whatever N is.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sda_jax.errors import InputError
from sda_jax.parallel.distributed import MODELS_AXIS
from sda_jax.step.hyperparameters import Hyperparameters

Tree = Any


@dataclasses.dataclass(frozen=True)
class Models:
    """The models of a run (model i: the swept values `members[i]`) and how their values sit on the axis."""

    members: tuple[tuple[tuple[str, Any], ...], ...]  # per model: ((sweep key, value), ...)
    seed: int  # the run's seed: of a model that does not sweep it

    @classmethod
    def of(cls, settings: Any) -> Models:
        names = [name for name, _ in settings.sweep]
        grid = itertools.product(*(values for _, values in settings.sweep))
        return cls(tuple(tuple(zip(names, combination, strict=True)) for combination in grid), settings.seed)

    @classmethod
    def of_seeds(cls, seeds: Sequence[int]) -> Models:
        """A sweep over `seed` alone (the benchmarks', the tests')."""
        return cls(tuple((("seed", seed),) for seed in seeds), seeds[0])

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(dict(member).get("seed", self.seed) for member in self.members)

    def values(self, index: int) -> dict[str, Any]:
        """Model `index`'s swept values, its seed included: {"seed": 2, "optim.learning_rate": 3e-5}."""
        return {"seed": self.seeds[index], **dict(self.members[index])}

    def settings_of(self, settings: Any, index: int) -> Any:
        """The settings model `index` trains with: the run's, with its swept values."""
        return settings.with_values(dict(self.members[index]))

    def hyperparameters(self, settings: Any, total_steps: int) -> Hyperparameters:
        """Each model's `Hyperparameters`, on the axis."""
        return self.stack([Hyperparameters.of(self.settings_of(settings, i), total_steps) for i in range(self.count)])

    @property
    def _squeezed(self) -> bool:
        """One model: no axis in device memory (see the module docstring)."""
        return self.count == 1

    def describe(self) -> list[dict[str, Any]]:
        """Each model as the records name it: its index on the axis and its values."""
        return [{"model": i, **self.values(i)} for i in range(self.count)]

    def keys(self) -> tuple[list[jax.Array], jax.Array]:
        """(each model's initialisation key, their dropout keys on the axis): one split of each seed's key."""
        pairs = [jax.random.split(jax.random.key(seed)) for seed in self.seeds]
        return [pair[0] for pair in pairs], self.stack([pair[1] for pair in pairs])

    # --- device values: one tree per model <-> the axis ---------------------------------------

    def stack(self, trees: Sequence[Tree]) -> Tree:
        """One tree per model, as the run holds them: stacked on the axis (one model: the tree itself)."""
        if self._squeezed:
            return trees[0]
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)

    def take(self, tree: Tree, index: int) -> Tree:
        """Model `index` of a tree as the run holds it."""
        return tree if self._squeezed else jax.tree.map(lambda x: x[index], tree)

    def shapes(self, tree: Tree) -> Tree:
        """The shapes of N stacked copies of a one-model tree of shapes (for `jax.eval_shape`)."""
        lead = () if self._squeezed else (self.count,)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((*lead, *x.shape), x.dtype), tree)

    def lift(self, fn: Callable[..., Any], in_axes: tuple[int | None, ...]) -> Callable[..., Any]:
        """`fn` of one model, for arguments on the axis where `in_axes` is 0 (None: shared by all
        models); its outputs come out on the axis. `jax.vmap`, which batches each matmul over the
        models; one model: `fn` itself."""
        return fn if self._squeezed else jax.vmap(fn, in_axes=in_axes)

    def sharding(self, mesh: Mesh, *rest: str | None) -> NamedSharding:
        """Values on the axis split over the mesh's model groups (and their next axes by `rest`)."""
        return NamedSharding(mesh, PartitionSpec(*([] if self._squeezed else [MODELS_AXIS]), *rest))

    def abstract(self, tree: Tree, mesh: Mesh) -> Tree:
        """Shapes and dtypes of a tree on the axis, placed (for compiling ahead)."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.sharding(mesh)), tree)

    def put(self, tree: Tree, mesh: Mesh) -> Tree:
        """A tree on the axis that every process holds whole (host or device arrays, keys too) as
        global arrays, also where the mesh spans processes (device_put cannot place those)."""
        sharding = self.sharding(mesh)

        def place(x):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(place(jax.random.key_data(x)), impl=jax.random.key_impl(x))
            data = np.asarray(x)
            return jax.make_array_from_callback(data.shape, sharding, lambda index: data[index])

        return jax.tree.map(place, tree)

    # --- host values ----------------------------------------------------------------------------

    def expand(self, tree: Tree) -> Tree:
        """Host values fetched from the axis, with the model axis in front whatever N is."""
        return jax.tree.map(lambda x: np.asarray(x)[None] if self._squeezed else np.asarray(x), tree)

    def check_fits(self, abstract_state: Tree, mesh: Mesh) -> None:
        """A clear error before training when the models' train states cannot fit in a device's
        memory (where JAX reports it). The estimate counts the state alone: activations and
        compiled programs need room too, so 80% of the device is the limit."""
        local = [d for d in mesh.devices.flat if getattr(d, "process_index", jax.process_index()) == jax.process_index()]
        limit = (local[0].memory_stats() or {}).get("bytes_limit")  # only this process's devices answer
        if not limit:
            return
        groups = mesh.shape.get(MODELS_AXIS, 1)
        per_device = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)) // groups
        if per_device > 0.8 * limit:
            raise InputError(
                f"config keys sweep.*: the train states of {self.count} model(s) need {per_device / 2**30:.1f} GiB "
                f"per device (from jax.eval_shape), more than 80% of the device's {limit / 2**30:.1f} GiB; sweep fewer "
                "values at once, or on more devices"
            )
