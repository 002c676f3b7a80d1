"""The study of SPEC §5 as one config with its factors as arguments, and its sweeps.

    python -m siglip_fair train --config configs/study.py:data=balanced,switch=90%,seed=1 \
        --workdir w/study/one
    python launch/local.py --config configs/study.py --workdir w/study            # sweep_local
    python launch/local.py --config configs/study.py:scale=gpu --sweep sweep_gpu --workdir w/gpu
    python -m siglip_fair results --workdir w/study     # the table, Wilcoxon tests and plots

Arguments (``get_config("key=value,...")``):
  scale: local (2 CPU cores, minutes per run) | gpu (one accelerator, about an hour per run);
    sets the world's size and the model and batch sizes below.
  model: image tower variant (e.g. mu/8, Ti/8, S/16; the text tower gets the same size).
  width: tower width override (0 keeps the variant's).  embed: representation width.
  examples: examples seen, e.g. 150000ex or 2ep ('' keeps the scale's steps).
  train_size: training-set size, world.sizes.train (0 keeps the scale's).
  loss: sigmoid (SigLIP) | softmax (CLIP).
  data: baseline | balanced | balanced_proxies.
  switch: when training moves from baseline to `data`: 0% (from the start), 10%, 90%.
  seed: run seed.
Every run records these factors in `config.study`, which `results` groups by.
"""
from configs import demo
from siglip_fair.config import parse_arg

SCALES = {
    # sweep_local's 24 runs took 3560 s on 2 cores two at a time, 101 s of it shared setup
    # (README), i.e. ~288 s per run on one core.
    "local": dict(model="mu/8", width=64, depth=2, embed=64, res=32, steps=900, batch=128),
    "gpu": dict(model="S/16", width=0, depth=0, embed=384, res=64, steps=20000, batch=1024),
}
SWITCH_POINTS = ("0%", "10%", "90%")


def data_version(data: str, switch: str) -> str:
  """The `data_version` schedule of a (data, switch) cell."""
  if switch not in SWITCH_POINTS:
    raise ValueError(f"switch={switch!r}; use one of {SWITCH_POINTS}.")
  if data == "baseline" or switch == "0%":
    return data
  return f"baseline->{data}@{switch}"


def get_config(arg=None):
  a = parse_arg(arg, scale="local", model="", width=-1, embed=0, examples="", train_size=0,
                loss="sigmoid", data="baseline", switch="0%", seed=0)
  if a.scale not in SCALES:
    raise ValueError(f"scale={a.scale!r}; use one of {sorted(SCALES)}.")
  s = dict(SCALES[a.scale])
  s.update({k: v for k, v in dict(model=a.model, embed=a.embed).items() if v})
  if a.width >= 0:
    s["width"] = a.width
  size = s["model"].split("/")[0]
  c = demo.get_config(
      f"variant={s['model']},text={size},width={s['width']},depth={s['depth']},"
      f"embed={s['embed']},res={s['res']},steps={s['steps']},batch={s['batch']},"
      f"loss={a.loss},seed={a.seed}")
  c.data_version = data_version(a.data, a.switch)
  # No moving average of the weights here, unlike the demo: at 900 steps ema_decay=0.999 averages
  # over about the last 90 steps, the whole fine-tuning window of the 90 % switch, so the
  # evaluated model of that cell would be half the pre-switch one. With it the sweep read F4's RB
  # recovery as 5 % instead of 12 % (docs/NOISE.md, "a moving average of the weights").
  c.ema_decay = 0.0
  if a.examples:
    c.total = a.examples
  if a.scale == "gpu":
    c.world.sizes.train = 500_000
    c.world.sizes.update(dict(objects=5000, people=5000, retrieval=5000))
    c.cache_train = False
    c.model.dtype = "bfloat16"
  if a.train_size < 0:
    raise ValueError(f"train_size={a.train_size}; use a number of examples (0 keeps the "
                     "scale's).")
  if a.train_size:
    c.world.sizes.train = a.train_size
  c.study = dict(scale=a.scale, model=s["model"], width=s["width"], embed=s["embed"],
                 examples=a.examples or f"{s['steps'] * s['batch']}ex",
                 train_size=int(c.world.sizes.train), loss=a.loss, data=a.data,
                 switch=a.switch if a.data != "baseline" else "0%", seed=a.seed)
  if a.scale == "local":
    # Ten points on the RB / AB curves (each costs a few seconds on 2 cores): the curve
    # criterion and benchmarks/noise.py's training-step component read consecutive evaluations.
    c.eval_every = "10%"
  c.progress = False
  return c


# Six seeds: with n paired seeds the smallest two-sided exact Wilcoxon p is 2 / 2^n, and n = 6
# is the first n for which it is at most 0.05 (2 / 64 = 0.031).
SEEDS = range(6)
# The cells the findings of SPEC §5 compare (report/findings.py): baseline, balanced and
# balanced with proxies from the start, and balanced data switched in for the last 10 %
# (fine-tuning). No finding reads balanced_proxies at 90 %, so neither sweep pays for it.
CELLS = (("baseline", "0%"), ("balanced", "0%"), ("balanced_proxies", "0%"), ("balanced", "90%"))
# sweep_gpu's levels of the three scale axes (SPEC §5: model size, representation width, data
# size as examples seen and as training-set size), each at two levels, crossed.
GPU_MODELS = ("Ti/16", "S/16")
GPU_EMBEDS = (192, 384)
GPU_EXAMPLES = ("10240000ex", "20480000ex")  # 10000 and 20000 steps of batch 1024
GPU_TRAIN_SIZES = (250_000, 500_000)


def _versions(add, seeds=SEEDS, **fixed):
  """Every cell of `CELLS` for every seed."""
  for seed in seeds:
    for data, switch in CELLS:
      if data == "baseline":
        add(data=data, seed=seed, **fixed)
      else:
        add(data=data, switch=switch, seed=seed, **fixed)


def sweep_local(add):
  """6 seeds x 4 cells (`CELLS`): 24 runs, ~59 min on 2 CPU cores two at a time."""
  _versions(add)


def sweep_gpu(add):
  """Model size x representation width x examples seen x training-set size (2 levels each,
  crossed: 16 contexts) x the 4 cells x 6 seeds: 384 runs on one accelerator."""
  for model in GPU_MODELS:
    for embed in GPU_EMBEDS:
      for examples in GPU_EXAMPLES:
        for train_size in GPU_TRAIN_SIZES:
          _versions(add, scale="gpu", model=model, embed=embed, examples=examples,
                    train_size=train_size)


sweep = sweep_local
