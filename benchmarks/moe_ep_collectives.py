"""Collective bytes of expert-parallel MoE dispatch, all-gather against all-to-all, from TPU-compiled programs.

Compiles forward + backward (grads of x, routing weights and the three expert weights) of one routed-expert layer
for a TPU slice with the TPU compiler (libtpu; no TPU needed), on a mesh whose only axis, "expert", shards both
the tokens and the experts, and counts from the compiled HLO text each collective's data operand bytes per chip:
  all-gather / reduce-scatter / all-reduce / all-to-all / ragged-all-to-all / collective-permute (sync or -start),
and estimates the bytes each chip sends (n = expert axis size): all-gather (n-1) x operand, reduce-scatter and
all-to-all (n-1)/n x operand, all-reduce 2(n-1)/n x operand. A ragged-all-to-all's operand is its static buffer;
it sends only the filled rows, at most tokens x k rows per chip per exchange whatever the routing, so its
"sent" column is that bound. Also memory_analysis' temporaries per chip.

Run: PYTHONPATH=. python -m benchmarks.moe_ep_collectives [--topology v5p:2x2x2 --tokens 4096 --d 7168 --f 2048
     --experts 256 --k 8 --capacity 1.25]
Prints one Markdown table row per dispatch.
"""

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopd.kernels import moe
from jaxopd.plan import topology_devices

COLLECTIVES = ("ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z\-]+)\((.*?)\)(.*)$")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def _shape_bytes(shape_text: str) -> int:
    return sum(_BYTES[dtype] * int(np.prod([int(n) for n in dims.split(",") if n] or [1]))
               for dtype, dims in _ARRAY.findall(shape_text))


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Data operand bytes per collective kind, summed over the compiled module's instructions."""
    shapes, totals = {}, dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, operands, _ = match.groups()
        shapes[name] = shape
        kind = opcode.removesuffix("-start")
        if kind not in totals:
            continue
        names = [o.strip().lstrip("%").split(" ")[-1].lstrip("%") for o in operands.split(",") if o.strip()]
        if kind == "ragged-all-to-all":
            names = names[:1]  # the data; the rest are the output buffer and the offsets
        totals[kind] += sum(_shape_bytes(shapes.get(n, "")) for n in names)
    return totals


def sent_bytes(totals: dict[str, int], n: int, ragged_bound: int) -> float:
    """Estimated bytes each chip sends (see the module docstring)."""
    return ((n - 1) * totals["all-gather"] + (n - 1) / n * (totals["reduce-scatter"] + totals["all-to-all"])
            + 2 * (n - 1) / n * totals["all-reduce"] + totals["collective-permute"]
            + (ragged_bound if totals["ragged-all-to-all"] else 0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:2x2x2")
    for name, default in (("tokens", 4096), ("d", 7168), ("f", 2048), ("experts", 256), ("k", 8)):
        parser.add_argument(f"--{name}", type=int, default=default, help="tokens: per chip")
    parser.add_argument("--capacity", type=float, default=1.25, help="capacity factor of the capped rows")
    a = parser.parse_args()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    devices = topology_devices(a.topology)
    n = len(devices)
    mesh = jax.sharding.Mesh(np.array(devices), ("expert",))
    tokens = a.tokens * n
    spec = lambda shape, dtype, axes: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))
    args = (spec((tokens, a.d), jnp.bfloat16, ("expert",)), spec((tokens, a.k), jnp.int32, ("expert",)),
            spec((tokens, a.k), jnp.float32, ("expert",)), spec((a.experts, a.d, a.f), jnp.bfloat16, ("expert",)),
            spec((a.experts, a.d, a.f), jnp.bfloat16, ("expert",)), spec((a.experts, a.f, a.d), jnp.bfloat16, ("expert",)))
    a2a = lambda **kw: (lambda *x: moe.moe_experts_all_to_all(*x, mesh=mesh, token_axes=("expert",), **kw)[0])
    dispatches = {
        "all_gather": lambda *x: moe.moe_experts_expert_parallel(*x, mesh=mesh, token_axes=("expert",)),
        "all_to_all dropless": a2a(),
        f"all_to_all capacity {a.capacity}": a2a(capacity_factor=a.capacity),
        "ragged_all_to_all dropless": a2a(exchange="ragged_all_to_all"),
        f"ragged_all_to_all capacity {a.capacity}": a2a(exchange="ragged_all_to_all", capacity_factor=a.capacity),
    }
    gib = 2.0**30
    ragged_bound = 2 * a.tokens * a.k * a.d * 2  # filled bf16 rows there and back, per chip, forward
    print(f"{a.topology} ({n} chips, expert={n}); per chip {a.tokens} tokens, d={a.d} f={a.f} "
          f"experts={a.experts} top-{a.k}, bf16, forward+backward")
    print("| dispatch | all-gather | reduce-scatter | all-reduce | all-to-all | ragged-a2a buffer | "
          "sent/chip (est.) | temp/chip | compile s |\n|---|---|---|---|---|---|---|---|---|")
    for name, fn in dispatches.items():
        # A probe-weighted loss: the output's cotangent must be data (a sum's would be constant ones, folded away).
        loss = lambda probe, x, ids, w, *ws, fn=fn: jnp.sum(fn(x, ids, w, *ws).astype(jnp.float32) * probe)
        step = jax.jit(jax.grad(loss, argnums=(1, 3, 4, 5, 6)))
        start = time.perf_counter()
        compiled = step.lower(args[0], *args).compile()
        seconds = time.perf_counter() - start
        totals = collective_bytes(compiled.as_text())
        # Backward runs the exchanges again (their transposes), so the ragged bound doubles.
        sent = sent_bytes(totals, n, 2 * ragged_bound)
        temp = compiled.memory_analysis().temp_size_in_bytes
        cells = [totals[k] / gib for k in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                                           "ragged-all-to-all")]
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {sent / gib:.3f} | {temp / gib:.3f} | "
              f"{seconds:.1f} |", flush=True)
    print("(GiB per chip; operand bytes per collective kind, summed over the program's collectives)")


if __name__ == "__main__":
    main()
