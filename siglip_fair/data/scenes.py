"""Composed object scenes of the synthetic world (SPEC §7, world knob object_scenes='composed').

An object is a shape in a colour with a pattern. Which of these attributes make up the class
is the knob object_class_mode (e.g. 'shape_colour': 8 shapes x 6 colours = 48 classes); the
attributes outside the class, the size, the grid positions, the number of copies
(1..objects_per_scene_max, all alike, so the class label stays unambiguous) and the background
vary within a class, so zero-shot classification has within-class variation to generalise
over and retrieval has something to tell images of one class apart by.

Backgrounds (world knob object_background='varied') all have R == B, as the legacy neutral
grey has: the gender tint moves colours along WARM - COOL (R up, B down), so every varied
background sits at the same point of that axis and carries no group cue.

The random numbers are drawn by `draw` from a generator of their own (world.py seeds it per
chunk), so the legacy stream, hence every legacy image and caption, is untouched; attribute
draws are integers reduced modulo the knobs' counts, so the stream does not depend on them.
"""
import itertools

import numpy as np

from siglip_fair.data import render

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "crescent",
          "bar", "arrow")
SHAPE_PLURALS = tuple(s + ("es" if s.endswith("ss") else "s") for s in SHAPES)
COLOUR_NAMES = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "cyan",
                "black")
COLOURS = np.array([
    [0.90, 0.10, 0.10], [0.10, 0.20, 0.85], [0.10, 0.60, 0.15], [0.98, 0.88, 0.05],
    [0.55, 0.15, 0.70], [0.98, 0.50, 0.00], [1.00, 0.55, 0.80], [0.55, 0.33, 0.12],
    [0.10, 0.75, 0.80], [0.05, 0.05, 0.05]], np.float32)
# Stripes and dots: a dark shade of the colour (a light one for black) keeps the colour the
# object's dominant one while the pattern stays visible through pixel noise.
PATTERN_COLOURS = np.where(COLOURS.max(1, keepdims=True) > 0.4, 0.3 * COLOURS, COLOURS + 0.55)
PATTERNS = ("solid", "striped", "dotted")
PATTERN_PERIOD = 0.125  # of the image side: 4 pixels at 32 x 32, 2 on and 2 off
SIZES = ("small", "large")
SIZE_RADII = np.array([0.11, 0.15], np.float32)
# Copies of an object take distinct columns, 0.32 apart: more than two large radii (at
# object_scale 1), so they never overlap (up to jitter); each takes any row.
MAX_OBJECTS = 3
COLUMNS = np.array([0.18, 0.5, 0.82], np.float32)
ROWS = np.array([0.27, 0.5, 0.73], np.float32)
POSITION_PHRASES = (("in the top left", "at the top", "in the top right"),
                    ("on the left", "in the centre", "on the right"),
                    ("in the bottom left", "at the bottom", "in the bottom right"))  # [row][col]
COUNT_WORDS = ("one", "two", "three")
BACKGROUND_NAMES = ("grey", "white", "dark grey", "green", "grey gradient", "green gradient")
# Top and bottom colour of each background (a vertical gradient between them); R == B in all.
BACKGROUND_COLOURS = np.array([
    [[0.78, 0.78, 0.78], [0.78, 0.78, 0.78]], [[0.95, 0.95, 0.95], [0.95, 0.95, 0.95]],
    [[0.42, 0.42, 0.42], [0.42, 0.42, 0.42]], [[0.72, 0.90, 0.72], [0.72, 0.90, 0.72]],
    [[0.95, 0.95, 0.95], [0.50, 0.50, 0.50]], [[0.95, 0.95, 0.95], [0.55, 0.82, 0.55]]],
    np.float32)
ATTRIBUTES = ("shape", "colour", "pattern")
# object_class_mode -> the attributes that define a class, most significant first.
CLASS_MODES = {"shape": ("shape",), "shape_colour": ("shape", "colour"),
               "shape_colour_pattern": ("shape", "colour", "pattern")}
# The knob that says how many values of each attribute a world uses (a prefix of the table).
COUNT_KNOBS = dict(shape="object_shapes", colour="object_colours", pattern="object_patterns")
LIMITS = dict(shape=len(SHAPES), colour=len(COLOUR_NAMES), pattern=len(PATTERNS))
_WORDS = dict(shape=SHAPES, colour=COLOUR_NAMES, pattern=PATTERNS)
_BIG = 1 << 30


def attribute_counts(cfg) -> dict[str, int]:
  """How many shapes, colours and patterns the world uses."""
  return {a: int(cfg[COUNT_KNOBS[a]]) for a in ATTRIBUTES}


def class_names(cfg) -> tuple[str, ...]:
  """Composed class names in label order, words in caption order ('striped red triangle')."""
  attrs = CLASS_MODES[cfg.object_class_mode]
  counts = attribute_counts(cfg)
  names = []
  for values in itertools.product(*(range(counts[a]) for a in attrs)):
    chosen = dict(zip(attrs, values))
    names.append(" ".join(_WORDS[a][chosen[a]] for a in ("pattern", "colour", "shape")
                          if a in chosen))
  return tuple(names)


def draw(rng, n, k):
  """The composed scenes' random numbers of one chunk of n rows with k captions each."""
  m = MAX_OBJECTS
  return dict(
      scene_shape=rng.integers(0, _BIG, n), scene_colour=rng.integers(0, _BIG, n),
      scene_pattern=rng.integers(0, _BIG, n), scene_size=rng.integers(0, _BIG, n),
      scene_count=rng.integers(0, _BIG, n), scene_background=rng.integers(0, _BIG, n),
      scene_column=rng.random((n, m)), scene_row=rng.integers(0, _BIG, (n, m)),
      scene_jitter=rng.uniform(-1.0, 1.0, (n, m, 2)),
      # Whether caption j names each optional attribute (captions.NAMED_ATTRIBUTES).
      name_attribute=rng.random((n, k, 8)))


