"""Compile time of forward+backward against depth, scanned (`model.scan_layers`) and unrolled.

`jax.jit(grad of mean(logits**2)).lower(shapes).compile()` of the tiny preset (MLA, a dense first layer then MoE,
one MTP depth) at 2 and at 32 layers, from shape structs alone (nothing is allocated), with the persistent
compilation cache off so every compile is a real one. Prints the seconds and the 32-over-2 ratio per layout.

Run: PYTHONPATH=. JAX_PLATFORMS=cpu python -m benchmarks.scan_compile [--layers 2,32 --seq 64]
"""

import argparse
import contextlib
import time

import jax
import jax.numpy as jnp

from jaxopd.model import ModelConfig, Transformer, load_preset


@contextlib.contextmanager
def no_compilation_cache():
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)


def compile_seconds(config: ModelConfig, batch: int = 2, seq: int = 64) -> float:
    """Seconds to lower and compile forward+backward of `config` for `[batch, seq]` tokens (shapes only)."""
    model = Transformer(config)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))["params"])

    def loss(p, t):
        features = model.apply({"params": p}, t, method="features")
        return jnp.mean(model.apply({"params": p}, features.hidden, method="logits") ** 2) + features.moe_balance_loss

    with no_compilation_cache():
        start = time.perf_counter()
        jax.jit(jax.grad(loss)).lower(params, tokens).compile()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,32")
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    depths = [int(n) for n in args.layers.split(",")]
    print("| layout | " + " | ".join(f"{n} layers (s)" for n in depths) + f" | {depths[-1]}/{depths[0]} |")
    print("|---|" + "---|" * (len(depths) + 1))
    for scan_layers in (True, False):
        seconds = [compile_seconds(load_preset("tiny").replace(num_layers=n, scan_layers=scan_layers), seq=args.seq)
                   for n in depths]
        print(f"| {'scanned' if scan_layers else 'unrolled'} | " + " | ".join(f"{s:.1f}" for s in seconds)
              + f" | {seconds[-1] / seconds[0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
