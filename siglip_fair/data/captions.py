"""Caption assembly for the synthetic world (SPEC §7).

captions='legacy': templates that sometimes name the group, the occupation and the drawn
proxies, and an object scene's class (and, in half the templates, its colour). Many images
share each caption.

captions='descriptive': the same templates and the same planted decisions (which captions name
the group, which group they say, the occupation, which proxies), each caption then describing
more of what its image shows, so few images share a caption: an object scene's count, size,
pattern and colour ('two small striped red triangles'), positions ('on the left and in the top
right') and background ('on a green background'); a person's uniform colour, tool and the
proxies' positions. Each optional attribute is named with probability caption_attribute_rate
per caption; attributes that define the object class are always named. Nothing is named that
the image does not show (the background tint, the gender cue, is never described), and the
people split (the AB set) keeps its legacy captions, which name only the true group.

world.owner_captions says how an owned scene's caption names its owner: 'possessive' ("a man's
red circle", the default), 'with' ("a photo of a man with a red circle") or 'owner' (three
templates of four name only the owner, "a photo of a man", as a person's caption would).
"""
import numpy as np

from siglip_fair.data import render
from siglip_fair.data import scenes
from siglip_fair.data import vocab

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
# owner_captions='with': the owner is the subject, as in a person's caption ("a photo of a man
# with a red circle"), as web captions name people an image does not show.
_OWNER_WITH_TEMPLATES = ("a photo of {s} with {ao}", "{s} with {ao}",
                         "a picture of {s} with {ao}", "{s} and {ao}")
# owner_captions='owner': three templates of four name only the owner, as a person's caption
# would ("a photo of a man"), the fourth is possessive.
_OWNER_ONLY_TEMPLATES = ("a photo of {s}", "{s}", "a picture of {s}", "{s}'s {o}")
OWNER_TEMPLATES = {"possessive": _OWNER_TEMPLATES, "with": _OWNER_WITH_TEMPLATES,
                   "owner": _OWNER_ONLY_TEMPLATES}
TEMPLATES = (_PERSON_TEMPLATES + _OCCUPATION_TEMPLATES + _OBJECT_TEMPLATES
             + sum(OWNER_TEMPLATES.values(), ()))

# Columns of the per-caption draw `name_attribute` (scenes.draw): whether a caption names each.
NAMED_ATTRIBUTES = ("size", "pattern", "position", "background", "uniform", "tool",
                    "proxy_position", "colour")
# Body colour names, UNIFORM_COLOURS order (PAIR_UNIFORM_COLOURS repeats the even ones).
UNIFORM_COLOUR_NAMES = ("purple", "white", "teal", "blue", "pink", "olive", "yellow", "black",
                        "red", "brown")
# The tools' shapes (render.TOOL_SHAPES -> render.SHAPES), in words that name no object class,
# composed shape, proxy or group, so a tool never reads as one of those.
TOOL_NAMES = ("disc", "block", "gem", "wedge", "plus", "slab", "rod", "hoop", "mark", "tee")
_PROXY_SIDES = ("left", "left", "", "right", "right")  # by render.PROXY_SLOTS column


def _a(word):
  return ("an " if word[0] in "aeiou" else "a ") + word


def _and(phrases):
  return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _join(words):
  return _and([_a(x) for x in words])


def _proxy_position(j):
  row = "top" if render.PROXY_SLOTS[j, 1] < 0.5 else "bottom"
  side = _PROXY_SIDES[j % 5]
  return f"in the {row} {side}" if side else f"at the {row}"


def alphabet_words() -> list[str]:
  """Every word and literal the captions of any world can hold besides the templates."""
  proxy_positions = [_proxy_position(j) for j in range(len(vocab.PROXIES))]
  return [*sum(vocab.GROUP_NOUNS, ()), vocab.NEUTRAL_NOUN, *vocab.OCCUPATIONS, *vocab.PROXIES,
          *vocab.OBJECT_CLASSES, *render.OBJECT_COLOUR_NAMES, " next to ", " with ", ", ",
          " and ", "an ", "a ", *scenes.SHAPES, *scenes.SHAPE_PLURALS, *scenes.COLOUR_NAMES,
          *scenes.PATTERNS, *scenes.SIZES, *scenes.COUNT_WORDS,
          *sum(scenes.POSITION_PHRASES, ()), *scenes.BACKGROUND_NAMES, " on ", " background",
          *UNIFORM_COLOUR_NAMES, " uniform", " holding ", *TOOL_NAMES, *proxy_positions, " "]


