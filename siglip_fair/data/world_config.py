"""The synthetic world's knobs (SPEC §7): defaults, validation and what they imply.

world.py re-exports every public name here; see its docstring for the world itself.
"""
import ml_collections
import numpy as np

from siglip_fair.data import scenes
from siglip_fair.data.vocab import OBJECT_CLASSES
from siglip_fair.data.vocab import OCCUPATIONS
from siglip_fair.data.vocab import SPLITS

OBJECT_SCENES = ("legacy", "composed")
CAPTION_STYLES = ("legacy", "descriptive")
OBJECT_BACKGROUNDS = ("grey", "tint", "varied")
OWNER_CAPTIONS = ("possessive", "with", "owner")

# The knobs of issue 17 (object scenes, captions, owner skew) with the defaults that keep the
# world they were added to bit for bit; configs written before them (a run's config.json) read
# these, so they build the same world.
_SCENE_KNOBS = dict(
    object_scenes="legacy", object_class_mode="shape_colour", object_shapes=8,
    object_colours=6, object_patterns=3, objects_per_scene_max=1, object_scale=1.0,
    captions="legacy",
    caption_attribute_rate=0.8, owner_attribute_skew=0.0, owner_captions="possessive")


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
  # owner_woman_prevalence (per class, see owner_attribute_skew) and is named in captions like a
  # person's.
  cfg.object_owner_rate = 0.3
  # P(woman | owner): the owners' group prevalence, apart from the people's. Where it differs
  # from woman_prevalence, group words co-occur with object scenes at different rates
  # (P(object | "man") != P(object | "woman")), which is what a contrastive model could absorb
  # as representation bias on object images; where they are equal, a group word says nothing
  # about whether an image shows objects. Configs written before this knob read
  # woman_prevalence here (_complete).
  cfg.owner_woman_prevalence = 0.3
  # How captions name an owner: 'possessive' ("a man's red circle", "a red circle owned by a
  # man"), 'with' ("a photo of a man with a red circle": the owner is the caption's subject, as
  # in a person's caption) or 'owner' (three templates of four name only the owner, "a photo
  # of a man"; captions.py).
  cfg.owner_captions = _SCENE_KNOBS["owner_captions"]
  cfg.tool_rate = 0.5  # P(a person's occupation tool is drawn)
  # Both occupations of a pair wear one uniform colour, so without the tool only
  # the gender tint and the proxies tell them apart (the association to learn).
  cfg.uniform_per_pair = True
  cfg.tint_std = 0.1  # spread of the gender tint around TINT_MEANS
  # Object scenes' background: 'grey' (off the tint axis: their only link to a group is what
  # captions say about owners, so a model's RB measures co-occurrence it absorbed) or 'tint'
  # (a uniformly random gender tint: RB then also reflects where the model puts the boundary)
  # or 'varied' (scenes.BACKGROUND_NAMES: plain colours and gradients, all with R == B, so as
  # far off the tint axis as the grey, and varied within every class).
  cfg.object_background = "grey"
  cfg.noise = 0.05  # pixel noise std, [0, 1] units
  cfg.jitter = 0.04  # position jitter, fraction of the image side
  # Object scenes: 'legacy' (OBJECT_CLASSES, one shape in one colour per class, centred) or
  # 'composed' (scenes.py): objects of object_shapes shapes x object_colours colours x
  # object_patterns patterns (solid, striped, dotted), small or large, in a 3 x 3 grid of
  # positions, 1..objects_per_scene_max alike copies per scene. object_class_mode says which
  # attributes make the class ('shape' | 'shape_colour' | 'shape_colour_pattern'); the others
  # vary within it. Class names: object_class_names(cfg).
  cfg.object_scenes = _SCENE_KNOBS["object_scenes"]
  cfg.object_class_mode = _SCENE_KNOBS["object_class_mode"]
  cfg.object_shapes = _SCENE_KNOBS["object_shapes"]  # 1..len(scenes.SHAPES)
  cfg.object_colours = _SCENE_KNOBS["object_colours"]  # 1..len(scenes.COLOUR_NAMES)
  cfg.object_patterns = _SCENE_KNOBS["object_patterns"]  # 1..len(scenes.PATTERNS)
  cfg.objects_per_scene_max = _SCENE_KNOBS["objects_per_scene_max"]  # 1..3 ('composed')
  # Multiplies the composed objects' radii (scenes.SIZE_RADII: 0.11 and 0.15 of the image side):
  # bigger shapes are easier to tell apart; above ~1.07 neighbouring copies may touch and
  # objects in the outer cells may be cut by the image border.
  cfg.object_scale = _SCENE_KNOBS["object_scale"]
  # Captions: 'legacy' (templates shared by many images) or 'descriptive' (captions.py: the
  # same planted decisions, plus what the image shows: count, size, pattern, colour, positions,
  # background; a person's uniform, tool and the proxies' positions).
  cfg.captions = _SCENE_KNOBS["captions"]
  # 'descriptive': P(a caption names each attribute outside the object class).
  cfg.caption_attribute_rate = _SCENE_KNOBS["caption_attribute_rate"]
  # Spread of P(woman | owned object of class k) around owner_woman_prevalence: class k gets
  # owner_woman_prevalence + skew * o_k, the offsets o_k evenly spaced over [-1, 1] (mean 0, so
  # the overall owner prevalence is kept) in a fixed shuffled class order
  # (owner_woman_probability). 0 = every class owned alike, as before.
  cfg.owner_attribute_skew = _SCENE_KNOBS["owner_attribute_skew"]
  return cfg


