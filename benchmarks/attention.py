"""Peak temporary memory and time of attention forward + backward: "xla" (dense float32 logits) vs "blockwise".

Memory is XLA's own figure for the compiled step (`compiled.memory_analysis().temp_size_in_bytes`: the scratch it
allocates beyond inputs and outputs), so it is exact and costs no run; a step whose figure is over --max-run-gb, or
longer than --run-up-to, is compiled but not run. Each run first checks that both paths agree, then times the
median of --repeats steps.
Inputs: one row of causal self-attention over a single document (so "blockwise" skips the tiles above the diagonal).

Run: PYTHONPATH=. /work/venv/bin/python -m benchmarks.attention [--seq-lens 1024,2048,4096,8192,32768,131072
     --run-up-to 8192 --heads 8 --kv-heads 2 --head-dim 64 --block 512 --repeats 3 --max-run-gb 3]
Prints one Markdown table row per sequence length.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.kernels.attention import attention


def make_step(implementation, seq_len, block):
    segment_ids, positions = jnp.ones((1, seq_len), jnp.int32), jnp.arange(seq_len)[None]

    def loss(q, k, v):
        out = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_positions=positions,
                        kv_positions=positions, scale=q.shape[-1] ** -0.5, implementation=implementation,
                        block_q=block, block_kv=block)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def time_step(compiled, args, repeats):
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="1024,2048,4096,8192,32768,131072")
    for name, default in (("run-up-to", 8192), ("heads", 8), ("kv-heads", 2), ("head-dim", 64), ("block", 512),
                          ("repeats", 3)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--max-run-gb", type=float, default=3.0)
    parser.add_argument("--dtype", default="float32")
    a = parser.parse_args()

    dtype = jnp.dtype(a.dtype)
    print(f"device: {jax.devices()[0].device_kind}; heads={a.heads} kv_heads={a.kv_heads} head_dim={a.head_dim} "
          f"block={a.block} {a.dtype}; fwd+bwd, batch 1")
    print("| seq | xla temp MiB | blockwise temp MiB | memory ratio | xla ms | blockwise ms | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for seq_len in map(int, a.seq_lens.split(",")):
        rng = np.random.default_rng(seq_len)
        shapes = ((seq_len, a.heads), (seq_len, a.kv_heads), (seq_len, a.kv_heads))
        args = tuple(jnp.asarray(rng.standard_normal((1, *s, a.head_dim)), dtype) for s in shapes)
        compiled, temp_mib, ms = {}, {}, {}
        for impl in ("xla", "blockwise"):
            compiled[impl] = make_step(impl, seq_len, a.block).lower(*args).compile()
            temp_mib[impl] = compiled[impl].memory_analysis().temp_size_in_bytes / 2**20
        runnable = [impl for impl in compiled if temp_mib[impl] <= 1024 * a.max_run_gb and seq_len <= a.run_up_to]
        if len(runnable) == 2:  # both paths must compute the same loss and gradients before they are timed
            results = {impl: jax.tree.leaves(compiled[impl](*args)) for impl in runnable}
            for got, want in zip(results["blockwise"], results["xla"]):
                np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                           rtol=2e-2, atol=2e-3 * float(np.abs(np.asarray(want, np.float32)).max()))
        for impl in runnable:
            ms[impl] = time_step(compiled[impl], args, a.repeats)
        fmt = lambda impl: f"{ms[impl]:.0f}" if impl in ms else "not run"  # noqa: E731
        time_ratio = f"{ms['xla'] / ms['blockwise']:.2f}" if len(ms) == 2 else "-"
        print(f"| {seq_len} | {temp_mib['xla']:.1f} | {temp_mib['blockwise']:.1f} | "
              f"{temp_mib['xla'] / temp_mib['blockwise']:.0f}x | {fmt('xla')} | {fmt('blockwise')} | {time_ratio} |",
              flush=True)


if __name__ == "__main__":
    main()
