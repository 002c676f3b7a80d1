"""The embedded synthetic biased world (SPEC §7).

People with a perceived-gender cue (the background tint) work in occupations
with visual cues (uniform colour, tool); proxy objects co-occur with
occupations; object-only scenes carry class labels. Some object scenes of the
train and retrieval splits have an owner: no person is shown, but the owner's
group is the scene's ground truth and the captions name it ("a woman's car"),
so object images, like web images, co-occur with group words at the planted
prevalence. Captions come from templates that sometimes name the group, the
occupation and the objects.

Every example is a pure function of (config, split, index): examples are drawn
in fixed chunks of CHUNK_SIZE rows, each from its own generator seeded with
(seed, split id, chunk index), and every random number of a chunk is drawn for
all its rows before any is used. So an example does not depend on the split
size or on which range of the split is generated.
"""
from collections.abc import Iterator

import ml_collections
import numpy as np

from siglip_fair.data import render

GROUPS = ("man", "woman")
# In pairs; the first of each pair is stereotypically female.
OCCUPATIONS = ("librarian", "scientist", "nurse", "doctor", "housekeeper",
               "homeowner", "receptionist", "executive", "secretary",
               "manager")
OCCUPATION_PAIRS = [(i, i + 1) for i in range(0, len(OCCUPATIONS), 2)]
# PROXIES[j] is the object that co-occurs with OCCUPATIONS[j].
PROXIES = ("book", "microscope", "thermometer", "stethoscope", "broom", "sofa",
           "telephone", "briefcase", "typewriter", "laptop")
OBJECT_CLASSES = ("ball", "box", "tree", "car", "cup", "star", "house", "fish",
                  "key", "moon")
SPLITS = ("train", "objects", "people", "retrieval")
# Caption nouns per group (GROUPS order); "person" when the group is unnamed.
GROUP_NOUNS = (("man", "gentleman", "guy", "male person"),
               ("woman", "lady", "girl", "female person"))
NEUTRAL_NOUN = "person"
CHUNK_SIZE = 1000
TINT_MEANS = (0.25, 0.75)  # per group, GROUPS order

_PERSON_TEMPLATES = ("a photo of {s}", "{s}", "a picture of {s}",
                     "{s} at work")
_OCCUPATION_TEMPLATES = ("a photo of {s} who works as {o}",
                         "{s} working as {o}", "a picture of {s}, {o}",
                         "{s} at work as {o}")
_OBJECT_TEMPLATES = ("a photo of {o}", "{o}", "a picture of {o}",
                     "a close-up of {o}")
# {s}: owner with article, {o}: bare object, {ao}: object with article.
_OWNER_TEMPLATES = ("a photo of {s}'s {o}", "{ao} owned by {s}",
                    "{ao} that belongs to {s}", "{s}'s {o}")
OWNER_SPLITS = ("train", "retrieval")  # never `objects`: it measures RB


def default_config() -> ml_collections.ConfigDict:
  """Every knob of the world; probabilities are in [0, 1]."""
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.image_size = 32
  cfg.num_captions = 3
  cfg.sizes = ml_collections.ConfigDict(
      dict(train=20000, objects=1000, people=1000, retrieval=1000))
  cfg.person_share = 0.5  # P(person) in train / retrieval
  cfg.woman_prevalence = 0.3  # P(woman | person): representation skew
  # P(woman | occupation) = prevalence +- association / 2 for the female- /
  # male-stereotyped occupation of each pair: association skew.
  cfg.association = 0.4
  cfg.caption_gender_rate = 0.8  # P(a person caption names a group)
  cfg.caption_gender_noise = 0.03  # P(the named group is wrong | named)
  cfg.caption_occupation_rate = 0.8
  cfg.caption_object_rate = 0.5  # P(a caption names a drawn proxy), per proxy
  cfg.proxy_strength = 0.8  # P(occupation's own proxy drawn | occupation)
  cfg.proxy_base_rate = 0.05  # P(any other proxy drawn | person)
  cfg.object_proxy_rate = 0.05  # P(a proxy drawn | object scene), per proxy
  cfg.people_proxy_rate = 0.3  # P(a proxy drawn), per proxy, in the people (AB) split
  # P(an object scene has an owner) in OWNER_SPLITS; the owner's group follows
  # woman_prevalence and is named in captions like a person's.
  cfg.object_owner_rate = 0.3
  cfg.tool_rate = 0.5  # P(a person's occupation tool is drawn)
  # Both occupations of a pair wear one uniform colour, so without the tool only
  # the gender tint and the proxies tell them apart (the association to learn).
  cfg.uniform_per_pair = True
  cfg.tint_std = 0.1  # spread of the gender tint around TINT_MEANS
  # Object scenes' background: 'grey' (off the tint axis: their only link to a group is what
  # captions say about owners, so a model's RB measures co-occurrence it absorbed) or 'tint'
  # (a uniformly random gender tint: RB then also reflects where the model puts the boundary).
  cfg.object_background = "grey"
  cfg.noise = 0.05  # pixel noise std, [0, 1] units
  cfg.jitter = 0.04  # position jitter, fraction of the image side
  return cfg


