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
  loss: sigmoid (SigLIP) | softmax (CLIP).
  data: baseline | balanced | balanced_proxies.
  switch: when training moves from baseline to `data`: 0% (from the start), 10%, 90%.
  seed: run seed.
Every run records these factors in `config.study`, which `results` groups by.
"""
from configs import demo
from siglip_fair.config import parse_arg

SCALES = {
    # 15 runs of ~2.5 min (two at a time) fit the 45 minutes the local sweep may take.
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
  a = parse_arg(arg, scale="local", model="", width=-1, embed=0, examples="", loss="sigmoid",
                data="baseline", switch="0%", seed=0)
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
  if a.examples:
    c.total = a.examples
  if a.scale == "gpu":
    c.world.sizes.train = 500_000
    c.world.sizes.update(dict(objects=5000, people=5000, retrieval=5000))
    c.cache_train = False
    c.model.dtype = "bfloat16"
  c.study = dict(scale=a.scale, model=s["model"], width=s["width"], embed=s["embed"],
                 examples=a.examples or f"{s['steps'] * s['batch']}ex", loss=a.loss,
                 data=a.data, switch=a.switch if a.data != "baseline" else "0%", seed=a.seed)
  if a.scale == "local":
    c.eval_every = "20%"  # five points on the RB / AB curves; each costs ~4 s on 2 cores
  c.progress = False
  return c


def _versions(add, seeds, **fixed):
  """Baseline, and each balanced version switched in at 0 % and 90 % of training."""
  for seed in seeds:
    add(data="baseline", seed=seed, **fixed)
    for data in ("balanced", "balanced_proxies"):
      for switch in ("0%", "90%"):
        add(data=data, switch=switch, seed=seed, **fixed)


def sweep_local(add):
  """3 seeds x (baseline + 2 balanced versions x 2 switch points): 15 runs on 2 CPU cores."""
  _versions(add, range(3))


def sweep_gpu(add):
  """Model size x representation width x data version on one accelerator, 3 seeds each."""
  for model in ("Ti/16", "S/16"):
    for embed in (192, 384):
      _versions(add, range(3), scale="gpu", model=model, embed=embed)


sweep = sweep_local
