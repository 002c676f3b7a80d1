"""TFDS builder `synthetic_world`: the synthetic world as ArrayRecord files.

Each world config gets its own TFDS builder config, named after a short
stable hash of the knobs, so different knob values never share a dataset
directory; the full knobs are stored as JSON in the config description (and
hence in dataset_info.json). Examples keep their generation order
(`disable_shuffling`), so record i of a split is example i and lines up with
per-example annotations and keep masks. Images are stored as raw uint8
tensors: `tfds.features.Image` would need TensorFlow to encode.
"""
import contextlib
import dataclasses
import hashlib
import json
import os

from absl import logging as absl_logging
from etils import epath
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from siglip_fair.data import world

_VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class WorldBuilderConfig(tfds.core.BuilderConfig):
  """A BuilderConfig carrying the world knobs as canonical JSON."""
  world_json: str = "{}"


def _world_json(world_cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(world_cfg.to_dict(), sort_keys=True,
                    separators=(",", ":"))


def builder_config(world_cfg: ml_collections.ConfigDict) -> WorldBuilderConfig:
  """The TFDS config for a world: name `s{seed}_{hash of all knobs}`."""
  world.validate_config(world_cfg)
  for split in world.SPLITS:
    if world_cfg.sizes[split] < 1:
      # TFDS refuses to finish an empty split (a bare AssertionError, after generating the
      # others), and every split is read: train for training, the rest by the evaluators.
      raise ValueError(f"world.sizes.{split}={world_cfg.sizes[split]}: every split of the "
                       "synthetic world needs at least one example (TFDS cannot write an empty "
                       f"split); e.g. --config.world.sizes.{split}=100.")
  knobs = _world_json(world_cfg)
  digest = hashlib.sha256(knobs.encode("utf-8")).hexdigest()[:12]
  return WorldBuilderConfig(
      name=f"s{world_cfg.seed}_{digest}", version=_VERSION,
      description=f"Synthetic biased world, knobs: {knobs}", world_json=knobs)


class SyntheticWorld(tfds.core.GeneratorBasedBuilder):
  """The synthetic biased world of SPEC §7 (one config per knob setting)."""

  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "Initial release."}
  # TFDS's default `code_path` lookup imports the `importlib_resources`
  # backport, which TFDS only declares for Python < 3.9; naming our own source
  # file avoids that dependency.
  code_path = epath.Path(__file__)

  def _world(self) -> ml_collections.ConfigDict:
    if not isinstance(self.builder_config, WorldBuilderConfig):
      raise ValueError("synthetic_world needs `config=builder_config("
                       "world_cfg)`; it has no named configs.")
    return ml_collections.ConfigDict(json.loads(self.builder_config.world_json))

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self._world()
    size, k = cfg.image_size, cfg.num_captions
    m, c, p = len(world.GROUPS), len(world.OCCUPATIONS), len(world.PROXIES)
    tensor = tfds.features.Tensor
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "id": tensor(shape=(), dtype=np.int64),
            "image": tensor(shape=(size, size, 3), dtype=np.uint8,
                           encoding=tfds.features.Encoding.BYTES),
            "captions": tensor(shape=(k,), dtype=np.object_),
            "kind": tensor(shape=(), dtype=np.int32),
            "gender": tensor(shape=(), dtype=np.int32),
            "s": tensor(shape=(m,), dtype=np.uint8),
            "occupation": tensor(shape=(), dtype=np.int32),
            "y": tensor(shape=(c,), dtype=np.uint8),
            "w": tensor(shape=(p,), dtype=np.uint8),
            "object_label": tensor(shape=(), dtype=np.int32),
        }),
        disable_shuffling=True,
        homepage="https://arxiv.org/abs/2403.04547",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated
    return {split: self._generate_examples(split) for split in world.SPLITS}

  def _generate_examples(self, split):
    for ex in world.iter_examples(self._world(), split):
      yield int(ex["id"]), ex


