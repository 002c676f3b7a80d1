"""Vectorised numpy drawing for the synthetic world (SPEC §7).

Everything is drawn in normalised image coordinates (x right, y down, both in
[0, 1]) so the same scene works at any resolution. All functions act on a batch
of n images at once; per-example quantities are arrays with leading dim n.
"""
import numpy as np

# Background tint: the perceived-gender cue. g=0 is cool, g=1 is warm; light and
# desaturated so the figures and objects drawn on top stay visible.
COOL = np.array([0.55, 0.70, 0.92], np.float32)
WARM = np.array([0.95, 0.70, 0.52], np.float32)
SKIN = np.array([0.60, 0.42, 0.30], np.float32)
NEUTRAL_BODY = np.array([0.50, 0.50, 0.50], np.float32)
NEUTRAL_BACKGROUND = np.array([0.78, 0.78, 0.78], np.float32)

SHAPES = ("circle", "square", "diamond", "triangle", "cross", "hbar", "vbar",
          "ring", "xshape", "tee")

# Per occupation (OCCUPATIONS order): uniform colour, tool shape, tool colour.
UNIFORM_COLOURS = np.array([
    [0.50, 0.20, 0.55], [0.97, 0.97, 0.97], [0.20, 0.70, 0.65],
    [0.15, 0.35, 0.75], [0.85, 0.45, 0.65], [0.40, 0.55, 0.20],
    [0.95, 0.80, 0.15], [0.10, 0.10, 0.12], [0.75, 0.20, 0.20],
    [0.45, 0.30, 0.15]], np.float32)
# The same table with both occupations of each pair (consecutive, see
# world.OCCUPATION_PAIRS) in the first one's colour: without the tool, only the
# gender tint and the proxies then tell the two apart.
PAIR_UNIFORM_COLOURS = np.repeat(UNIFORM_COLOURS[0::2], 2, axis=0)
TOOL_SHAPES = np.arange(10)
TOOL_COLOURS = UNIFORM_COLOURS[[7, 8, 9, 6, 2, 4, 3, 1, 5, 0]] * 0.8

# Per proxy (PROXIES order): icon shape, colour and a fixed slot on the top or
# bottom border (five slots each), so icons never cover the figure.
PROXY_SHAPES = np.array([1, 7, 6, 0, 3, 5, 2, 9, 8, 4])
PROXY_COLOURS = np.array([
    [0.60, 0.10, 0.10], [0.10, 0.45, 0.15], [0.90, 0.10, 0.10],
    [0.05, 0.05, 0.05], [0.70, 0.55, 0.10], [0.35, 0.15, 0.60],
    [0.10, 0.10, 0.60], [0.40, 0.25, 0.05], [0.25, 0.25, 0.25],
    [0.05, 0.55, 0.55]], np.float32)
PROXY_SLOTS = np.array([(0.1 + 0.2 * (j % 5), 0.09 if j < 5 else 0.91)
                        for j in range(10)], np.float32)
PROXY_RADIUS = 0.07

# Per object class (OBJECT_CLASSES order): colour and its caption word.
OBJECT_COLOURS = np.array([
    [0.90, 0.10, 0.10], [0.55, 0.33, 0.12], [0.10, 0.60, 0.15],
    [0.10, 0.20, 0.85], [0.98, 0.98, 0.98], [0.98, 0.88, 0.05],
    [0.55, 0.15, 0.70], [0.98, 0.50, 0.00], [0.05, 0.05, 0.05],
    [1.00, 0.55, 0.80]], np.float32)
OBJECT_COLOUR_NAMES = ("red", "brown", "green", "blue", "white", "yellow",
                       "purple", "orange", "black", "pink")


def _grid(size):
  c = (np.arange(size, dtype=np.float32) + 0.5) / size
  return c[None, None, :], c[None, :, None]  # x [1,1,S], y [1,S,1]


def shape_mask(shape, dx, dy, r):
  """Boolean mask of a primitive centred at the origin; dx, dy [n,S,S]."""
  ax, ay = np.abs(dx), np.abs(dy)
  if shape == "circle":
    return dx**2 + dy**2 <= r**2
  if shape == "square":
    return (ax <= r) & (ay <= r)
  if shape == "diamond":
    return ax + ay <= r
  if shape == "triangle":
    return (ay <= r) & (ax <= (dy + r) / 2)
  if shape == "cross":
    return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))
  if shape == "hbar":
    return (ax <= r) & (ay <= r / 2.5)
  if shape == "vbar":
    return (ax <= r / 2.5) & (ay <= r)
  if shape == "ring":
    d2 = dx**2 + dy**2
    return (d2 <= r**2) & (d2 >= (r / 2)**2)
  if shape == "xshape":
    return (np.abs(ax - ay) <= r / 3) & (ax <= r) & (ay <= r)
  if shape == "tee":
    return ((np.abs(dy + 0.6 * r) <= r / 3) & (ax <= r)) | (
        (ax <= r / 3) & (ay <= r))
  raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def _paint(img, mask, colour):
  """In place: img [n,S,S,3] <- colour ([3] or [n,3]) where mask [n,S,S]."""
  colour = np.broadcast_to(colour, (img.shape[0], 3))[:, None, None, :]
  np.copyto(img, colour, where=mask[..., None])
  return img


def _offsets(size, cx, cy):
  x, y = _grid(size)
  return x - cx[:, None, None], y - cy[:, None, None]


