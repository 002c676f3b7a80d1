"""One prepared accelerator check (issue 20): B/16 bf16 examples/s and MFU at the largest batch
that fits, with and without rematerialisation; the chunked (and, on several devices, ring)
sigmoid loss against the plain one at large batches; and the demo's training speed.

    python benchmarks/accelerator_check.py            # one GPU (H100: under 8 minutes)
    python benchmarks/accelerator_check.py --cpu-smoke  # tiny sizes, a few steps (CI, no GPU)
        [--parts b16,loss,demo] [--budget-s b16=290,loss=70,demo=40] [--deadline-s 470]
        [--remat none,full] [--batch 256] [--max-batch 8192] [--peak-flops F]

Parts, each within its own time budget (a trial whose estimated time, from the one before,
exceeds what is left is skipped and named in "skipped"):
  b16   the B/16 two-tower of benchmarks/train_bench.py at 224 px (image pool 'gap', 64 text
        tokens), model.dtype=bfloat16, AdamW, for each model.<tower>.remat mode (each with an
        equal share of the part's budget): batches doubling from --batch (the remat modes start
        at twice the largest that fitted without) until one runs out of memory, then 1.5x the
        last that fitted. A compiled program larger than the device's memory is not run. mfu:
        the model's FLOPs (XLA's count of the step without remat, before optimisation) per
        second over the peak (train/flops.py); hfu: XLA's count of the compiled program,
        recomputation included (what train/loop.py reports as mfu).
  loss  value and gradient of the sigmoid loss w.r.t. both [B, D] embeddings: 'full' ([B, B]
        logits), 'chunked' (loss_chunk rows at a time) and 'ring' (over all devices, skipped on
        one): time and the compiled program's memory, batches doubling until out of memory.
        The [B, D] embeddings are jax.random.normal(key(B), (2, B, D)) rows, L2-normalised.
  demo  configs/demo.py trained by the real loop (train/loop.train: sharded step, metric
        fetches, checkpoint at the end; evaluation off) on in-memory random batches of the
        demo's shapes (the input pipeline is item 3's benchmark): steps/s.
Progress lines go to stdout; the last line is one JSON object with every number, the device,
the JAX version and what was skipped. A watchdog prints that JSON (deadline_hit true, exit 3)
if the whole run reaches --deadline-s.
"""
import argparse
import gc
import json
import math
import os
import sys
import tempfile
import threading
import time

START = time.perf_counter()  # the watchdog's clock: imports count towards the deadline
# A bigger share of the GPU for XLA's allocator than its default 75 %: a larger batch fits. Set
# before jax is imported; a value in the environment wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from configs import demo  # noqa: E402
from siglip_fair.models.two_tower import make_model  # noqa: E402
from siglip_fair.train import backend, chunked_losses, loop, losses, ring_losses  # noqa: E402
from siglip_fair.train import flops as flops_lib  # noqa: E402
from siglip_fair.train.memory import is_oom  # noqa: E402
from siglip_fair.train.optim import make_optimizer  # noqa: E402
from siglip_fair.train.progress import read_metrics  # noqa: E402
from siglip_fair.train.sharding import (DEFAULT_RULES, batch_sharding, make_mesh,  # noqa: E402
                                        state_shardings)
from siglip_fair.train.state import make_init_fn, make_train_step  # noqa: E402
from train_bench import B_INIT, CASES, OPTIM, T_INIT  # noqa: E402

GPU = dict(budget="b16=290,loss=70,demo=40", deadline_s=470.0, batch=256, max_batch=8192,
           steps=10, trial_s=8.0, loss_dim=768, loss_batches="16384,32768,65536,131072",
           loss_chunk=1024, demo_steps=100, demo_batch=0)
SMOKE = dict(budget="b16=300,loss=120,demo=120", deadline_s=1800.0, batch=4, max_batch=4,
             steps=3, trial_s=0.5, loss_dim=32, loss_batches="128", loss_chunk=48,
             demo_steps=6, demo_batch=16)
# --cpu-smoke's stand-in for B/16 (the fields of train_bench.CASES): one block per tower, so
# that CI pays little compilation for the same code path.
SMOKE_CASE = dict(img=("mu/8", 32, 1, 64, 2), txt=("mu", 32, 1, 64, 2), image_size=16,
                  text_len=8, vocab=64, embed=32)