class CorruptRecordsError(ValueError):
  """A record of an ArrayRecord dataset does not read back; the message names the file."""


class CheckedSource:
  """A TFDS ArrayRecord source whose read failures name the shard file and the fix.

  array_record reports damage as a bare RuntimeError from a reader thread ('Corrupted
  Riegeli/records file: chunk data hash mismatch ...'), which names neither the dataset nor
  the file. Everything else (len, records, `dataset_info`, ...) is the wrapped source's.
  """

  def __init__(self, source, name: str, fix: str):
    self._source, self._name, self._fix = source, name, fix

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    try:
      return self._source[i]
    except (RuntimeError, OSError) as e:
      raise self._error(int(i), e) from None

  def __getitems__(self, indices):
    try:
      getitems = getattr(self._source, "__getitems__", None)
      return (getitems(indices) if getitems is not None
              else [self._source[i] for i in indices])
    except (RuntimeError, OSError) as e:
      raise self._error(self._first_bad(indices), e) from None

  def __getattr__(self, name):
    if name.startswith("_"):  # e.g. while unpickling, before __init__ ran
      raise AttributeError(name)
    return getattr(self._source, name)

  def __repr__(self) -> str:
    return f"CheckedSource({self._name}, {self._source!r})"

  def _first_bad(self, indices) -> int:
    for i in indices:
      try:
        self._source[int(i)]
      except (RuntimeError, OSError):
        return int(i)
    return int(indices[0]) if len(indices) else 0

  def _file(self, i: int) -> str:
    """The shard file that holds record i (array_record's read instructions, when present)."""
    reader = getattr(self._source, "data_source", None)
    start = 0
    for instruction in getattr(reader, "_read_instructions", None) or ():
      if i < start + instruction.num_records:
        return os.fspath(instruction.filename)
      start += instruction.num_records
    return "its ArrayRecord files"

  def _error(self, i: int, error: BaseException) -> CorruptRecordsError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return CorruptRecordsError(
        f"{self._name}: record {i} of {self._file(i)} cannot be read ({reason}); the "
        f"ArrayRecord shard is corrupted or truncated: {self._fix}.")


@contextlib.contextmanager
def _quiet_absl():
  """TFDS logs a warning for every custom builder config; ours are all custom."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


def _builder(world_cfg, data_dir) -> SyntheticWorld:
  with _quiet_absl():
    return SyntheticWorld(config=builder_config(world_cfg),
                          data_dir=os.fspath(data_dir), file_format="array_record")


def build(world_cfg: ml_collections.ConfigDict, data_dir) -> str:
  """Generates all splits under data_dir (reusing a complete build).

  Returns:
    The builder's data directory, data_dir/synthetic_world/<config>/<version>.
  """
  builder = _builder(world_cfg, data_dir)
  builder.download_and_prepare()  # no-op when the build is complete
  return os.fspath(builder.data_dir)


def data_source(world_cfg: ml_collections.ConfigDict, data_dir, split: str):
  """Random-access source of a built split; record i is example i.

  Raises ValueError if the world config has not been built under data_dir.
  """
  world.split_size(world_cfg, split)  # validates the split name
  builder = _builder(world_cfg, data_dir)
  if not builder.is_prepared():
    raise ValueError(f"No synthetic_world build for config "
                     f"{builder.builder_config.name} under {data_dir}; run "
                     "siglip_fair.data.builder.build(world_cfg, data_dir) first.")
  with _quiet_absl():
    source = tfds.data_source(
        "synthetic_world", split=split, data_dir=os.fspath(data_dir),
        download=False, builder_kwargs=dict(config=builder.builder_config,
                                            file_format="array_record"))
  return CheckedSource(
      source, f"synthetic_world split {split!r}",
      f"delete {os.fspath(builder.data_dir)} and run again, which regenerates the world from "
      "its config")


def num_examples(world_cfg: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples of a split (known without building)."""
  return world.split_size(world_cfg, split)
