"""The embedded synthetic biased world (SPEC §7).

People with a perceived-gender cue (the background tint) work in occupations
with visual cues (uniform colour, tool); proxy objects co-occur with
occupations; object-only scenes carry class labels. Some object scenes of the
train and retrieval splits have an owner: no person is shown, but the owner's
group is the scene's ground truth and the captions name it ("a woman's car"),
so object images, like web images, co-occur with group words at the planted
prevalence. Captions come from templates that sometimes name the group, the
occupation and the objects.

Knobs (world_config.py) switch on richer object scenes and captions, with defaults that keep
the world above bit for bit: composed scenes of shape x colour x pattern objects in varied
sizes, positions, counts and backgrounds (scenes.py), descriptive captions that say what each
image shows (captions.py), and owners whose group depends on the object's class
(owner_attribute_skew), so that a model's group preference on object images is spread over
images rather than one shared direction.

Every example is a pure function of (config, split, index): examples are drawn
in fixed chunks of CHUNK_SIZE rows, each from its own generator seeded with
(seed, split id, chunk index), and every random number of a chunk is drawn for
all its rows before any is used (the composed scenes' from a second generator per chunk, so the
legacy stream is unchanged). So an example does not depend on the split
size or on which range of the split is generated.
"""
from collections.abc import Iterator

import ml_collections
import numpy as np

from siglip_fair.data import captions as captions_lib
from siglip_fair.data import render
from siglip_fair.data import scenes
# Re-exported: the knobs live in world_config.py.
from siglip_fair.data.world_config import CAPTION_STYLES  # pylint: disable=unused-import
from siglip_fair.data.world_config import OBJECT_BACKGROUNDS  # pylint: disable=unused-import
from siglip_fair.data.world_config import OBJECT_SCENES  # pylint: disable=unused-import
from siglip_fair.data.world_config import _complete
from siglip_fair.data.world_config import default_config  # pylint: disable=unused-import
from siglip_fair.data.world_config import describe  # pylint: disable=unused-import
from siglip_fair.data.world_config import object_class_names
from siglip_fair.data.world_config import owner_woman_probability
from siglip_fair.data.world_config import split_size
from siglip_fair.data.world_config import validate_config
from siglip_fair.data.world_config import woman_probability
# Re-exported: the names live in vocab.py, read by captions.py and scenes.py too.
from siglip_fair.data.vocab import GROUP_NOUNS  # pylint: disable=unused-import
from siglip_fair.data.vocab import GROUPS  # pylint: disable=unused-import
from siglip_fair.data.vocab import NEUTRAL_NOUN  # pylint: disable=unused-import
from siglip_fair.data.vocab import OBJECT_CLASSES
from siglip_fair.data.vocab import OCCUPATION_PAIRS  # pylint: disable=unused-import
from siglip_fair.data.vocab import OCCUPATIONS
from siglip_fair.data.vocab import PROXIES
from siglip_fair.data.vocab import SPLITS

CHUNK_SIZE = 1000
TINT_MEANS = (0.25, 0.75)  # per group, GROUPS order
OWNER_SPLITS = ("train", "retrieval")  # never `objects`: it measures RB


def _stratified_uniform(rng, mask):
  """Uniforms over the rows of `mask`, one per equal-width stratum of [0, 1).

  A threshold at p then selects round(p * n) +- 1 of the n rows, so the realised rates of a
  chunk match the knobs up to rounding instead of binomial noise (1.0 outside the mask).
  """
  idx = np.flatnonzero(mask)
  u = np.ones(mask.shape)
  u[idx] = (rng.permutation(idx.size) + rng.random(idx.size)) / max(idx.size, 1)
  return u