def _complete(cfg):
  """cfg with the knobs it predates at their world-preserving defaults (a copy if any)."""
  missing = {k: v for k, v in _SCENE_KNOBS.items() if k not in cfg}
  if "owner_woman_prevalence" not in cfg:  # owners followed the people's prevalence
    missing["owner_woman_prevalence"] = cfg.woman_prevalence
  if not missing:
    return cfg
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.update(missing)
  return out


def object_class_names(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Class names in `object_label` order: OBJECT_CLASSES, or the composed classes' names."""
  cfg = _complete(cfg)
  if cfg.object_scenes == "legacy":
    return OBJECT_CLASSES
  return scenes.class_names(cfg)


def owner_woman_probability(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """P(woman | owned object of class k), float64 [num classes] (the planted owner skew)."""
  cfg = _complete(cfg)
  k = len(object_class_names(cfg))
  # A fixed shuffle, so that how gendered a class is does not follow its shape or colour.
  offsets = np.linspace(-1.0, 1.0, k)[np.random.default_rng(k).permutation(k)]
  return cfg.owner_woman_prevalence + cfg.owner_attribute_skew * (offsets if k > 1 else 0.0)


def describe(cfg: ml_collections.ConfigDict) -> dict:
  """A summary of the world a config makes: scene and caption styles, classes, owner skew."""
  cfg = _complete(cfg)
  validate_config(cfg)
  names = object_class_names(cfg)
  return dict(object_scenes=cfg.object_scenes, captions=cfg.captions,
              object_background=cfg.object_background, num_object_classes=len(names),
              object_class_names=list(names), owner_captions=cfg.owner_captions,
              owner_woman_probability=dict(zip(names, owner_woman_probability(cfg).tolist())))


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
  cfg = _complete(cfg)
  for name in ("person_share", "woman_prevalence", "caption_gender_rate",
               "caption_gender_noise", "caption_occupation_rate",
               "caption_object_rate", "proxy_strength", "proxy_base_rate",
               "object_proxy_rate", "people_proxy_rate", "object_owner_rate",
               "owner_woman_prevalence", "tool_rate",
               "caption_attribute_rate"):
    if not 0.0 <= cfg[name] <= 1.0:
      raise ValueError(f"world.{name}={cfg[name]} must be in [0, 1].")
  if cfg.object_background not in OBJECT_BACKGROUNDS:
    raise ValueError(f"world.object_background={cfg.object_background!r}; use 'grey', 'tint' "
                     "or 'varied'.")
  _validate_scene_knobs(cfg)
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


def _validate_scene_knobs(cfg):
  for name, allowed in (("object_scenes", OBJECT_SCENES), ("captions", CAPTION_STYLES),
                        ("owner_captions", OWNER_CAPTIONS),
                        ("object_class_mode", tuple(scenes.CLASS_MODES))):
    if cfg[name] not in allowed:
      raise ValueError(f"world.{name}={cfg[name]!r}; use one of {allowed}, e.g. "
                       f"--config.world.{name}={allowed[-1]}.")
  limits = dict(scenes.LIMITS, scene=scenes.MAX_OBJECTS)
  for attr, name in (*scenes.COUNT_KNOBS.items(), ("scene", "objects_per_scene_max")):
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
        1 <= value <= limits[attr]):
      raise ValueError(f"world.{name}={value!r} must be an int in [1, {limits[attr]}], e.g. "
                       f"--config.world.{name}={_SCENE_KNOBS[name]}.")
  if cfg.object_scenes == "legacy" and cfg.objects_per_scene_max != 1:
    raise ValueError(f"world.objects_per_scene_max={cfg.objects_per_scene_max} needs "
                     "world.object_scenes='composed' (legacy scenes hold one object); set "
                     "that, or world.objects_per_scene_max=1.")
  if cfg.object_scenes == "composed" and len(scenes.class_names(cfg)) < 2:
    raise ValueError(f"world.object_class_mode={cfg.object_class_mode!r} with "
                     f"world.object_shapes={cfg.object_shapes}, world.object_colours="
                     f"{cfg.object_colours} and world.object_patterns={cfg.object_patterns} "
                     "makes one object class; raise the counts of the class's attributes.")
  if not 0.5 <= cfg.object_scale <= 1.5:
    raise ValueError(f"world.object_scale={cfg.object_scale} must be in [0.5, 1.5] (smaller "
                     "shapes are a few pixels at 32 x 32, larger ones leave the grid cells), e.g. "
                     "--config.world.object_scale=1.0.")
  skew, prevalence = cfg.owner_attribute_skew, cfg.owner_woman_prevalence
  if not 0.0 <= skew <= min(prevalence, 1.0 - prevalence):
    raise ValueError(f"world.owner_attribute_skew={skew} must be in [0, min("
                     f"owner_woman_prevalence, 1 - owner_woman_prevalence)] = "
                     f"[0, {min(prevalence, 1 - prevalence):g}] so "
                     "that every class's P(woman | owner) stays in [0, 1]; lower it.")


def split_size(cfg: ml_collections.ConfigDict, split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  return int(cfg.sizes[split])