def woman_probability(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """P(woman | occupation), float64 [c]; ValueError if outside [0, 1]."""
  sign = np.where(np.arange(len(OCCUPATIONS)) % 2 == 0, 1.0, -1.0)
  p = cfg.woman_prevalence + sign * cfg.association / 2
  if np.any(p < 0) or np.any(p > 1):
    raise ValueError(
        f"world.woman_prevalence={cfg.woman_prevalence} +- "
        f"world.association/2={cfg.association / 2} leaves [0, 1]; lower "
        "the association or move the prevalence towards 0.5.")
  return p


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad knob."""
  for name in ("person_share", "woman_prevalence", "caption_gender_rate",
               "caption_gender_noise", "caption_occupation_rate",
               "caption_object_rate", "proxy_strength", "proxy_base_rate",
               "object_proxy_rate", "people_proxy_rate", "object_owner_rate", "tool_rate"):
    if not 0.0 <= cfg[name] <= 1.0:
      raise ValueError(f"world.{name}={cfg[name]} must be in [0, 1].")
  if cfg.object_background not in ("grey", "tint"):
    raise ValueError(f"world.object_background={cfg.object_background!r}; use 'grey' or 'tint'.")
  for name in ("tint_std", "noise", "jitter"):
    if cfg[name] < 0:
      raise ValueError(f"world.{name}={cfg[name]} must be >= 0.")
  if not isinstance(cfg.uniform_per_pair, (bool, np.bool_)):
    raise ValueError(f"world.uniform_per_pair={cfg.uniform_per_pair!r} must "
                     "be True or False.")
  if not isinstance(cfg.seed, (int, np.integer)) or cfg.seed < 0:
    raise ValueError(f"world.seed={cfg.seed!r} must be an int >= 0.")
  if cfg.image_size < 16:
    raise ValueError(f"world.image_size={cfg.image_size} must be >= 16 for "
                     "the figures and icons to be drawable.")
  if cfg.num_captions < 1:
    raise ValueError(f"world.num_captions={cfg.num_captions} must be >= 1.")
  for split in SPLITS:
    if split not in cfg.sizes or cfg.sizes[split] < 0:
      raise ValueError(f"world.sizes.{split}={cfg.sizes.get(split)!r} must be a number of "
                       f"examples >= 0 (>= 1 to build it), e.g. --config.world.sizes.{split}="
                       f"{default_config().sizes[split]}.")
  woman_probability(cfg)


def split_size(cfg: ml_collections.ConfigDict, split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  return int(cfg.sizes[split])


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
  # the owner's group (< object_owner_rate * woman_prevalence): given an owner it is uniform on
  # [0, object_owner_rate), so both shares are stratified, and the random stream (hence every
  # image) does not depend on either knob.
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
  if split == "people":  # exactly balanced groups
    gender = (ids % 2).astype(np.int32)
  else:
    is_woman = np.where(
        person, r["woman"] < woman_probability(cfg)[r["occupation"]],
        r["owner"] < cfg.object_owner_rate * cfg.woman_prevalence)
    gender = np.where(person | owned, is_woman, -1).astype(np.int32)
  if split == "objects":  # exactly balanced classes
    object_label = (ids % len(OBJECT_CLASSES)).astype(np.int32)
  else:
    object_label = np.where(person, -1, r["object_label"]).astype(np.int32)
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


def _render(cfg, split, r, ex):
  """uint8 [n,S,S,3] images of the examples ex."""
  person = ex["kind"] == 1
  means = np.asarray(TINT_MEANS)[np.maximum(ex["gender"], 0)]
  tint = np.where(person, np.clip(means + cfg.tint_std * r["tint"], 0, 1),
                  r["tint_uniform"])
  img = render.background(tint, cfg.image_size)
  if cfg.object_background == "grey":
    img[~person] = render.NEUTRAL_BACKGROUND
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
  img[idx] = render.draw_objects(img[idx], cx[idx], cy[idx],
                                 ex["object_label"][idx])
  img = render.draw_proxies(img, ex["w"], 0.5 * cfg.jitter * r["proxy_jitter"])
  return render.to_uint8(img, r["pixels"], cfg.noise)


def caption_alphabet() -> frozenset[str]:
  """Every character a caption of any world can hold: the templates' literal text and every
  word they are filled with. A tokenizer needs a piece for each (plus pad, eos and unk), so
  this bounds the smallest vocabulary before any data are built."""
  import string  # pylint: disable=g-import-not-at-top
  templates = (_PERSON_TEMPLATES + _OCCUPATION_TEMPLATES + _OBJECT_TEMPLATES + _OWNER_TEMPLATES)
  literal = [text for t in templates for text, *_ in string.Formatter().parse(t)]
  words = [*sum(GROUP_NOUNS, ()), NEUTRAL_NOUN, *OCCUPATIONS, *PROXIES, *OBJECT_CLASSES,
           *render.OBJECT_COLOUR_NAMES, " next to ", " with ", ", ", " and ", "an ", "a "]
  return frozenset("".join(literal + words))


def _a(word):
  return ("an " if word[0] in "aeiou" else "a ") + word


def _join(words):
  words = [_a(x) for x in words]
  return words[0] if len(words) == 1 else ", ".join(words[:-1]) + (
      " and " + words[-1])


def _captions(cfg, split, r, ex):
  """object [n, K] array of bytes captions."""
  n, k = ex["id"].size, cfg.num_captions
  # Per-caption decisions are vectorised; only string assembly loops.
  named_proxies = ex["w"][:, None, :].astype(bool) & (
      r["mention"] < cfg.caption_object_rate)
  # Only people and owned objects have a group to name.
  names_group = (r["name_group"] < cfg.caption_gender_rate) & (
      ex["gender"][:, None] >= 0)
  said_group = ex["gender"][:, None] ^ (
      r["wrong_group"] < cfg.caption_gender_noise)
  names_occupation = r["name_occupation"] < cfg.caption_occupation_rate
  if split == "people":  # names only the (true) group
    names_group[:] = True
    said_group = np.broadcast_to(ex["gender"][:, None], (n, k))
    names_occupation[:] = False
    named_proxies[:] = False
  template, noun = r["template"], r["noun"]
  mentions = [[[] for _ in range(k)] for _ in range(n)]
  for i, j, q in zip(*np.nonzero(named_proxies)):
    mentions[i][j].append(PROXIES[q])
  out = np.empty((n, k), dtype=object)
  for i in range(n):
    for j in range(k):
      t = int(template[i, j])
      named = mentions[i][j]
      subject = NEUTRAL_NOUN  # of a person or an owner
      if names_group[i, j]:
        nouns = GROUP_NOUNS[said_group[i, j]]
        subject = nouns[noun[i, j] % len(nouns)]
      if ex["kind"][i] == 0:
        label = int(ex["object_label"][i])
        obj = OBJECT_CLASSES[label]
        if (t // 4) % 2:
          obj = render.OBJECT_COLOUR_NAMES[label] + " " + obj
        if ex["gender"][i] >= 0:  # an owned object
          text = _OWNER_TEMPLATES[t % 4].format(s=_a(subject), o=obj,
                                                ao=_a(obj))
        else:
          text = _OBJECT_TEMPLATES[t % 4].format(o=_a(obj))
        text += " next to " + _join(named) if named else ""
      else:
        if names_occupation[i, j]:
          text = _OCCUPATION_TEMPLATES[t % 4].format(
              s=_a(subject), o=_a(OCCUPATIONS[ex["occupation"][i]]))
        else:
          text = _PERSON_TEMPLATES[t % 4].format(s=_a(subject))
        text += " with " + _join(named) if named else ""
      out[i, j] = text.encode("utf-8")
  return out


def generate_split(cfg: ml_collections.ConfigDict, split: str, start: int = 0,
                   stop: int | None = None) -> dict[str, np.ndarray]:
  """Examples [start, stop) of a split as stacked arrays.

  Returns the keys of one example (docs/ARCHITECTURE.md) with a leading
  dimension N = stop - start: id int64 [N], image uint8 [N,S,S,3], captions
  object(bytes) [N,K], kind/gender/occupation/object_label int32 [N],
  s uint8 [N,m], y uint8 [N,c], w uint8 [N,p].
  """
  validate_config(cfg)
  size = split_size(cfg, split)
  stop = size if stop is None else stop
  if not 0 <= start <= stop <= size:
    raise ValueError(f"Need 0 <= start={start} <= stop={stop} <= "
                     f"world.sizes.{split}={size}.")
  parts = []
  for chunk in range(start // CHUNK_SIZE, -(-stop // CHUNK_SIZE)):
    lo = max(start, chunk * CHUNK_SIZE)
    hi = min(stop, (chunk + 1) * CHUNK_SIZE)
    rows = slice(lo - chunk * CHUNK_SIZE, hi - chunk * CHUNK_SIZE)
    r = {key: v[rows] for key, v in _draw_chunk(cfg, split, chunk).items()}
    ex = _labels(cfg, split, r, np.arange(lo, hi))
    ex["image"] = _render(cfg, split, r, ex)
    ex["captions"] = _captions(cfg, split, r, ex)
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