RESULT = {"skipped": [], "errors": []}
LOCK = threading.RLock()


def log(msg):
  with LOCK:  # never between the watchdog's JSON line and its exit
    print(f"[accelerator_check {time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def skip(msg):
  log(f"skipped: {msg}")
  with LOCK:
    RESULT["skipped"].append(msg)


def finish(code=0, **extra):
  with LOCK:
    RESULT.update(extra, elapsed_s=round(time.perf_counter() - START, 1))
    print(json.dumps(RESULT, default=str), flush=True)
    if code == 3:  # from the watchdog thread: end the process, whatever the main thread is in
      os._exit(code)


class Budget:
  def __init__(self, seconds):
    self.seconds, self.start = seconds, time.perf_counter()

  def left(self):
    return self.seconds - (time.perf_counter() - self.start)


def _is_oom(e):
  return is_oom(e) or "RESOURCE_EXHAUSTED" in str(e)


def _program_gib(compiled):
  """GiB the compiled program holds at its peak: arguments + outputs + temporaries - aliases."""
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total / 2**30, m.temp_size_in_bytes / 2**30
  except Exception:  # pylint: disable=broad-except  # some backends have no memory analysis
    return None, None


def _device_gib(key):
  stats = jax.devices()[0].memory_stats() or {}
  return stats[key] / 2**30 if key in stats else None


def _flops(stage):
  """XLA's FLOP count of a Lowered or Compiled stage (None where the backend has none)."""
  try:
    analysis = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
  value = (analysis or {}).get("flops")
  return float(value) if value and value > 0 else None


def _time_steps(run, n_max, seconds):
  """Seconds per call of `run` (which blocks): 2 warm-up calls, then as many as fit `seconds`
  (at least 3, at most n_max), timed together."""
  for _ in range(2):
    run()
  t = time.perf_counter()
  run()
  once = time.perf_counter() - t
  n = max(3, min(n_max, int(seconds / max(once, 1e-6))))
  t = time.perf_counter()
  for _ in range(n):
    run()
  return (time.perf_counter() - t) / n, n


def part_b16(args, budget):
  name = "smoke" if args.cpu_smoke else "B/16"
  case, dtype = SMOKE_CASE if args.cpu_smoke else CASES[name], "bfloat16"
  warning = backend.check_dtype(dtype)  # raises where the GPU has no bf16 (pre-Ampere)
  out = dict(case=name, dtype=dtype, image_size=case["image_size"], text_len=case["text_len"],
             scan=args.scan, rows=[], best={}, dtype_warning=warning)
  RESULT["b16"] = out
  px, length = case["image_size"], case["text_len"]

  def model(remat):
    tower = lambda spec, **kw: dict(variant=spec[0], width=spec[1], depth=spec[2],  # noqa: E731
                                    mlp_dim=spec[3], num_heads=spec[4], scan=args.scan,
                                    remat=remat, **kw)
    return make_model(ConfigDict(dict(
        image=tower(case["img"], pool="gap", posemb="learn"),
        text=tower(case["txt"], vocab_size=case["vocab"], max_len=length, pool="last"),
        embed_dim=case["embed"], t_init=T_INIT, b_init=B_INIT, dtype=dtype)))

  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])  # one device: the one-GPU user
  tx, schedule = make_optimizer(ConfigDict(OPTIM), total_steps=10_000, warmup_steps=100)
  plain = model("none")
  # Remat leaves the parameter tree as it is (tests/test_remat.py): one init serves all modes.
  init = make_init_fn(plain, tx, np.zeros((1, px, px, 3), np.float32),
                      np.ones((1, length), np.int32))
  seed = jax.random.key_data(jax.random.key(0))
  abstract = jax.eval_shape(init, seed)
  shardings = state_shardings(abstract, mesh, DEFAULT_RULES)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  init_jit = jax.jit(init, out_shardings=shardings)
  bsharding = batch_sharding(mesh)
  out["params"] = int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)))
  steps = {r: make_train_step(model(r), tx, "sigmoid", schedule=schedule,
                              state_sharding=shardings, batch_sharding=bsharding)
           for r in {"none", *args.remat}}
  peak = flops_lib.peak_flops(jax.devices()[0], args.peak_flops)
  limit = args.memory_limit_gib or _device_gib("bytes_limit")
  out.update(peak_flops=peak, device_memory_gib=limit)

  def trial(remat, batch):
    row = dict(remat=remat, batch=batch)
    t0 = time.perf_counter()
    abatch = {"image": jax.ShapeDtypeStruct((batch, px, px, 3), jnp.float32, sharding=bsharding),
              "text": jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=bsharding)}
    lowered = steps[remat].lower(abstract, abatch)
    # Model FLOPs: the step without recomputation, counted before XLA optimises it.
    model_flops = _flops(lowered if remat == "none" else steps["none"].lower(abstract, abatch))
    row["lower_s"] = round(time.perf_counter() - t0, 2)
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      if not _is_oom(e):
        raise
      return dict(row, status="oom_at_compile", trial_s=time.perf_counter() - t0)
    row["compile_s"] = round(time.perf_counter() - t0 - row["lower_s"], 2)
    row["program_gib"], row["temp_gib"] = _program_gib(compiled)
    if limit and row["program_gib"] and row["program_gib"] > limit:
      return dict(row, status="does_not_fit", trial_s=time.perf_counter() - t0)
    try:
      def make(key):
        k1, k2 = jax.random.split(key)
        return {"image": jax.random.normal(k1, (batch, px, px, 3), jnp.float32),
                "text": jax.random.randint(k2, (batch, length), 1, case["vocab"], jnp.int32)}
      data = jax.jit(make, out_shardings=bsharding)(jax.random.key(1))
      state, metrics = [init_jit(seed)], []

      def run():
        state[0], last = compiled(state[0], data)
        jax.block_until_ready((state[0], last))
        metrics[:] = metrics[:1] + [last]  # the first step's (initial parameters) and the last

      seconds, n = _time_steps(run, args.steps, args.trial_s)
      loss = float(metrics[0]["loss"])
    except Exception as e:  # pylint: disable=broad-except
      if not _is_oom(e):
        raise
      return dict(row, status="oom", trial_s=time.perf_counter() - t0)
    finally:
      state = data = metrics = None
      gc.collect()  # the trial's state and batch go before the next trial allocates
    hw_flops = flops_lib.step_flops(compiled)
    row.update(status="ok", step_ms=1e3 * seconds, timed_steps=n,
               examples_per_sec=batch / seconds, model_flops_per_step=model_flops,
               flops_per_step=hw_flops, mfu=flops_lib.mfu(model_flops, 1 / seconds, peak),
               hfu=flops_lib.mfu(hw_flops, 1 / seconds, peak), first_loss=loss,
               process_peak_gib=_device_gib("peak_bytes_in_use"),
               trial_s=time.perf_counter() - t0)
    return row

  for i, remat in enumerate(args.remat):
    # Each mode gets an equal share of what is left, so the last is not starved by the first.
    share = Budget(budget.left() / (len(args.remat) - i))
    fitted = [r["batch"] for r in out["rows"] if r["status"] == "ok"]
    batch = min(max(fitted) * 2, args.max_batch) if remat != "none" and fitted else args.batch
    last, refined = None, False
    while batch <= args.max_batch:
      done = [r["trial_s"] for r in out["rows"]]
      need = 1.5 * done[-1] if done else 0.0  # compile + twice the steps, roughly
      if share.left() < need:
        skip(f"b16 remat={remat} batch={batch}: {share.left():.0f}s of the mode's share of the "
             f"budget left, a trial takes ~{need:.0f}s")
        break
      log(f"b16 remat={remat} batch={batch} ...")
      row = trial(remat, batch)
      out["rows"].append(row)
      log("b16 " + json.dumps(row, default=str))
      if row["status"] == "ok":
        last = row
        if refined or batch * 2 > args.max_batch:
          break
        batch *= 2
      elif last and not refined and batch > last["batch"] * 3 // 2:
        batch, refined = last["batch"] * 3 // 2, True  # between the last fit and this one
      elif not last and not refined and fitted and batch > max(fitted):
        batch, refined = max(fitted), True  # at least the batch that fitted without remat
      else:
        break
    if last:
      out["best"][remat] = {k: last[k] for k in ("batch", "examples_per_sec", "mfu", "hfu",
                                                 "step_ms", "program_gib")}
    else:
      skip(f"b16 remat={remat}: no batch ran")