def _stratified_latents(cfg, split, rng, n):
  """Person / occupation / gender / tool / owner draws of one chunk, stratified so that person
  share, occupation shares, P(woman | occupation), tool rate per occupation, owner share and
  owner gender share are met per chunk (the planted skews are the point of the world, so they
  should not drift with the seed)."""
  person = _stratified_uniform(rng, np.ones(n, bool))
  if split == "people":
    is_person = np.ones(n, bool)
  elif split == "objects":
    is_person = np.zeros(n, bool)
  else:
    is_person = person < cfg.person_share
  c = len(OCCUPATIONS)
  occupation = np.minimum((_stratified_uniform(rng, is_person) * c).astype(np.int64), c - 1)
  woman, tool = np.ones(n), np.ones(n)
  for k in range(c):
    cell = is_person & (occupation == k)
    woman = np.where(cell, _stratified_uniform(rng, cell), woman)
    tool = np.where(cell, _stratified_uniform(rng, cell), tool)
  # One uniform per object scene decides both whether it has an owner (< object_owner_rate) and
  # the owner's group (< object_owner_rate * owner_woman_prevalence, or the class's
  # owner_woman_probability under owner_attribute_skew): given an owner it is uniform on
  # [0, object_owner_rate), so both shares are stratified (without skew; with it, the overall
  # share only up to binomial noise over classes), and the random stream (hence every image)
  # depends on none of these knobs.
  owner = _stratified_uniform(rng, ~is_person & (split in OWNER_SPLITS))
  return dict(person=person, occupation=occupation, woman=woman, tool=tool,
              owner=owner)


def _draw_chunk(cfg, split, chunk):
  """All random numbers of one chunk, CHUNK_SIZE rows each."""
  rng = np.random.default_rng([cfg.seed, SPLITS.index(split), chunk])
  n, k, p, size = CHUNK_SIZE, cfg.num_captions, len(PROXIES), cfg.image_size
  big = 1 << 30  # template / synonym draws, reduced modulo each list length
  return dict(
      **_stratified_latents(cfg, split, rng, n),
      object_label=rng.integers(0, len(OBJECT_CLASSES), n),
      proxy=rng.random((n, p)),
      tint=rng.standard_normal(n),
      tint_uniform=rng.random(n),
      centre=rng.uniform(-1.0, 1.0, (n, 2)),
      proxy_jitter=rng.uniform(-1.0, 1.0, (n, p, 2)),
      name_group=rng.random((n, k)),
      wrong_group=rng.random((n, k)),
      noun=rng.integers(0, big, (n, k)),
      template=rng.integers(0, big, (n, k)),
      name_occupation=rng.random((n, k)),
      mention=rng.random((n, k, p)),
      pixels=rng.standard_normal((n, size, size, 3), dtype=np.float32),
      # Drawn by a generator of their own so that every draw above, hence the legacy world,
      # is what it was before composed scenes existed.
      **scenes.draw(np.random.default_rng([cfg.seed, SPLITS.index(split), chunk, 1]), n, k),
  )


def _labels(cfg, split, r, ids):
  """Ground-truth latents of rows ids from the chunk's random numbers r."""
  n, c, p = ids.size, len(OCCUPATIONS), len(PROXIES)
  if split == "objects":
    kind = np.zeros(n, np.int32)
  elif split == "people":
    kind = np.ones(n, np.int32)
  else:
    kind = (r["person"] < cfg.person_share).astype(np.int32)
  person = kind == 1
  owned = ~person & (r["owner"] < cfg.object_owner_rate)
  occupation = np.where(person, r["occupation"], -1).astype(np.int32)
  if split == "objects":  # exactly balanced classes
    object_label = (ids % len(object_class_names(cfg))).astype(np.int32)
  else:
    drawn = r["object_label"] if cfg.object_scenes == "legacy" else scenes.drawn_labels(cfg, r)
    object_label = np.where(person, -1, drawn).astype(np.int32)
  if split == "people":  # exactly balanced groups
    gender = (ids % 2).astype(np.int32)
  else:
    # Given an owner, r["owner"] / object_owner_rate is uniform on [0, 1), so the owner is a
    # woman with her class's probability (owner_woman_prevalence for every class without skew).
    owner_woman = owner_woman_probability(cfg)[np.maximum(object_label, 0)]
    is_woman = np.where(
        person, r["woman"] < woman_probability(cfg)[r["occupation"]],
        r["owner"] < cfg.object_owner_rate * owner_woman)
    gender = np.where(person | owned, is_woman, -1).astype(np.int32)
  own = np.eye(c, p, dtype=bool)[r["occupation"]]
  rate = np.where(own, cfg.proxy_strength, cfg.proxy_base_rate)
  rate = np.where(person[:, None], rate, cfg.object_proxy_rate)
  if split == "people":
    # Proxies at random, independent of group and occupation: like the varied backgrounds of a
    # face data set, they spread the occupation preference across images, so AB measures how
    # far the group shifts it rather than which side of a knife-edge identical images fall on.
    rate = np.full_like(rate, cfg.people_proxy_rate)
  w = r["proxy"] < rate
  # gender/occupation -1 rows index the last one-hot row; the masks zero them.
  return dict(
      id=ids.astype(np.int64), kind=kind, gender=gender,
      s=(np.eye(len(GROUPS), dtype=np.uint8)[gender] *
         (gender >= 0)[:, None]),
      occupation=occupation,
      y=(np.eye(c, dtype=np.uint8)[occupation] * person[:, None]),
      w=w.astype(np.uint8), object_label=object_label)


