"""Lower and compile sda-jax's Pallas kernels (forward and backward) for an H100 on a CPU-only machine.

    python benchmarks/pallas_h100_lowering.py REPO   # in a venv with jax-cuda13-plugin == jaxlib (../shared/tools/h100-aot)

Not part of .ci/run (the plugin is ~400 MB): the check that the real Triton kernels trace and lower.
"""
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

sys.path.insert(0, sys.argv[1])
from sda_jax.kernels.fused_attention import attention16
from sda_jax.kernels.fused_layer_norm import residual_layer_norm16

TARGET = (pathlib.Path(sys.argv[1]).resolve().parent / "shared/tools/h100-aot/h100_sxm.txtpb").read_text()
topo = topologies.get_topology_desc("", "cuda", target_config=TARGET, topology="1x1x1")
mesh = Mesh(np.array(topo.devices), ("d",)); rep = NamedSharding(mesh, PartitionSpec())
S = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
heads, hd, batch = 12, 64, 4
def lower(jitted, args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        l = jitted.trace(*args).lower()
    return l.compile()

for length in (12, 48, 64):
    def att(y, bias, mask, key):
        return jnp.sum(attention16(y, bias, mask, jax.random.wrap_key_data(key), 0.1).astype(jnp.float32))
    args = (S((batch, length, 3 * heads, hd), jnp.bfloat16), S((3 * heads, hd), jnp.float32), S((batch, length), jnp.bool_), S((2,), jnp.uint32))
    t = time.time(); c = lower(jax.jit(jax.value_and_grad(att, argnums=(0, 1))), args)
    print("attention length", length, "compiled", f"{time.time() - t:.1f}s", "triton calls", c.as_text().count("__gpu$xla.gpu.triton"))
for hidden in (768, 32):
    def ln(y, db, res, scale, bias, key):
        out, out16 = residual_layer_norm16(y, db, res, scale, bias, jax.random.wrap_key_data(key), 0.1, 1e-12)
        return jnp.sum(out) + jnp.sum(out16.astype(jnp.float32))
    args = (S((batch * 48, hidden), jnp.bfloat16), S((hidden,), jnp.float32), S((batch * 48, hidden), jnp.float32),
            S((hidden,), jnp.float32), S((hidden,), jnp.float32), S((2,), jnp.uint32))
    t = time.time(); c = lower(jax.jit(jax.value_and_grad(ln, argnums=(0, 1, 2, 3, 4))), args)
    print("layer norm hidden", hidden, "compiled", f"{time.time() - t:.1f}s", "triton calls", c.as_text().count("__gpu$xla.gpu.triton"))
