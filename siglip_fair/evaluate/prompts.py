"""Prompt templates and prompt sets for zero-shot evaluation.

A prompt SET is a list of words (synonyms) that all describe one class or
group; it is expanded over every template and the resulting text embeddings
are averaged into one class embedding (`metrics.prompt_ensemble`).

Word lists are plain data here and in the evaluator configs: this module never
imports the synthetic world, so evaluators work on any dataset.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# CLIP-style templates; "{}" alone keeps the bare word, which is how short
# synthetic captions name things.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "{}")

# Perceived-gender prompt sets (the keys are the world's GROUPS, in order).
DEFAULT_GROUP_WORDS = {
    "man": ("man", "male", "gentleman"),
    "woman": ("woman", "female", "lady"),
}

_ARTICLE = re.compile(r"\ba(?= \{\})")


def render(template: str, word: str) -> str:
  """Fills `template`'s "{}" with `word`, fixing "a" to "an" before a vowel.

  The article fix keeps prompts grammatical ("a photo of an executive") for
  templates written with "a {}"; it is a first-letter heuristic.
  """
  if template.count("{}") != 1:
    raise ValueError(
        f"Template {template!r} must contain exactly one '{{}}' placeholder.")
  if word and word[0].lower() in "aeiou":
    template = _ARTICLE.sub("an", template)
  return template.replace("{}", word)


def expand(words: Sequence[str], templates: Sequence[str]) -> list[str]:
  """All `len(words) * len(templates)` prompts of one set, word-major."""
  if isinstance(words, str):
    raise ValueError(f"Prompt words must be a list of strings, got the single "
                     f"string {words!r}; wrap it in a list.")
  if not words or not templates:
    raise ValueError(f"A prompt set needs at least one word and one template; "
                     f"got words={list(words)}, templates={list(templates)}.")
  return [render(t, w) for w in words for t in templates]


def prompt_sets(
    sets: Mapping[str, Sequence[str]], templates: Sequence[str]
) -> tuple[list[str], list[slice]]:
  """Expands several prompt sets into one flat list of texts.

  Args:
    sets: name -> words, in the order the class embeddings should come out.
    templates: templates with one "{}".

  Returns:
    (texts, spans): all prompts in order, and for each set the slice of
    `texts` holding its prompts (sets may differ in size).
  """
  texts, spans = [], []
  for name, words in sets.items():
    if isinstance(words, str):
      raise ValueError(f"Prompt set {name!r} must be a list of words, got the "
                       f"string {words!r}; use [{words!r}].")
    prompts = expand(words, templates)
    spans.append(slice(len(texts), len(texts) + len(prompts)))
    texts.extend(prompts)
  return texts, spans