def drawn_labels(cfg, r):
  """Class labels [n] from the attribute draws: uniform over the classes."""
  counts = attribute_counts(cfg)
  label = np.zeros(r["scene_shape"].shape, np.int64)
  for a in CLASS_MODES[cfg.object_class_mode]:
    label = label * counts[a] + r[f"scene_{a}"] % counts[a]
  return label


def attributes(cfg, label, r):
  """Everything visible about composed scenes of class `label` [n] (int arrays [n] unless said).

  Returns shape, colour, pattern, size, count, background, radius (float [n]: the size's
  SIZE_RADII times object_scale), column / row [n, MAX_OBJECTS] grid cells and cx / cy
  [n, MAX_OBJECTS] centres (slots >= count unused).
  """
  counts = attribute_counts(cfg)
  out = {a: (r[f"scene_{a}"] % counts[a]).astype(np.int64) for a in ATTRIBUTES}
  rest = np.asarray(label, np.int64)
  for a in reversed(CLASS_MODES[cfg.object_class_mode]):
    out[a], rest = rest % counts[a], rest // counts[a]
  out["size"] = r["scene_size"] % len(SIZES)
  out["radius"] = (cfg.object_scale * SIZE_RADII[out["size"]]).astype(np.float32)
  out["count"] = 1 + r["scene_count"] % int(cfg.objects_per_scene_max)
  out["background"] = r["scene_background"] % len(BACKGROUND_NAMES)
  out["column"] = np.argsort(r["scene_column"], axis=1)
  out["row"] = r["scene_row"] % len(ROWS)
  out["cx"] = COLUMNS[out["column"]] + cfg.jitter * r["scene_jitter"][..., 0]
  out["cy"] = ROWS[out["row"]] + cfg.jitter * r["scene_jitter"][..., 1]
  return out


def backgrounds(background, size):
  """float32 images [n,S,S,3] of BACKGROUND_COLOURS[background] (vertical gradients)."""
  y = ((np.arange(size, dtype=np.float32) + 0.5) / size)[None, :, None, None]
  top = BACKGROUND_COLOURS[background, 0][:, None, None, :]
  bottom = BACKGROUND_COLOURS[background, 1][:, None, None, :]
  return np.broadcast_to(top + y * (bottom - top), (len(background), size, size, 3)).copy()


def shape_mask(shape, dx, dy, r):
  """Mask of SHAPES[shape] of radius r ([n,1,1]) centred at the origin; dx, dy [n,S,S]."""
  ax, ay, d2 = np.abs(dx), np.abs(dy), dx**2 + dy**2
  name = SHAPES[shape]
  if name == "circle":
    return d2 <= r**2
  if name == "square":  # as wide as the circle, so that its corners tell them apart
    return (ax <= r) & (ay <= r)
  if name == "triangle":  # apex up
    return (dy <= 0.8 * r) & (ax <= 0.6 * (dy + r))
  if name == "diamond":
    return ax + ay <= 1.1 * r
  if name == "cross":
    return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))
  if name == "star":  # five points, one up
    return np.sqrt(d2) <= r * (0.6 + 0.4 * np.cos(5 * np.arctan2(dx, -dy)))
  if name == "ring":
    return (d2 <= r**2) & (d2 >= (0.5 * r)**2)
  if name == "crescent":
    return (d2 <= r**2) & ((dx - 0.45 * r)**2 + (dy + 0.2 * r)**2 > (0.8 * r)**2)
  if name == "bar":
    return (ax <= r) & (ay <= 0.4 * r)
  if name == "arrow":  # pointing right
    shaft = (dx >= -r) & (dx <= 0.1 * r) & (ay <= 0.3 * r)
    return shaft | ((dx >= 0) & (dx <= r) & (ay <= r - dx))
  raise ValueError(f"Unknown shape {shape}; expected 0..{len(SHAPES) - 1}.")


def pattern_mask(pattern, dx, dy):
  """Where the pattern's second colour goes: stripes, dots or nowhere (solid); pattern [n]."""
  fx = (dx / PATTERN_PERIOD) % 1.0 - 0.5
  fy = (dy / PATTERN_PERIOD) % 1.0 - 0.5
  p = np.asarray(pattern)[:, None, None]
  return ((p == 1) & (fy < 0)) | ((p == 2) & (fx**2 + fy**2 <= 0.32**2))


def draw_scenes(img, attrs):
  """Paints the objects of `attrs` (rows aligned with img [n,S,S,3], in place) and returns img."""
  size = img.shape[1]
  # One slot at a time: within a slot each image holds one object, so the fancy-indexed
  # write-back never drops a copy.
  for slot in range(MAX_OBJECTS):
    drawn = attrs["count"] > slot
    for k in np.unique(attrs["shape"][drawn]):
      idx = np.flatnonzero(drawn & (attrs["shape"] == k))
      dx, dy = render._offsets(size, attrs["cx"][idx, slot], attrs["cy"][idx, slot])  # pylint: disable=protected-access
      radius = attrs["radius"][idx][:, None, None]
      mask = shape_mask(int(k), dx, dy, radius)
      colour = attrs["colour"][idx]
      sub = render._paint(img[idx], mask, COLOURS[colour])  # pylint: disable=protected-access
      img[idx] = render._paint(sub, mask & pattern_mask(attrs["pattern"][idx], dx, dy),  # pylint: disable=protected-access
                               PATTERN_COLOURS[colour])
  return img