def _stamp(img, shape_ids, cx, cy, r, colours):
  """Paints SHAPES[shape_ids[i]] at (cx[i], cy[i]) on image i."""
  for k in np.unique(shape_ids):
    idx = np.flatnonzero(shape_ids == k)
    dx, dy = _offsets(img.shape[1], cx[idx], cy[idx])
    img[idx] = _paint(img[idx], shape_mask(SHAPES[k], dx, dy, r), colours[idx])
  return img


def background(tint, size):
  """tint [n] in [0,1] -> float32 images [n,S,S,3] of the tint colour."""
  colour = COOL + tint[:, None].astype(np.float32) * (WARM - COOL)
  return np.broadcast_to(colour[:, None, None, :],
                         (tint.shape[0], size, size, 3)).copy()


def draw_people(img, cx, cy, occupation, cues, tool,
                uniform_colours=UNIFORM_COLOURS):
  """Draws a figure per image: head, body in the uniform colour, tool.

  Args:
    img: float32 [n,S,S,3], modified in place and returned.
    cx, cy: [n] figure centre (body top is near cy).
    occupation: int [n] index into OCCUPATIONS.
    cues: bool [n]; False draws a neutral grey body and no tool.
    tool: bool [n]; whether the occupation's tool is drawn (only where cues).
    uniform_colours: float [c,3] body colour per occupation.
  """
  dx, dy = _offsets(img.shape[1], cx, cy)
  _paint(img, shape_mask("circle", dx, dy + 0.17, 0.09), SKIN)
  body = np.where(cues[:, None], uniform_colours[occupation], NEUTRAL_BODY)
  _paint(img, (np.abs(dx) <= 0.12) & (dy >= -0.07) & (dy <= 0.22), body)
  idx = np.flatnonzero(cues & tool)
  img[idx] = _stamp(img[idx], TOOL_SHAPES[occupation[idx]], cx[idx] + 0.2,
                    cy[idx] + 0.05, 0.07, TOOL_COLOURS[occupation[idx]])
  return img


def draw_proxies(img, w, jitter):
  """Draws proxy icon j on image i where w[i, j]; jitter [n,p,2] offsets."""
  for j in range(w.shape[1]):
    idx = np.flatnonzero(w[:, j])
    cx = PROXY_SLOTS[j, 0] + jitter[idx, j, 0]
    cy = PROXY_SLOTS[j, 1] + jitter[idx, j, 1]
    img[idx] = _stamp(img[idx], np.full(idx.size, PROXY_SHAPES[j]), cx, cy,
                      PROXY_RADIUS, np.broadcast_to(PROXY_COLOURS[j],
                                                    (idx.size, 3)))
  return img


def _object_mask(label, dx, dy):
  """Mask of object class `label` (OBJECT_CLASSES order) centred at 0."""
  ax, ay = np.abs(dx), np.abs(dy)
  d2 = dx**2 + dy**2
  if label == 0:  # ball
    return d2 <= 0.22**2
  if label == 1:  # box
    return (ax <= 0.2) & (ay <= 0.2)
  if label == 2:  # tree: canopy and trunk
    return shape_mask("triangle", dx, dy + 0.06, 0.2) | (
        (ax <= 0.04) & (dy > 0.14) & (dy <= 0.26))
  if label == 3:  # car: body and wheels
    wheels = ((ax - 0.14)**2 + (dy - 0.09)**2) <= 0.06**2
    return ((ax <= 0.27) & (ay <= 0.08)) | ((ax <= 0.14) & (dy >= -0.17) &
                                           (dy <= 0)) | wheels
  if label == 4:  # cup: tapered body and handle
    handle = shape_mask("ring", dx - 0.17, dy, 0.09)
    return ((ay <= 0.18) & (ax <= 0.12 + 0.04 * (0.18 - dy) / 0.36)) | handle
  if label == 5:  # star
    theta = np.arctan2(dy, dx)
    return np.sqrt(d2) <= 0.25 * (0.6 + 0.4 * np.cos(5 * theta))
  if label == 6:  # house: walls and roof
    return ((ax <= 0.16) & (dy >= -0.02) & (dy <= 0.22)) | (
        shape_mask("triangle", dx / 1.3, dy + 0.14, 0.12))
  if label == 7:  # fish: body and tail
    tail = (dx >= 0.14) & (dx <= 0.27) & (ay <= (dx - 0.14))
    return ((dx / 0.18)**2 + (dy / 0.11)**2 <= 1) | tail
  if label == 8:  # key: bow, shaft, teeth
    bow = shape_mask("ring", dx + 0.15, dy, 0.09)
    shaft = (dx >= -0.07) & (dx <= 0.24) & (ay <= 0.025)
    teeth = (dy >= 0) & (dy <= 0.08) & ((np.abs(dx - 0.2) <= 0.02) |
                                        (np.abs(dx - 0.12) <= 0.02))
    return bow | shaft | teeth
  if label == 9:  # moon: crescent
    return (d2 <= 0.22**2) & (((dx - 0.1)**2 + (dy + 0.06)**2) > 0.19**2)
  raise ValueError(f"Unknown object label {label}; expected 0..9.")


def draw_objects(img, cx, cy, labels):
  """Draws object class labels[i] centred at (cx[i], cy[i]) on image i."""
  for k in np.unique(labels):
    idx = np.flatnonzero(labels == k)
    dx, dy = _offsets(img.shape[1], cx[idx], cy[idx])
    img[idx] = _paint(img[idx], _object_mask(int(k), dx, dy),
                      OBJECT_COLOURS[k])
  return img


def to_uint8(img, pixel_noise, noise_std):
  """Adds Gaussian pixel noise and quantises float [0,1] images to uint8."""
  img = img + noise_std * pixel_noise
  return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
