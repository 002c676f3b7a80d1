"""Train-step throughput: our SigLIP step (JAX) vs open_clip (PyTorch, CPU) at equal
architecture, batch, loss (sigmoid), optimiser (AdamW, clip 1.0) and dtype (fp32).

    python benchmarks/train_bench.py [--cases tiny,S/16,B/16] [--batch 8] [--steps N]
        [--warmup 2] [--threads T] [--rounds R] [--peer-python PY] [--devices D]
        [--image-pool tok|gap] [--gpu --gpu-batch 256]

Peer (CPU wheels; no pretrained weights are ever downloaded, models are built from configs):
    pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install open_clip_torch

Each (framework, case) runs in its own subprocess (`--worker`), so the reported peak RSS is
that run's alone; `--rounds R` alternates R runs of each side per case (ours, peer, ours, ...)
and combines them (median over all their timed steps, spread, largest peak RSS).
`--peer-python` runs the peer under another interpreter (a venv holding torch + open_clip).
Each row also gives the process CPU time per step, which a loaded machine disturbs less. One JSON line per row as it goes; the last line is one JSON object with all
rows and per-case ratios ours / open_clip (examples/s: higher is better; peak RSS and params:
1.0 is parity). Without torch/open_clip only our side runs and "peer" is null. `--gpu` adds a
B/16 bf16 row with MFU when JAX sees a GPU (skipped with a note otherwise).
"""
import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tower sizes (variant, width, depth, mlp_dim, heads) are given explicitly and fed to BOTH sides,
# so neither framework's defaults (e.g. open_clip ViT-B-16's embed 512) can sneak in.
CASES = {
    "tiny": dict(img=("mu/8", 64, 2, 128, 2), txt=("mu", 64, 2, 128, 2), image_size=32,
                 text_len=16, vocab=320, embed=64, batch=64, steps=10),
    "S/16": dict(img=("S/16", 384, 12, 1536, 6), txt=("S", 384, 12, 1536, 6), image_size=224,
                 text_len=64, vocab=32000, embed=384, batch=8, steps=5),
    "B/16": dict(img=("B/16", 768, 12, 3072, 12), txt=("B", 768, 12, 3072, 12), image_size=224,
                 text_len=64, vocab=32000, embed=768, batch=8, steps=5),
}
OPTIM = dict(name="adamw", lr=1e-3, wd=1e-4, b1=0.9, b2=0.98, eps=1e-8, clip_norm=1.0)
T_INIT, B_INIT = 10.0, -10.0  # SigLIP's initial temperature and logit bias, on both sides
NOTES = [
    "Text: both towers bidirectional (open_clip no_causal_mask=True) and fed unpadded, "
    "full-length random tokens, so our pool 'last' (last non-padding token) and open_clip "
    "pool_type='last' pick the same position; open_clip's default argmax-EOT pooling with a "
    "causal mask costs the same FLOPs. Our text tower still applies its (all-true) padding mask.",
    "Image: open_clip always prepends a class token; with --image-pool gap it averages patches "
    "but runs N+1 tokens where ours runs N. With 'tok' (default) token counts are equal.",
    "Params: ours adds biases on the patch-embedding conv and image head (width + embed); "
    "open_clip adds a class token and its position embedding (2 x width, 1 x with pool 'tok' "
    "where ours has a class token too). open_clip's ln_pre is disabled to match ours.",
    "open_clip is set to tanh-GELU and LayerNorm eps 1e-6 to match flax defaults.",
    "Ours: warm-up+cosine lr and grad/param norms computed in the step; torch: constant lr, "
    "default AdamW (per-parameter loop on CPU), eager mode (no torch.compile).",
    "Data pipeline excluded on both sides: one fixed random batch, already in memory/on device.",
    "Peak RSS includes each framework's import footprint (import_rss_mib); rss_growth_ratio "
    "compares peak minus import. Ours also holds XLA compile/runtime memory.",
    "On a machine shared with other work torch's OpenMP threads can stall for a whole run "
    "(seen on 2 cores: a tiny step's median 340 ms against 24 ms in the run before): read "
    "each run's median (round_medians_ms) and the CPU time per step beside the pooled figure.",
]


