"""M4 at scale vs a plain numpy pass and vs the exact QP solver (issue: M4 at web scale).

    python benchmarks/m4_bench.py                    # N = 10^7, c + p = 100
    python benchmarks/m4_bench.py --n 1000000 --qp-max-n 20000 --qp-budget 60

Measures, in one run:
  * M4 (`balance_stream`, all passes: totals + sample, solve, margins, budget, card, polish) on
    N examples with m = 2 groups and c + p = 100 labels and proxies, read from .npz shards;
  * a plain numpy pass over the same shards that only reads the annotations and computes one
    bias-vector product bᵀλ: the floor any balancer that reads the data once must pay;
  * peak memory of M4 over the same data in 1 (loaded whole), 5 and 50 shards (child
    processes);
  * the exact QP (cvxpy + Clarabel) on growing N until one solve exceeds --qp-budget seconds,
    and M4 in memory at the largest N the QP solved: objective gap and max violation for both.
The last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from siglip_fair.balance import m4, qp, shards, stream  # noqa: E402


def make_annotations(n: int, c: int, p: int, seed: int, unknown: float = 0.2) -> dict:
  """Web-like multi-hot annotations, uint8: a label (or none) per row, group depends on it."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, c + 1, n)
  y = np.zeros((n, c), np.uint8)
  has = label < c
  y[np.flatnonzero(has), label[has]] = 1
  p_woman = np.concatenate([rng.uniform(0.25, 0.5, c), [0.35]])[label]
  woman = rng.random(n) < p_woman
  known = (rng.random(n) >= unknown).astype(np.uint8)
  s = np.stack([~woman, woman], 1).astype(np.uint8) * known[:, None]
  w = (rng.random((n, p)) < np.where(woman[:, None], 0.06, 0.03)).astype(np.uint8)
  return dict(s=s, known=known, y=y, w=w, u=np.zeros(n, np.float32))


def config(eta=0.7):
  """Keep each group's prevalence, decorrelate it from every label and proxy."""
  cfg = m4.default_config()
  cfg.eta, cfg.pi = eta, None
  cfg.eps_rep, cfg.eps_assoc, cfg.tolerance = 0.005, 0.02, "relative"
  cfg.use_proxies = True
  return cfg


def write(n, c, p, num_shards, folder, seed=0):
  """Writes N rows in num_shards .npz files, generated a shard at a time."""
  bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
  for i in range(num_shards):
    ann = make_annotations(bounds[i + 1] - bounds[i], c, p, seed=seed * 100003 + i)
    shards.write_shards(ann, folder, 1, prefix=f"part{i:05d}")
  return folder


def numpy_pass(folder, lam) -> float:
  """Seconds to read every shard and compute bᵀλ per row (float32 numpy)."""
  start = time.perf_counter()
  for shard in shards.as_shards(folder):
    a = shard.read(0, len(shard))
    d = (a["s"].astype(np.float32) - 0.5) * a["known"].astype(np.float32)[:, None]
    (d @ lam["rep"] + ((d @ lam["assoc"]) * a["y"]).sum(1)
     + ((d @ lam["proxy"]) * a["w"]).sum(1))
  return time.perf_counter() - start


def run_m4(source, cfg):
  import jax
  start = time.perf_counter()
  result = stream.balance_stream(source, cfg, jax.random.key(0))
  return result, time.perf_counter() - start


def child_peak_rss(folder) -> float:
  """Peak RSS (MiB) of a fresh process that balances the shards in `folder`."""
  code = ("import sys, resource, jax; sys.path.insert(0, %r); "
          "from benchmarks.m4_bench import config; from siglip_fair.balance import stream; "
          "stream.balance_stream(%r, config(), jax.random.key(0)); "
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code % (root, folder)], check=True,
                       capture_output=True, text=True).stdout.split()[-1]
  return int(out) / 1024


def violation(q, ann, cfg, pi, eps) -> float:
  mom = m4.constraint_moments(q, ann, pi)
  return float(max(np.max(np.abs(mom[b]) - eps[b]) for b in ("rep", "assoc", "proxy")))