def _render(cfg, split, r, ex, scene):
  """uint8 [n,S,S,3] images of the examples ex (scene: scenes.attributes of the rows)."""
  person = ex["kind"] == 1
  means = np.asarray(TINT_MEANS)[np.maximum(ex["gender"], 0)]
  tint = np.where(person, np.clip(means + cfg.tint_std * r["tint"], 0, 1),
                  r["tint_uniform"])
  img = render.background(tint, cfg.image_size)
  if cfg.object_background == "grey":
    img[~person] = render.NEUTRAL_BACKGROUND
  elif cfg.object_background == "varied":
    img[~person] = scenes.backgrounds(scene["background"][~person], cfg.image_size)
  cx = 0.5 + cfg.jitter * r["centre"][:, 0]
  cy = 0.5 + cfg.jitter * r["centre"][:, 1]
  idx = np.flatnonzero(person)
  cues = np.full(idx.size, split != "people")
  tool = r["tool"][idx] < cfg.tool_rate
  colours = (render.PAIR_UNIFORM_COLOURS if cfg.uniform_per_pair
             else render.UNIFORM_COLOURS)
  img[idx] = render.draw_people(img[idx], cx[idx], cy[idx],
                                ex["occupation"][idx], cues, tool, colours)
  idx = np.flatnonzero(~person)
  if cfg.object_scenes == "composed":
    img[idx] = scenes.draw_scenes(img[idx], {key: v[idx] for key, v in scene.items()})
  else:
    img[idx] = render.draw_objects(img[idx], cx[idx], cy[idx], ex["object_label"][idx])
  img = render.draw_proxies(img, ex["w"], 0.5 * cfg.jitter * r["proxy_jitter"])
  return render.to_uint8(img, r["pixels"], cfg.noise)


def caption_alphabet() -> frozenset[str]:
  """Every character a caption of any world can hold: the templates' literal text and every
  word they are filled with. A tokenizer needs a piece for each (plus pad, eos and unk), so
  this bounds the smallest vocabulary before any data are built."""
  import string  # pylint: disable=g-import-not-at-top
  literal = [text for t in captions_lib.TEMPLATES for text, *_ in string.Formatter().parse(t)]
  return frozenset("".join(literal + captions_lib.alphabet_words()))