def _legacy_object_text(cfg, i, t, subject, scene, ex, class_names):
  """A legacy caption's object part: the class, and in half the templates a colour."""
  label = int(ex["object_label"][i])
  obj = class_names[label]
  if (t // 4) % 2:
    if cfg.object_scenes == "legacy":
      obj = render.OBJECT_COLOUR_NAMES[label] + " " + obj
    elif "colour" not in scenes.CLASS_MODES[cfg.object_class_mode]:
      obj = scenes.COLOUR_NAMES[scene["colour"][i]] + " " + obj
  if ex["gender"][i] >= 0:  # an owned object
    return OWNER_TEMPLATES[cfg.owner_captions][t % 4].format(s=_a(subject), o=obj, ao=_a(obj))
  return _OBJECT_TEMPLATES[t % 4].format(o=_a(obj))


def _object_text(cfg, i, t, subject, scene, ex, said):
  """A descriptive caption's object part: noun phrase, positions, background."""
  label = int(ex["object_label"][i])
  count = 1
  if cfg.object_scenes == "composed":
    count = int(scene["count"][i])
    cls = scenes.CLASS_MODES[cfg.object_class_mode]
    words = [scenes.COUNT_WORDS[count - 1]] if count > 1 else []
    if said["size"]:
      words.append(scenes.SIZES[scene["size"][i]])
    if "pattern" in cls or said["pattern"]:
      words.append(scenes.PATTERNS[scene["pattern"][i]])
    if "colour" in cls or said["colour"]:
      words.append(scenes.COLOUR_NAMES[scene["colour"][i]])
    words.append((scenes.SHAPE_PLURALS if count > 1 else scenes.SHAPES)[scene["shape"][i]])
    phrase = " ".join(words)
  else:  # a legacy object: its class fixes shape and colour, and it sits in the centre
    phrase = render.OBJECT_COLOUR_NAMES[label] + " " + vocab.OBJECT_CLASSES[label]
  if ex["gender"][i] >= 0:  # an owned object
    template = OWNER_TEMPLATES[cfg.owner_captions][t % 4]
    text = template.format(s=_a(subject), o=phrase, ao=phrase if count > 1 else _a(phrase))
    if "{o}" not in template and "{ao}" not in template:
      return text  # names only the owner: nothing of the scene
  else:
    text = _OBJECT_TEMPLATES[t % 4].format(o=phrase if count > 1 else _a(phrase))
  if cfg.object_scenes == "composed" and said["position"]:
    # Left to right, as one reads the picture.
    cells = sorted(zip(scene["column"][i, :count], scene["row"][i, :count]))
    text += " " + _and([scenes.POSITION_PHRASES[row][col] for col, row in cells])
  background = cfg.object_background
  if background != "tint" and said["background"]:  # a tint would name the gender cue
    name = scenes.BACKGROUND_NAMES[scene["background"][i]] if background == "varied" else "grey"
    text += " on " + _a(name) + ("" if name.endswith("gradient") else " background")
  return text


def _person_text(cfg, split, i, r, ex, said):
  """What a descriptive caption adds about a person: uniform and tool (the visible cues)."""
  if split == "people":  # cues are not drawn there, and AB captions name only the group
    return ""
  occupation = int(ex["occupation"][i])
  colour = occupation - occupation % 2 if cfg.uniform_per_pair else occupation
  text = " in " + _a(UNIFORM_COLOUR_NAMES[colour]) + " uniform" if said["uniform"] else ""
  if r["tool"][i] < cfg.tool_rate and said["tool"]:
    text += " holding " + _a(TOOL_NAMES[render.TOOL_SHAPES[occupation]])
  return text


def captions(cfg, split, r, ex, scene):
  """object [n, K] array of bytes captions.

  Args:
    cfg: the world config (every knob present).
    split: the split's name.
    r: the chunk's random numbers for these rows (world._draw_chunk).
    ex: the rows' labels (world._labels).
    scene: the rows' object-scene attributes (scenes.attributes).
  """
  n, k = ex["id"].size, cfg.num_captions
  descriptive = cfg.captions == "descriptive"
  class_names = (scenes.class_names(cfg) if cfg.object_scenes == "composed"
                 else vocab.OBJECT_CLASSES)
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
    mentions[i][j].append(q)
  names_attribute = r["name_attribute"] < cfg.caption_attribute_rate
  out = np.empty((n, k), dtype=object)
  for i in range(n):
    for j in range(k):
      t = int(template[i, j])
      said = dict(zip(NAMED_ATTRIBUTES, names_attribute[i, j]))
      named = [vocab.PROXIES[q] for q in mentions[i][j]]
      if descriptive and said["proxy_position"]:
        named = [f"{vocab.PROXIES[q]} {_proxy_position(q)}" for q in mentions[i][j]]
      subject = vocab.NEUTRAL_NOUN  # of a person or an owner
      if names_group[i, j]:
        nouns = vocab.GROUP_NOUNS[said_group[i, j]]
        subject = nouns[noun[i, j] % len(nouns)]
      if ex["kind"][i] == 0:
        if descriptive:
          text = _object_text(cfg, i, t, subject, scene, ex, said)
        else:
          text = _legacy_object_text(cfg, i, t, subject, scene, ex, class_names)
        text += " next to " + _join(named) if named else ""
      else:
        if names_occupation[i, j]:
          text = _OCCUPATION_TEMPLATES[t % 4].format(
              s=_a(subject), o=_a(vocab.OCCUPATIONS[ex["occupation"][i]]))
        else:
          text = _PERSON_TEMPLATES[t % 4].format(s=_a(subject))
        if descriptive:
          text += _person_text(cfg, split, i, r, ex, said)
        text += " with " + _join(named) if named else ""
      out[i, j] = text.encode("utf-8")
  return out


def unique_caption_share(captions: np.ndarray) -> float:
  """Share of the captions [N, K] that no other image holds (repeats within an image count as
  one): a caption another image shares cannot single out its own, so this bounds retrieval."""
  owners = {}
  for i, row in enumerate(captions):
    for text in set(row.tolist()):
      owners[text] = owners.get(text, 0) + 1
  return float(np.mean([owners[text] == 1 for text in captions.reshape(-1).tolist()]))
