"""Full-batch vs ring contrastive losses on 8 (fake CPU) devices: compiled temporary memory
per device and time of loss + gradient.

    python benchmarks/loss_bench.py [--devices 8] [--batches 1024,4096] [--dim 256]

The last line is one JSON object; ratios are ring / full (lower is better).
"""
import argparse
import json
import os
import sys
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batches", default="1024,4096")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  os.environ.setdefault("XLA_FLAGS",
                        f"--xla_force_host_platform_device_count={args.devices}")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from siglip_fair.train import losses, ring_losses  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((args.devices,), ("data",), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:args.devices])
  sharding = NamedSharding(mesh, P("data"))
  out = dict(devices=args.devices, dim=args.dim, backend=jax.default_backend(), rows=[])
  for name in ("sigmoid", "softmax"):
    full_fn = ((lambda zi, zt, t, b: losses.sigmoid_loss(zi, zt, t, b)[0]) if name == "sigmoid"
               else (lambda zi, zt, t, b: losses.softmax_loss(zi, zt, t)[0]))
    ring = ring_losses.ring_loss(name, mesh)
    ring_fn = lambda zi, zt, t, b, ring=ring: ring(zi, zt, t, b)[0]
    for n in map(int, args.batches.split(",")):
      key = jax.random.key(n)
      z = jax.random.normal(key, (2, n, args.dim))
      z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
      zi, zt = (jax.device_put(x, sharding) for x in z)
      row = dict(loss=name, batch=n)
      for impl, fn in (("full", full_fn), ("ring", ring_fn)):
        grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        compiled = grad.lower(zi, zt, 10.0, -10.0).compile()
        row[f"{impl}_temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
        jax.block_until_ready(compiled(zi, zt, 10.0, -10.0))
        start = time.perf_counter()
        for _ in range(args.repeats):
          value = jax.block_until_ready(compiled(zi, zt, 10.0, -10.0))
        row[f"{impl}_ms"] = 1e3 * (time.perf_counter() - start) / args.repeats
        row[f"{impl}_loss"] = float(value[0])
      row["temp_ratio"] = row["ring_temp_mib"] / row["full_temp_mib"]
      row["time_ratio"] = row["ring_ms"] / row["full_ms"]
      out["rows"].append(row)
      print(json.dumps(row), flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