def _chunks(cfg, split, start, stop):
  """Yields (r, ex, scene) per chunk of rows [start, stop): draws, labels, scene attributes."""
  for chunk in range(start // CHUNK_SIZE, -(-stop // CHUNK_SIZE)):
    lo = max(start, chunk * CHUNK_SIZE)
    hi = min(stop, (chunk + 1) * CHUNK_SIZE)
    rows = slice(lo - chunk * CHUNK_SIZE, hi - chunk * CHUNK_SIZE)
    r = {key: v[rows] for key, v in _draw_chunk(cfg, split, chunk).items()}
    ex = _labels(cfg, split, r, np.arange(lo, hi))
    yield r, ex, scenes.attributes(cfg, np.maximum(ex["object_label"], 0), r)


def _check_range(cfg, split, start, stop):
  size = split_size(cfg, split)
  stop = size if stop is None else stop
  if not 0 <= start <= stop <= size:
    raise ValueError(f"Need 0 <= start={start} <= stop={stop} <= "
                     f"world.sizes.{split}={size}.")
  return stop


def scene_attributes(cfg: ml_collections.ConfigDict, split: str, start: int = 0,
                     stop: int | None = None) -> dict[str, np.ndarray]:
  """What the object scenes of rows [start, stop) show, without rendering them.

  Returns int64 arrays [N] shape, colour, pattern (indices into scenes.SHAPES, COLOUR_NAMES,
  PATTERNS), size, count, background and [N, scenes.MAX_OBJECTS] column, row (grid cells;
  slots >= count are -1). Rows of people are -1 throughout, and so are a legacy scene's
  attributes (its class fixes shape and colour), but for its background ('varied' worlds).
  """
  cfg = _complete(cfg)
  validate_config(cfg)
  stop = _check_range(cfg, split, start, stop)
  keys = ("shape", "colour", "pattern", "size", "count", "background", "column", "row")
  parts = []
  for _, ex, scene in _chunks(cfg, split, start, stop):
    part = {key: scene[key].astype(np.int64) for key in keys}
    slots = np.arange(scenes.MAX_OBJECTS)[None, :] >= part["count"][:, None]
    for key in ("column", "row"):
      part[key][slots] = -1
    person = ex["kind"] == 1
    if cfg.object_scenes == "legacy":
      person = np.ones_like(person)  # all but the background mean nothing there
    for key in keys:
      part[key][person] = -1
    if cfg.object_background == "varied":
      part["background"] = np.where(ex["kind"] == 1, -1, scene["background"])
    parts.append(part)
  if not parts:
    return {key: np.zeros((0,) + ((scenes.MAX_OBJECTS,) if key in ("column", "row") else ()),
                          np.int64) for key in keys}
  return {key: np.concatenate([p[key] for p in parts]) for key in keys}


def generate_split(cfg: ml_collections.ConfigDict, split: str, start: int = 0,
                   stop: int | None = None) -> dict[str, np.ndarray]:
  """Examples [start, stop) of a split as stacked arrays.

  Returns the keys of one example (docs/ARCHITECTURE.md) with a leading
  dimension N = stop - start: id int64 [N], image uint8 [N,S,S,3], captions
  object(bytes) [N,K], kind/gender/occupation/object_label int32 [N],
  s uint8 [N,m], y uint8 [N,c], w uint8 [N,p].
  """
  cfg = _complete(cfg)
  validate_config(cfg)
  stop = _check_range(cfg, split, start, stop)
  parts = []
  for r, ex, scene in _chunks(cfg, split, start, stop):
    ex["image"] = _render(cfg, split, r, ex, scene)
    ex["captions"] = captions_lib.captions(cfg, split, r, ex, scene)
    parts.append(ex)
  if not parts:
    return _empty(cfg)
  return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _empty(cfg):
  s, k = cfg.image_size, cfg.num_captions
  i32 = np.zeros(0, np.int32)
  return dict(id=np.zeros(0, np.int64), kind=i32, gender=i32,
              s=np.zeros((0, len(GROUPS)), np.uint8), occupation=i32,
              y=np.zeros((0, len(OCCUPATIONS)), np.uint8),
              w=np.zeros((0, len(PROXIES)), np.uint8), object_label=i32,
              image=np.zeros((0, s, s, 3), np.uint8),
              captions=np.empty((0, k), dtype=object))


def iter_examples(cfg: ml_collections.ConfigDict,
                  split: str) -> Iterator[dict[str, np.ndarray]]:
  """Yields the examples of a split one by one (generated a chunk at a time)."""
  size = split_size(cfg, split)
  for lo in range(0, size, CHUNK_SIZE):
    arrays = generate_split(cfg, split, lo, min(size, lo + CHUNK_SIZE))
    for i in range(arrays["id"].size):
      yield {key: v[i] for key, v in arrays.items()}
