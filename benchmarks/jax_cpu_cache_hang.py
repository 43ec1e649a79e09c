"""jaxlib 0.12.1, CPU: a cross-process program read from the persistent compilation cache never completes."""
import os  # noqa: E401
import subprocess
import sys
import tempfile

if len(sys.argv) == 1:  # the driver: two processes, twice, on one cache folder
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    for run in ("compiled", "from the cache"):
        procs = [subprocess.Popen([sys.executable, __file__, str(i)], env=env) for i in range(2)]
        try:
            print(run, "exit codes", [p.wait(timeout=60) for p in procs])
        except subprocess.TimeoutExpired:
            print(run, "HUNG (killed after 60 s)"), [p.kill() for p in procs]
    sys.exit()
import jax  # noqa: E401,E402
import jax.numpy as jnp

jax.distributed.initialize("127.0.0.1:12355", num_processes=2, process_id=int(sys.argv[1]))
mesh = jax.make_mesh((2,), ("x",))
x = jax.make_array_from_process_local_data(jax.NamedSharding(mesh, jax.P("x")), jnp.ones((8, 16)))
w = jax.device_put(jnp.ones((16, 4)), jax.NamedSharding(mesh, jax.P()))
step = jax.jit(lambda w, x: w - 0.1 * jax.grad(lambda w: jnp.mean((x @ w) ** 2))(w))  # all-reduces the gradient
print(jax.process_index(), float(step(w, x).sum()))
