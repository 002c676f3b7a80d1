"""Debiasing tasks that need no download.

`coloured_digits`: scikit-learn's 1797 handwritten digits (bundled with the library), binary
target y = digit >= 5, drawn in one of two colours. In the training split the colour agrees
with the target for a share `correlation` of the images (a spurious shortcut); in the test
split it is independent of the target. The colour is the sensitive attribute, so the four
(target, colour) pairs are the groups, and the minority groups of training are those where
colour and target disagree.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# Two ink colours (RGB in [0, 1]); the background stays black.
COLOURS = np.array([[1.0, 0.2, 0.2], [0.2, 0.5, 1.0]], np.float32)
SPLITS = ("train", "test")


def coloured_digits(split: str, *, correlation: float = 0.95, seed: int = 0,
                    test_fraction: float = 0.3, size: int = 16) -> dict[str, np.ndarray]:
  """The coloured-digits split as arrays.

  Args:
    split: 'train' or 'test' (a fixed `test_fraction` of the digits, chosen by `seed`).
    correlation: P(colour = target) in the training split; the test split uses 0.5.
    seed: the split and the colour draws are a pure function of it.
    size: image side (nearest-neighbour upscaling of the 8 x 8 digits).

  Returns:
    image uint8 [n, size, size, 3]; label int64 [n] (digit >= 5); colour int64 [n] in {0, 1};
    digit int64 [n].
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  if split not in SPLITS:
    raise ValueError(f"coloured_digits: split={split!r}; use one of {SPLITS}.")
  if not 0.0 <= correlation <= 1.0:
    raise ValueError(f"coloured_digits: correlation={correlation} must lie in [0, 1].")
  if size % 8:
    raise ValueError(f"coloured_digits: size={size} must be a multiple of 8.")
  digits = load_digits()
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(digits.target))
  cut = int(round(len(order) * (1 - test_fraction)))
  rows = np.sort(order[:cut] if split == "train" else order[cut:])
  digit = digits.target[rows].astype(np.int64)
  label = (digit >= 5).astype(np.int64)
  # Each split draws its colours from its own stream, so train and test stay independent.
  agree = np.random.default_rng([seed, SPLITS.index(split)]).random(len(rows)) < (
      correlation if split == "train" else 0.5)
  colour = np.where(agree, label, 1 - label)
  ink = np.kron(digits.images[rows] / 16.0, np.ones((size // 8, size // 8)))  # [n, s, s]
  image = ink[..., None] * COLOURS[colour][:, None, None, :]
  return {"image": np.round(255 * image).astype(np.uint8), "label": label, "colour": colour,
          "digit": digit}


# --- the common task interface ------------------------------------------------------------


@dataclasses.dataclass
class Task:
  """A target task: per split (train, val, test) uint8 images [n, S, S, 3], int64 labels [n]
  and int64 sensitive attributes [n] (None where the task has no sensitive labels)."""
  name: str
  splits: dict[str, dict[str, np.ndarray | None]]
  num_classes: int
  sensitive_names: tuple[str, ...]

  @property
  def num_sensitive(self) -> int:
    return len(self.sensitive_names)


def world_task(split: str, *, seed: int = 0, size: int = 2000, association: float = 0.9,
               world_overrides: dict | None = None) -> dict[str, np.ndarray]:
  """The synthetic world as a debiasing task (SPEC §7): people only, target = which
  occupation of its pair (0: the stereotypically female one, 1: the male one), sensitive =
  gender. Both occupations of a pair wear one uniform, so only the tool and the proxy objects
  show the target, while the background tint shows the gender; in 'train' and 'val'
  P(woman | female-stereotyped occupation) = 0.5 + association / 2 (the planted spurious
  correlation), in 'test' gender is independent of the occupation.

  Returns:
    image uint8 [n, S, S, 3], label int64 [n], sensitive int64 [n] (0 man, 1 woman).
  """
  from siglip_fair.data import world  # pylint: disable=g-import-not-at-top
  if split not in TASK_SPLITS:
    raise ValueError(f"world task: split={split!r}; use one of {TASK_SPLITS}.")
  cfg = world.default_config()
  cfg.update(dict(person_share=1.0, woman_prevalence=0.5, uniform_per_pair=True,
                  object_owner_rate=0.0))
  cfg.update(world_overrides or {})
  cfg.association = association if split != "test" else 0.0
  # Each split is its own world (own seed), so no image is shared between splits.
  cfg.seed = 3 * seed + TASK_SPLITS.index(split)
  cfg.sizes.train = size
  arrays = world.generate_split(cfg, "train")
  return {"image": arrays["image"], "label": (arrays["occupation"] % 2).astype(np.int64),
          "sensitive": arrays["gender"].astype(np.int64)}


TASK_SPLITS = ("train", "val", "test")
TASK_NAMES = ("digits", "world", "celeb_a", "utkface", "dollar_street")


def _digits_task(cfg) -> Task:
  train = coloured_digits("train", correlation=cfg.correlation, seed=cfg.seed, size=cfg.image_size)
  test = coloured_digits("test", correlation=cfg.correlation, seed=cfg.seed, size=cfg.image_size)
  # Validation comes from the training distribution (no balanced held-out data is assumed).
  n_val = int(round(len(train["label"]) * cfg.val_fraction))
  perm = np.random.default_rng([cfg.seed, 7]).permutation(len(train["label"]))
  pick = lambda d, rows: {"image": d["image"][rows], "label": d["label"][rows],
                          "sensitive": d["colour"][rows]}
  splits = {"train": pick(train, np.sort(perm[n_val:])), "val": pick(train, np.sort(perm[:n_val])),
            "test": pick(test, np.arange(len(test["label"])))}
  return Task("digits", splits, 2, ("red", "blue"))


def _world_task(cfg) -> Task:
  sizes = dict(train=cfg.size, val=cfg.val_size, test=cfg.test_size)
  splits = {s: world_task(s, seed=cfg.seed, size=sizes[s], association=cfg.association,
                          world_overrides=dict(cfg.get("world", {}))) for s in TASK_SPLITS}
  return Task("world", splits, 2, ("man", "woman"))


def _tfds_arrays(name, split, cfg, target_fn, sensitive_fn, rows=None,
                 topics=False) -> dict[str, np.ndarray]:
  from siglip_fair.data.datasets import load_source  # pylint: disable=g-import-not-at-top
  source = load_source(name, split, data_dir=cfg.get("data_dir") or None,
                       image_size=cfg.image_size)
  rows = np.arange(len(source)) if rows is None else rows
  if cfg.get("max_examples", 0):
    rows = rows[:int(cfg.max_examples)]
  if not len(rows):
    raise ValueError(f"{name} split {split!r} is empty.")
  records = [source[int(i)] for i in rows]
  out = {"image": np.stack([r["image"] for r in records]),
         "label": np.array([target_fn(r) for r in records], np.int64),
         "sensitive": np.array([sensitive_fn(r) for r in records], np.int64)}
  if topics:
    out["topic"] = np.array([r["topic"].decode("utf-8") for r in records])
  return out


def _celeb_a_task(cfg) -> Task:
  from siglip_fair.data.datasets import CELEB_A_ATTRIBUTES  # pylint: disable=g-import-not-at-top
  for key in ("target", "sensitive"):
    if cfg[key] not in CELEB_A_ATTRIBUTES:
      raise ValueError(f"task.{key}={cfg[key]!r} is not a CelebA attribute; choose from "
                       f"{CELEB_A_ATTRIBUTES}.")
  t, s = CELEB_A_ATTRIBUTES.index(cfg.target), CELEB_A_ATTRIBUTES.index(cfg.sensitive)
  names = {"train": "train", "val": "validation", "test": "test"}
  splits = {k: _tfds_arrays("celeb_a", v, cfg, lambda r: r["attributes"][t],
                            lambda r: r["attributes"][s]) for k, v in names.items()}
  return Task("celeb_a", splits, 2, (f"not {cfg.sensitive}", cfg.sensitive))


def _carved(name, split_name, cfg, target_fn, sensitive_fn, num_classes, sensitive_names):
  """train / val / test carved out of one TFDS split by a seeded permutation."""
  from siglip_fair.data.datasets import load_source  # pylint: disable=g-import-not-at-top
  n = len(load_source(name, split_name, data_dir=cfg.get("data_dir") or None))
  perm = np.random.default_rng([cfg.seed, 11]).permutation(n)
  n_test, n_val = int(round(n * cfg.test_fraction)), int(round(n * cfg.val_fraction))
  parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val],
           "train": perm[n_test + n_val:]}
  splits = {k: _tfds_arrays(name, split_name, cfg, target_fn, sensitive_fn, np.sort(rows))
            for k, rows in parts.items()}
  return Task(name, splits, num_classes, sensitive_names)


def _utkface_task(cfg) -> Task:
  from siglip_fair.data import faces  # pylint: disable=g-import-not-at-top
  names = faces.label_names("utkface")
  for key in ("target", "sensitive"):
    if cfg[key] not in names:
      raise ValueError(f"task.{key}={cfg[key]!r}; UTKFace fields are {sorted(names)}.")
  return _carved("utkface", "train", cfg, lambda r: r[cfg.target], lambda r: r[cfg.sensitive],
                 len(names[cfg.target]), tuple(names[cfg.sensitive]))


def _dollar_street_task(cfg) -> Task:
  """Target: the object's topic among the `num_topics` most frequent training topics (images of
  other topics are left out); sensitive: the home's income quartile or region."""
  from siglip_fair.data import dollar_street  # pylint: disable=g-import-not-at-top
  names = {"region": dollar_street.REGIONS,
           "income_quartile": tuple(f"income Q{i + 1}" for i in range(4))}
  if cfg.sensitive not in names:
    raise ValueError(f"task.sensitive={cfg.sensitive!r}; Dollar Street groups are {sorted(names)}.")
  raw = {split: _tfds_arrays("dollar_street", split, cfg, lambda r: 0,
                             lambda r: r[cfg.sensitive], topics=True)
         for split in ("train", "test")}
  topics, counts = np.unique(raw["train"]["topic"], return_counts=True)
  keep = topics[np.argsort(-counts, kind="stable")[:int(cfg.num_topics)]]
  keep = np.sort(keep)
  splits = {}
  for split, a in raw.items():
    rows = np.flatnonzero(np.isin(a["topic"], keep))
    splits[split] = {"image": a["image"][rows], "sensitive": a["sensitive"][rows],
                     "label": np.searchsorted(keep, a["topic"][rows]).astype(np.int64)}
  # Validation: a seeded share of the training split.
  n = len(splits["train"]["label"])
  perm = np.random.default_rng([cfg.seed, 13]).permutation(n)
  n_val = max(int(round(n * cfg.val_fraction)), 1)
  splits["val"] = {k: v[np.sort(perm[:n_val])] for k, v in splits["train"].items()}
  splits["train"] = {k: v[np.sort(perm[n_val:])] for k, v in splits["train"].items()}
  return Task("dollar_street", splits, len(keep), names[cfg.sensitive])


def load_task(cfg) -> Task:
  """The task named by cfg.name (see configs/debias.py for each task's knobs)."""
  loaders = {"digits": _digits_task, "world": _world_task, "celeb_a": _celeb_a_task,
             "utkface": _utkface_task, "dollar_street": _dollar_street_task}
  if cfg.name not in loaders:
    raise ValueError(f"task.name={cfg.name!r}; expected one of {TASK_NAMES}.")
  task = loaders[cfg.name](cfg)
  for split, arrays in task.splits.items():
    if not len(arrays["label"]):
      raise ValueError(f"task {cfg.name!r} has an empty {split} split.")
  return task