def part_loss(args, budget):
  out = dict(loss="sigmoid", dim=args.loss_dim, chunk=args.loss_chunk, rows=[], largest={})
  RESULT["loss"] = out
  one = make_mesh({"data": 1}, devices=jax.devices()[:1])
  chunked = chunked_losses.chunked_loss("sigmoid", args.loss_chunk)
  impls = {"full": (lambda zi, zt: losses.sigmoid_loss(zi, zt, T_INIT, B_INIT)[0], one),
           "chunked": (lambda zi, zt: chunked(zi, zt, T_INIT, B_INIT)[0], one)}
  if jax.device_count() > 1:
    ring_mesh = make_mesh({"data": -1})
    ring = ring_losses.ring_loss("sigmoid", ring_mesh)
    impls["ring"] = (lambda zi, zt: ring(zi, zt, T_INIT, B_INIT)[0], ring_mesh)
    out["ring_devices"] = jax.device_count()
  else:
    skip("loss ring: one device, where the ring is the full loss (it needs several devices)")
  stopped, last_s = set(), 0.0
  limit = args.memory_limit_gib or _device_gib("bytes_limit")
  for batch in (int(b) for b in args.loss_batches.split(",")):
    for impl, (fn, mesh) in impls.items():
      if impl in stopped:
        continue
      if budget.left() < 2.5 * last_s:
        skip(f"loss {impl} batch={batch}: {budget.left():.0f}s of the part's budget left")
        stopped.add(impl)
        continue
      t0 = time.perf_counter()
      sharding = NamedSharding(mesh, P("data"))
      row = dict(impl=impl, batch=batch, devices=mesh.size)
      try:
        def make(key):
          z = jax.random.normal(key, (2, batch, args.loss_dim), jnp.float32)
          z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
          return z[0], z[1]
        zi, zt = jax.jit(make, out_shardings=sharding)(jax.random.key(batch))
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(zi, zt).compile()
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["program_gib"], row["temp_gib"] = _program_gib(compiled)
        if limit and row["program_gib"] and row["program_gib"] > limit:
          raise MemoryError("RESOURCE_EXHAUSTED: the compiled program needs more than the "
                            "device has")
        value = [None]

        def run():
          value[0] = jax.block_until_ready(compiled(zi, zt))

        seconds, n = _time_steps(run, args.steps, args.trial_s)
        row.update(status="ok", ms=1e3 * seconds, timed_calls=n, value=float(value[0][0]),
                   process_peak_gib=_device_gib("peak_bytes_in_use"))
      except Exception as e:  # pylint: disable=broad-except
        if not _is_oom(e) and not isinstance(e, MemoryError):
          raise
        row["status"] = "does_not_fit" if isinstance(e, MemoryError) else "oom"
        stopped.add(impl)
      finally:
        zi = zt = value = None
        gc.collect()
      last_s = row["trial_s"] = time.perf_counter() - t0
      full = next((r for r in out["rows"] if r["impl"] == "full" and r["batch"] == batch
                   and r["status"] == "ok"), None)
      if full and row["status"] == "ok" and impl != "full":
        # The same loss: a check that the fast path computes what it should.
        row["rel_diff_vs_full"] = abs(row["value"] - full["value"]) / abs(full["value"])
        row["time_ratio_vs_full"] = row["ms"] / full["ms"]
      out["rows"].append(row)
      log("loss " + json.dumps(row, default=str))
  for impl in impls:
    ok = [r for r in out["rows"] if r["impl"] == impl and r["status"] == "ok"]
    if ok:
      out["largest"][impl] = {k: ok[-1][k] for k in ("batch", "ms", "program_gib")}