def peak_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_steps(step, warmup, steps):
  """Wall and CPU time of `step()` (which must return only once its work is done).

  Returns {step_ms_median, step_ms_min, step_ms_max, cpu_ms_median}. CPU time is the process's
  (all its threads'): on a loaded machine wall time grows with the competition while CPU time
  stays close to the work done (plus any time threads spend spinning while they wait).
  """
  for _ in range(warmup):
    step()
  wall, cpu = [], []
  for _ in range(steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    step()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return dict(step_ms_median=1e3 * statistics.median(wall), step_ms_min=1e3 * min(wall),
              step_ms_max=1e3 * max(wall), cpu_ms_median=1e3 * statistics.median(cpu),
              step_ms=[round(1e3 * t, 2) for t in wall], cpu_ms=[round(1e3 * t, 2) for t in cpu])


def run_ours(case, batch, args, dtype="float32"):
  """Builds and compiles the step through the library exactly as `train/loop.py` does."""
  if args.devices:  # fake CPU devices; must be set before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  from siglip_fair.models.two_tower import make_model  # pylint: disable=g-import-not-at-top
  from siglip_fair.train.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from siglip_fair.train.sharding import (DEFAULT_RULES, batch_sharding, global_batch,  # pylint: disable=g-import-not-at-top
                                          make_mesh, state_shardings)
  from siglip_fair.train.state import make_init_fn, make_train_step  # pylint: disable=g-import-not-at-top
  import_rss = peak_rss_mib()

  n_dev = args.devices or 1
  mesh = make_mesh({"data": n_dev}, devices=jax.devices()[:n_dev])
  tower = lambda spec, **kw: dict(variant=spec[0], width=spec[1], depth=spec[2],  # noqa: E731
                                  mlp_dim=spec[3], num_heads=spec[4], **kw)
  model = make_model(ConfigDict(dict(
      image=tower(case["img"], pool=args.image_pool, posemb="learn"),
      text=tower(case["txt"], vocab_size=case["vocab"], max_len=case["text_len"], pool="last"),
      embed_dim=case["embed"], t_init=T_INIT, b_init=B_INIT, dtype=dtype)))
  tx, schedule = make_optimizer(ConfigDict(OPTIM), total_steps=10_000, warmup_steps=100)

  rng = np.random.default_rng(0)
  px = case["image_size"]
  local = {"image": rng.standard_normal((batch, px, px, 3), np.float32),
           "text": rng.integers(1, case["vocab"], (batch, case["text_len"]), np.int32)}
  init = make_init_fn(model, tx, local["image"], local["text"])
  seed = jax.random.key_data(jax.random.key(0))
  abstract = jax.eval_shape(init, seed)
  shardings = state_shardings(abstract, mesh, DEFAULT_RULES)
  state = jax.jit(init, out_shardings=shardings)(seed)
  bsharding = batch_sharding(mesh)
  data = global_batch(local, mesh)
  step_fn = make_train_step(model, tx, "sigmoid", schedule=schedule, state_sharding=shardings,
                            batch_sharding=bsharding)
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
  start = time.perf_counter()
  compiled = step_fn.lower(jax.tree.map(with_sharding, abstract, shardings),
                           jax.tree.map(lambda x: with_sharding(x, bsharding), data)).compile()
  compile_s = time.perf_counter() - start

  def step():
    nonlocal state
    state, metrics = compiled(state, data)
    # Dispatch is async: without blocking we would time only the enqueue.
    jax.block_until_ready((state, metrics))

  timing = time_steps(step, args.warmup, args.steps or case["steps"])
  med = timing["step_ms_median"] / 1e3
  from siglip_fair.train.flops import step_flops  # pylint: disable=g-import-not-at-top
  flops = step_flops(compiled)
  return dict(framework="siglip_fair", jax=jax.__version__, backend=jax.default_backend(),
              device_kind=jax.devices()[0].device_kind, devices=n_dev, dtype=dtype,
              params=int(sum(x.size for x in jax.tree.leaves(state.params))),
              compile_s=round(compile_s, 2), flops_per_step=flops,
              achieved_gflops=flops / med / 1e9 if flops else None, import_rss_mib=import_rss,
              **timing, examples_per_sec=batch / med)


def run_open_clip(case, batch, args):
  try:
    import numpy as np  # pylint: disable=g-import-not-at-top
    import open_clip  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from open_clip.loss import SigLipLoss  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    return dict(framework="open_clip", peer=None,
                message=f"open_clip/torch not importable ({type(e).__name__}: {e}); "
                        "install them to compare (see the module docstring).")
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  import_rss = peak_rss_mib()

  def tower(spec):
    _, width, depth, mlp_dim, heads = spec
    # Match flax's tanh-approximate GELU and LayerNorm eps so both sides compute the same ops.
    return dict(width=width, layers=depth, mlp_ratio=mlp_dim / width,
                act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": 1e-6})

  patch = int(case["img"][0].split("/")[1])
  vision_cfg = dict(tower(case["img"]), head_width=case["img"][1] // case["img"][4],
                    patch_size=patch, image_size=case["image_size"], no_ln_pre=True,
                    pool_type={"tok": "tok", "gap": "avg"}[args.image_pool])
  text_cfg = dict(tower(case["txt"]), heads=case["txt"][4], context_length=case["text_len"],
                  vocab_size=case["vocab"], no_causal_mask=True, pool_type="last",
                  proj_bias=True)
  # Built from a config dict: create_model would only look up named configs / weights.
  model = open_clip.CustomTextCLIP(case["embed"], vision_cfg, text_cfg,
                                   init_logit_scale=float(np.log(T_INIT)), init_logit_bias=B_INIT)
  model.train()
  # Same decay set as ours: matrices and token embeddings, not position embeddings/biases/norms.
  named = list(model.named_parameters())
  decay = [p for n, p in named if p.ndim >= 2 and "positional_embedding" not in n]
  no_decay = [p for n, p in named if not (p.ndim >= 2 and "positional_embedding" not in n)]
  opt = torch.optim.AdamW([dict(params=decay, weight_decay=OPTIM["wd"]),
                           dict(params=no_decay, weight_decay=0.0)],
                          lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"])
  loss_fn = SigLipLoss()
  px = case["image_size"]
  images = torch.randn(batch, 3, px, px)
  texts = torch.randint(1, case["vocab"], (batch, case["text_len"]))

  def step():  # torch on CPU is synchronous: returning means the update is done
    opt.zero_grad(set_to_none=True)
    zimg, ztxt, scale, bias = model(images, texts)
    loss_fn(zimg, ztxt, scale, bias).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["clip_norm"])
    opt.step()

  timing = time_steps(step, args.warmup, args.steps or case["steps"])
  return dict(framework="open_clip", open_clip=open_clip.__version__, torch=torch.__version__,
              params=int(sum(p.numel() for _, p in named)), import_rss_mib=import_rss,
              **timing, examples_per_sec=batch / (timing["step_ms_median"] / 1e3))


def run_gpu(args):
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "gpu":
    return dict(framework="siglip_fair", skipped=f"--gpu: backend is {jax.default_backend()}, "
                                                 "not gpu; no bf16/MFU row.")
  from siglip_fair.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  row = run_ours(CASES["B/16"], args.gpu_batch, args, dtype="bfloat16")
  peak = flops_lib.peak_flops(jax.devices()[0])
  steps_per_sec = row["examples_per_sec"] / args.gpu_batch
  row.update(batch=args.gpu_batch, peak_flops=peak,
             mfu=flops_lib.mfu(row["flops_per_step"], steps_per_sec, peak))
  return row


def worker(args):
  if args.threads < os.cpu_count():
    # XLA has no thread-count knob; pinning the process caps both frameworks the same way.
    os.sched_setaffinity(0, range(args.threads))
  name = args.cases
  if args.worker == "gpu":
    row = run_gpu(args)
  else:
    case = CASES[name]
    batch = case["batch"] if name == "tiny" else args.batch
    row = (run_ours if args.worker == "jax" else run_open_clip)(case, batch, args)
    row["batch"] = batch
  row.update(case=name if args.worker != "gpu" else "B/16-gpu", threads=args.threads,
             xla_flags=os.environ.get("XLA_FLAGS", ""), peak_rss_mib=peak_rss_mib(),
             # Other work on the machine skews timings; the load average (which counts this
             # worker's own threads) lets a reader tell.
             loadavg_1m=os.getloadavg()[0])
  if "import_rss_mib" in row:
    row["rss_growth_mib"] = row["peak_rss_mib"] - row["import_rss_mib"]
  print(json.dumps(row), flush=True)


FRAMEWORK = {"jax": "siglip_fair", "torch": "open_clip", "gpu": "siglip_fair"}


def spawn(kind, case, args):
  python = args.peer_python if kind == "torch" and args.peer_python else sys.executable
  cmd = [python, os.path.abspath(__file__), "--worker", kind, "--cases", case,
         "--batch", str(args.batch), "--warmup", str(args.warmup), "--threads",
         str(args.threads), "--image-pool", args.image_pool, "--gpu-batch", str(args.gpu_batch)]
  cmd += ["--steps", str(args.steps)] if args.steps else []
  cmd += ["--devices", str(args.devices)] if args.devices else []
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    return dict(framework=FRAMEWORK[kind], case=case, error=f"worker exited {proc.returncode}: "
                                                  f"{proc.stderr.strip()[-2000:]}")
  return json.loads(lines[-1])


def combine(runs):
  """One row per (case, framework) from its rounds: the median over the timed steps of all
  rounds (a round disturbed by other work then moves it less than a mean of the rounds), the
  spread of those steps, each round's median, the largest peak RSS."""
  ok = [r for r in runs if "step_ms_median" in r]
  if not ok:
    return runs[-1]
  med = statistics.median(t for r in ok for t in r["step_ms"])
  row = dict(ok[0], rounds=len(ok), step_ms_median=med,
             step_ms_min=min(r["step_ms_min"] for r in ok),
             step_ms_max=max(r["step_ms_max"] for r in ok),
             round_medians_ms=[round(r["step_ms_median"], 1) for r in ok],
             cpu_ms_median=statistics.median(t for r in ok for t in r["cpu_ms"]),
             examples_per_sec=ok[0]["batch"] / (med / 1e3),
             peak_rss_mib=max(r["peak_rss_mib"] for r in ok),
             loadavg_1m=[round(r["loadavg_1m"], 2) for r in ok])
  if "import_rss_mib" in row:
    row["rss_growth_mib"] = row["peak_rss_mib"] - row["import_rss_mib"]
  return row


def _ratio(a, b, key):
  ok = a and b and a.get(key) and b.get(key)
  return round(a[key] / b[key], 4) if ok else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default="tiny,S/16,B/16")
  parser.add_argument("--batch", type=int, default=8, help="batch of S/16 and B/16 (tiny: 64)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps (tiny 10, S/B 5)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--rounds", type=int, default=1,
                      help="alternating runs (ours, peer, ours, peer, ...) per case")
  parser.add_argument("--devices", type=int, default=None, help="JAX CPU devices (default 1)")
  parser.add_argument("--image-pool", choices=("tok", "gap"), default="tok")
  parser.add_argument("--gpu", action="store_true", help="add the B/16 bf16 MFU row on GPU")
  parser.add_argument("--gpu-batch", type=int, default=256)
  parser.add_argument("--peer-python", default=None,
                      help="interpreter for the open_clip workers (a separate venv holding "
                           "torch + open_clip); default: this one")
  parser.add_argument("--worker", choices=("jax", "torch", "gpu"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)

  cases = [c.strip() for c in args.cases.split(",") if c.strip()]
  unknown = [c for c in cases if c not in CASES]
  if unknown:
    parser.error(f"unknown cases {unknown}; known: {sorted(CASES)}")
  # find_spec does not import: the parent stays light and each worker pays its own imports.
  # With --peer-python the peer's own worker reports a failed import instead.
  missing = [] if args.peer_python else [
      m for m in ("torch", "open_clip") if importlib.util.find_spec(m) is None]
  peer_message = (f"{' and '.join(missing)} not installed: open_clip side skipped; install "
                  "with the commands in the module docstring." if missing else None)
  if peer_message:
    print(json.dumps(dict(peer=None, message=peer_message)), flush=True)

  rows, runs = [], {}
  for case in cases:
    # Rounds alternate ours and the peer (ours, peer, ours, peer, ...) so that a change in the
    # machine's load during the run falls on both sides alike.
    for _ in range(args.rounds):
      for kind in ("jax",) + (() if missing else ("torch",)):
        row = spawn(kind, case, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if row.get("peer", "") is None:  # the worker could not import the peer after all
          peer_message = row["message"]
        runs.setdefault(case, {}).setdefault(row.get("framework"), []).append(row)
  by_case = {c: {f: combine(r) for f, r in fw.items()} for c, fw in runs.items()}
  gpu = "skipped: pass --gpu (runs only where JAX sees a GPU)"
  if args.gpu:
    gpu = spawn("gpu", "B/16", args)
    print(json.dumps(gpu), flush=True)
    rows.append(gpu)

  pairs = {c: (r.get("siglip_fair"), r.get("open_clip")) for c, r in by_case.items()}
  ratios = lambda key: {c: _ratio(a, b, key) for c, (a, b) in pairs.items()}  # noqa: E731
  print(json.dumps(dict(
      peer=None if peer_message else "open_clip", peer_message=peer_message,
      threads=args.threads, cpu_count=os.cpu_count(), image_pool=args.image_pool, rows=rows,
      combined=by_case,
      ours_over_open_clip_examples_per_sec=ratios("examples_per_sec"),
      # open_clip's CPU seconds per step over ours: > 1 means ours does the step with less CPU.
      open_clip_over_ours_cpu_per_step={c: _ratio(b, a, "cpu_ms_median")
                                        for c, (a, b) in pairs.items()},
      peak_rss_ratio=ratios("peak_rss_mib"), rss_growth_ratio=ratios("rss_growth_mib"),
      param_count_ratio=ratios("params"),
      gpu=gpu.get("skipped", gpu) if isinstance(gpu, dict) else gpu, notes=NOTES)))


if __name__ == "__main__":
  main()
