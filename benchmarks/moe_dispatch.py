"""Time routed-expert compute, forward + backward, for the dropless sort + ragged_dot dispatch against two baselines.

  dropless:   jaxopd.kernels.moe.moe_experts (sort pairs by expert, grouped matmuls, unsort)
  all-dense:  every expert on every token, combined with a [tokens, experts] gate matrix (E / k times the FLOPs)
  gather-w:   per-(token, slot) gather of the expert matrices ([tokens, k, d, f] of weights)

Run: PYTHONPATH=. /work/venv/bin/python -m benchmarks.moe_dispatch [--tokens 2048 --d 256 --f 128 --experts 32 --k 4]
Prints one Markdown table row per method (milliseconds per step, median of --repeats). On CPU, JAX lowers ragged_dot
as a masked matmul over all experts, so "dropless" loses there; its point is GPU/TPU grouped kernels.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.kernels import moe


def all_dense(x, ids, weights, w_gate, w_up, w_down):
    rows = jnp.arange(x.shape[0])[:, None]
    gates_TxE = jnp.zeros((x.shape[0], w_gate.shape[0]), weights.dtype).at[rows, ids].add(weights)
    hidden_ExTxF = jax.nn.silu(jnp.einsum("td,edf->etf", x, w_gate)) * jnp.einsum("td,edf->etf", x, w_up)
    return jnp.einsum("etf,efd,te->td", hidden_ExTxF, w_down, gates_TxE)


def gather_weights(x, ids, weights, w_gate, w_up, w_down):
    gate_TxKxF = jnp.einsum("td,tkdf->tkf", x, w_gate[ids])
    up_TxKxF = jnp.einsum("td,tkdf->tkf", x, w_up[ids])
    out_TxKxD = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(gate_TxKxF) * up_TxKxF, w_down[ids])
    return jnp.einsum("tkd,tk->td", out_TxKxD, weights)


def time_step(fn, args, repeats):
    step = jax.jit(jax.value_and_grad(lambda x, w, *ws: jnp.sum(fn(x, args[1], w, *ws) ** 2), argnums=(0, 1, 2, 3, 4)))
    call_args = (args[0],) + args[2:]
    jax.block_until_ready(step(*call_args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(*call_args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("tokens", 2048), ("d", 256), ("f", 128), ("experts", 32), ("k", 4), ("repeats", 5)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--dtype", default="float32")
    a = parser.parse_args()

    rng = np.random.default_rng(0)
    dtype = jnp.dtype(a.dtype)
    x = jnp.asarray(rng.normal(size=(a.tokens, a.d)), dtype)
    ids, weights, _ = moe.route(jnp.asarray(rng.normal(size=(a.tokens, a.experts)), jnp.float32), top_k=a.k)
    shapes = ((a.experts, a.d, a.f), (a.experts, a.d, a.f), (a.experts, a.f, a.d))
    w = tuple(jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), dtype) for s in shapes)
    args = (x, ids, weights) + w

    reference = np.asarray(moe.moe_experts(*args), np.float32)
    for fn in (all_dense, gather_weights):  # the baselines must compute the same thing before they are timed
        np.testing.assert_allclose(np.asarray(fn(*args), np.float32), reference, rtol=0.05, atol=0.05)

    sizes = f"tokens={a.tokens} d={a.d} f={a.f} experts={a.experts} k={a.k} {a.dtype}"
    print(f"device: {jax.devices()[0].device_kind}; {sizes}")
    print("| method | fwd+bwd ms |\n|---|---|")
    for name, fn in (("dropless", moe.moe_experts), ("all-dense", all_dense), ("gather-w", gather_weights)):
        print(f"| {name} | {time_step(fn, args, a.repeats):.2f} |")


if __name__ == "__main__":
    main()