class _RandomBatches:
  """An endless iterator over a few fixed random batches, with the state API the loop needs."""

  def __init__(self, batches):
    self.batches, self.position = batches, 0

  def __next__(self):
    self.position += 1
    return self.batches[(self.position - 1) % len(self.batches)]

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


def part_demo(args, budget):
  config = demo.get_config()
  if args.demo_batch:
    config.batch_size = args.demo_batch
  steps = args.demo_steps
  config.total, config.log_every = str(steps), str(max(1, steps // 10))
  config.eval_every, config.ckpt_every = "never", "0"  # one checkpoint, at the end
  config.progress, config.tensorboard = False, False
  px, length = config.world.image_size, config.model.text.max_len
  out = dict(steps=steps, batch=config.batch_size, image_size=px, text_len=length,
             dtype=config.model.dtype, image_variant=config.model.image.variant,
             input="in-memory random batches (the input pipeline is not timed here)")
  RESULT["demo"] = out
  rng = np.random.default_rng(0)
  batches = [{"image": rng.uniform(-1, 1, (config.batch_size, px, px, 3)).astype(np.float32),
              "text": rng.integers(1, config.tokenizer.vocab_size, (config.batch_size, length),
                                   dtype=np.int32)} for _ in range(4)]
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    loop.train(config, workdir, train_iter=_RandomBatches(batches))
    out["train_call_s"] = time.perf_counter() - t0  # compile + steps + the final checkpoint
    logged = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  # The first window includes the first dispatches after compilation; the rest are steady.
  rates = [r["steps_per_sec"] for r in logged[1:]] or [r["steps_per_sec"] for r in logged]
  out.update(steps_per_sec=float(np.median(rates)), windows=len(rates),
             first_window_steps_per_sec=logged[0]["steps_per_sec"],
             final_loss=logged[-1]["loss"], first_loss=logged[0]["loss"])
  out["examples_per_sec"] = out["steps_per_sec"] * config.batch_size
  out["over_budget_s"] = max(0.0, -budget.left())  # one run of the loop cannot be cut short


PARTS = {"b16": part_b16, "loss": part_loss, "demo": part_demo}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, a few steps (CI)")
  parser.add_argument("--parts", default="b16,loss,demo")
  parser.add_argument("--budget-s", default=None, help="per part, e.g. b16=290,loss=70,demo=40")
  parser.add_argument("--deadline-s", type=float, default=None,
                      help="whole run (470; smoke 1800): the watchdog prints the JSON so far "
                      "and exits 3 there")
  parser.add_argument("--remat", default="none,full", help="model.<tower>.remat modes")
  parser.add_argument("--scan", action="store_true", help="model.<tower>.scan (faster compile)")
  parser.add_argument("--peak-flops", type=float, default=None, help="per device, for MFU")
  parser.add_argument("--memory-limit-gib", type=float, default=None,
                      help="programs larger than this are not run (default: the device's)")
  for key in ("batch", "max_batch", "steps", "demo_steps", "demo_batch", "loss_dim",
              "loss_chunk"):
    parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
  parser.add_argument("--trial-s", type=float, default=None, help="timed seconds per trial")
  parser.add_argument("--loss-batches", default=None)
  args = parser.parse_args()
  for key, value in (SMOKE if args.cpu_smoke else GPU).items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  args.remat = [r.strip() for r in args.remat.split(",") if r.strip()]
  budgets = dict(kv.split("=") for kv in args.budget.split(","))
  budgets.update(dict(kv.split("=") for kv in (args.budget_s or "").split(",") if kv))
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    parser.error(f"--parts: unknown {unknown}; known: {sorted(PARTS)}")
  device = jax.devices()[0]
  RESULT.update(mode="cpu-smoke" if args.cpu_smoke else "accelerator", jax=jax.__version__,
                backend=jax.default_backend(), device=device.device_kind,
                devices=backend.describe(), budget_s={p: float(budgets[p]) for p in parts},
                deadline_s=args.deadline_s, remat=args.remat)
  log(RESULT["devices"])
  watchdog = threading.Timer(max(args.deadline_s - (time.perf_counter() - START), 0),
                             lambda: (skip("deadline reached: the running part was cut off"),
                                      finish(3, deadline_hit=True)))
  watchdog.daemon = True
  watchdog.start()
  if jax.default_backend() == "cpu" and not args.cpu_smoke:
    note = backend.fallback_note() or "JAX found no accelerator"
    skip(f"all parts: backend is cpu ({note}); B/16 at 224 px on a CPU would take hours: run "
         "--cpu-smoke for the CPU check")
    finish(2)
    return 2
  for part in [p for p in PARTS if p in parts]:
    log(f"part {part}: budget {budgets[part]} s")
    try:
      PARTS[part](args, Budget(float(budgets[part])))
    except Exception as e:  # pylint: disable=broad-except  # report it and go on to the next
      msg = f"{part}: failed with {type(e).__name__}: {str(e)[:500]}"
      log(msg)
      with LOCK:
        RESULT["errors"].append(msg)
  watchdog.cancel()
  finish(0, deadline_hit=False)
  return 0


if __name__ == "__main__":
  sys.exit(main())