def qp_ladder(c, p, budget, max_n):
  """Exact QP on N = 5k, 10k, 20k, ... until a solve takes > budget s; M4 at each N."""
  rows, n = [], 5000
  while n <= max_n:
    raw = make_annotations(n, c, p, seed=7)  # M4 reads uint8, as from the shards above
    ann = {k: v.astype(np.float32) for k, v in raw.items()}
    cfg = config()
    start = time.perf_counter()
    exact = qp.solve_qp(ann, cfg, tight=False)  # Clarabel's defaults: the QP at its usual speed
    t_qp = time.perf_counter() - start
    if exact["q"] is None:
      print(f"QP at N={n}: {exact['status']}", flush=True)
      break
    _, t_cold = run_m4(raw, cfg)  # includes compiling for this N's shapes
    result, t_m4 = run_m4(raw, cfg)
    row = dict(n=n, qp_s=t_qp, m4_s=t_m4, m4_cold_s=t_cold, speedup=t_qp / t_m4,
               qp_objective=exact["objective"],
               m4_objective=qp.objective(result.q, ann["u"], cfg.eta),
               qp_max_violation=violation(exact["q"], ann, cfg, exact["pi"], exact["eps"]),
               m4_max_violation=violation(result.q, ann, cfg, exact["pi"], exact["eps"]))
    row["objective_gap"] = (row["m4_objective"] - row["qp_objective"]) / abs(row["qp_objective"])
    rows.append(row)
    print(json.dumps(row), flush=True)
    if t_qp > budget:
      break
    n *= 2
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=10_000_000)
  parser.add_argument("--labels", type=int, default=80)
  parser.add_argument("--proxies", type=int, default=20)
  parser.add_argument("--shards", type=int, default=20)
  parser.add_argument("--memory-n", type=int, default=2_000_000,
                      help="N for the few-vs-many-shards peak-memory comparison")
  parser.add_argument("--qp-budget", type=float, default=150.0,
                      help="stop the QP ladder after a solve slower than this (seconds)")
  parser.add_argument("--qp-max-n", type=int, default=1_280_000)
  args = parser.parse_args()
  c, p = args.labels, args.proxies
  out = dict(n=args.n, m=2, c=c, p=p, shards=args.shards, cpus=os.cpu_count())
  with tempfile.TemporaryDirectory() as tmp:
    big = write(args.n, c, p, args.shards, os.path.join(tmp, "big"))
    cfg = config()
    # The first run compiles (merged-row counts set some shapes, so a smaller warm-up would
    # not do); the second, timed, reuses the compiled programs, as a sweep's later runs do.
    _, t_cold = run_m4(big, cfg)
    result, t_m4 = run_m4(big, cfg)
    card = result.card
    lam = jax_free_lambda(result.duals)
    numpy_pass(big, lam)  # page cache warm for both
    t_np = numpy_pass(big, lam)
    out.update(m4_seconds=t_m4, m4_cold_seconds=t_cold, numpy_pass_seconds=t_np,
               m4_over_numpy_pass=t_m4 / t_np,
               verdict=card["verdict"], max_residual=card["largest_violation"]["residual"],
               kept=card["kept"]["expected"], kish_ess=card["kish_ess"],
               polish_steps=card["dual_steps"]["polish"], sample=card["solved_on"]["sample"],
               m4_phase_seconds=card["seconds"])
    print(json.dumps(out), flush=True)
    for k in (1, 5, 50):  # one shard is loaded whole: the contrast for bounded memory
      folder = write(args.memory_n, c, p, k, os.path.join(tmp, f"mem{k}"))
      out[f"peak_rss_mib_{k}_shards"] = child_peak_rss(folder)
    print(json.dumps(out), flush=True)
  ladder = qp_ladder(c, p, args.qp_budget, args.qp_max_n)
  if ladder:
    top = ladder[-1]
    out.update(qp_largest_n=top["n"], qp_seconds=top["qp_s"], m4_seconds_at_qp_n=top["m4_s"],
               speedup_at_qp_n=top["speedup"], objective_gap_at_qp_n=top["objective_gap"],
               qp_max_violation=top["qp_max_violation"],
               m4_max_violation_at_qp_n=top["m4_max_violation"], qp_ladder=ladder)
  out["peak_rss_mib_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(out))


def jax_free_lambda(duals):
  return {k: (np.asarray(v[0]) - np.asarray(v[1])).astype(np.float32)
          for k, v in duals["v"].items()}


if __name__ == "__main__":
  main()
