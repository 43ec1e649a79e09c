"""The model axis: a run trains N >= 1 models side by side, and this is the one module that knows how.

Model i of a run is the run of seed `seeds[i]` (`train.seeds`, or the run's one `seed`): its own
initial weights (or, on a pretrained encoder, its own fresh heads) and its own dropout stream;
the batches are shared. Everything with a per-model value, the train state and each parameter
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
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sda_jax.errors import InputError
from sda_jax.parallel import MODELS_AXIS

Tree = Any


@dataclasses.dataclass(frozen=True)
class Models:
    """The models of a run (model i: seed `seeds[i]`) and how their values sit on the model axis."""

    seeds: tuple[int, ...]

    @classmethod
    def of(cls, settings: Any) -> Models:
        return cls(settings.train.seeds or (settings.seed,))

    @property
    def count(self) -> int:
        return len(self.seeds)

    @property
    def _squeezed(self) -> bool:
        """One model: no axis in device memory (see the module docstring)."""
        return self.count == 1

    def describe(self) -> list[dict[str, int]]:
        """Each model as the records name it: its index on the axis and its seed."""
        return [{"model": i, "seed": seed} for i, seed in enumerate(self.seeds)]

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
                f"config key train.seeds: the train states of {self.count} model(s) need {per_device / 2**30:.1f} GiB "
                f"per device (from jax.eval_shape), more than 80% of the device's {limit / 2**30:.1f} GiB; train fewer "
                "seeds at once or on more devices"
            )
