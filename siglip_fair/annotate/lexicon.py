"""Keyword lexicons: groups, labels and proxies read off captions (SPEC §1).

A lexicon has one entry per annotation field (`s` groups, `y` labels, `w`
proxies), each with ordered column `names` and, per name, the words that
signal it. Captions are lower-cased and split on word boundaries, so "female"
does not match "male" and "housekeeper" does not match "house"; a possessive
"'s" is dropped, so "a man's car" matches "man". A lexicon entry of several
words matches that exact sequence of tokens.
"""
from collections.abc import Sequence
import re

import ml_collections
import numpy as np

from siglip_fair.data import world

_TOKEN = re.compile(r"[a-z0-9]+")
# Straight or typographic apostrophe; "ladies'" needs no rule (the apostrophe
# is not a word character).
_POSSESSIVE = re.compile(r"['\u2019]s\b")

_GROUP_WORDS = {
    "man": ("man", "men", "male", "males", "gentleman", "gentlemen", "guy",
            "guys", "boy", "boys", "he", "his", "him"),
    "woman": ("woman", "women", "female", "females", "lady", "ladies", "girl",
              "girls", "she", "her", "hers"),
}


def _plurals(word):
  return (word, word + ("es" if word.endswith(("s", "sh", "ch")) else "s"))


def default_lexicon_config() -> ml_collections.ConfigDict:
  """Word lists for the world's groups, occupations and proxies.

  Layout: `lex[field].names` is the tuple of column names (the column order of
  the annotations) and `lex[field].words[name]` the tuple of words for it, for
  field in ('s', 'y', 'w').
  """
  lex = ml_collections.ConfigDict()
  lex.s = ml_collections.ConfigDict(dict(
      names=world.GROUPS, words={g: _GROUP_WORDS[g] for g in world.GROUPS}))
  lex.y = ml_collections.ConfigDict(dict(
      names=world.OCCUPATIONS,
      words={o: _plurals(o) for o in world.OCCUPATIONS}))
  lex.w = ml_collections.ConfigDict(dict(
      names=world.PROXIES, words={p: _plurals(p) for p in world.PROXIES}))
  return lex


def tokenize(text: str | bytes) -> tuple[str, ...]:
  """Lower-cased alphanumeric word tokens of a caption, possessive 's dropped."""
  if isinstance(text, bytes):
    text = text.decode("utf-8")
  return tuple(_TOKEN.findall(_POSSESSIVE.sub("", text.lower())))


def _field_matcher(field_cfg, field):
  """(single-word -> column indices, multi-word token tuples -> columns)."""
  names = tuple(field_cfg.names)
  words, phrases = {}, {}
  for col, name in enumerate(names):
    if name not in field_cfg.words or not field_cfg.words[name]:
      raise ValueError(f"lexicon.{field}.words has no words for {name!r}; "
                       f"give every name in lexicon.{field}.names a word list.")
    for entry in field_cfg.words[name]:
      tokens = tokenize(entry)
      if not tokens:
        raise ValueError(f"lexicon.{field}.words[{name!r}] has an entry "
                         f"{entry!r} without any word characters.")
      table = words if len(tokens) == 1 else phrases
      table.setdefault(tokens if len(tokens) > 1 else tokens[0],
                       set()).add(col)
  return len(names), words, phrases


def _matches(tokens, words, phrases):
  cols = set()
  for t in tokens:
    cols |= words.get(t, set())
  for phrase, phrase_cols in phrases.items():
    n = len(phrase)
    if any(tokens[i:i + n] == phrase for i in range(len(tokens) - n + 1)):
      cols |= phrase_cols
  return cols


def annotate_captions(captions: Sequence[str | bytes],
                      lexicon_cfg: ml_collections.ConfigDict
                      ) -> dict[str, np.ndarray]:
  """Multi-hot annotations of N captions from keyword matches.

  Returns:
    s float32 [N, m] (every group whose words occur), known float32 [N] (1 if
    any group word occurs), y float32 [N, c], w float32 [N, p].
  """
  n = len(captions)
  out = {}
  matchers = {f: _field_matcher(lexicon_cfg[f], f) for f in ("s", "y", "w")}
  for field, (width, _, _) in matchers.items():
    out[field] = np.zeros((n, width), np.float32)
  for i, caption in enumerate(captions):
    tokens = tokenize(caption)
    for field, (_, words, phrases) in matchers.items():
      cols = _matches(tokens, words, phrases)
      if cols:
        out[field][i, sorted(cols)] = 1.0
  out["known"] = (out["s"].sum(axis=1) > 0).astype(np.float32)
  return out
