"""Per-chip temporary memory of grad(blockwise attention) inside scanned layers, compiled by libtpu for one v5p chip
(compile only, no TPU needed; `pip install -e '.[tpu]'`):

    python benchmarks/blockwise_scan_memory.py [--seq-len 8192] [--heads 32] [--layers 2]

Two layers of q/k/v projections + blockwise attention + output projection, unrolled and as a lax.scan (what
model.scan_layers builds). Before the forward was checkpointed inside the kernel's custom_vjp rule, the scanned
version kept every float32 [block_q, block_kv] tile of every layer as a scan residual (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxopd.kernels.blockwise_attention import blockwise_attention

HEAD_DIM, D_MODEL = 128, 512


def temp_gib(seq_len: int, heads: int, layers: int, scanned: bool) -> float:
    device = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[:1]
    mesh = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Auto,), devices=device)
    positions, segment_ids = jnp.arange(seq_len)[None], jnp.ones((1, seq_len), jnp.int32)

    def layer(x_BxTxD, w_4xDxHxK):
        q, k, v = (jnp.einsum("btd,dhk->bthk", x_BxTxD, w_4xDxHxK[i]) for i in range(3))
        out = blockwise_attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                  q_positions=positions, kv_positions=positions, scale=HEAD_DIM ** -0.5)
        return x_BxTxD + jnp.einsum("bthk,dhk->btd", out, w_4xDxHxK[3])

    def loss(x, weights):
        if scanned:
            x, _ = jax.lax.scan(lambda x, w: (layer(x, w), None), x, weights)
        else:
            for index in range(layers):
                x = layer(x, weights[index])
        return x.astype(jnp.float32).sum()

    replicated = NamedSharding(mesh, PartitionSpec())
    x = jax.ShapeDtypeStruct((1, seq_len, D_MODEL), jnp.bfloat16, sharding=replicated)
    weights = jax.ShapeDtypeStruct((layers, 4, D_MODEL, heads, HEAD_DIM), jnp.bfloat16, sharding=replicated)
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, weights).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    for scanned in (False, True):
        print(f"{'scanned' if scanned else 'unrolled'}: {temp_gib(args.seq_len, args.heads, args.layers, scanned):.2f}"
              f" GiB temporaries (T={args.seq_len}, {args.heads} heads, {args.layers} layers, bf16, one v5p chip)")


if __name__ == "__main__":
    main()
