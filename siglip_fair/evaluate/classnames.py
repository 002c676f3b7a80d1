"""Class names and prompt templates for zero-shot evaluation on real datasets.

Templates use `prompts.render`'s single "{}" placeholder.

ImageNet: the 1000 human-readable CLIP class names are not bundled (they
could not be obtained offline here, and inventing names would silently skew
accuracy); `read_class_names` loads them from a text file with one name per
line in TFDS label order (e.g. a copy of CLIP's `imagenet_classes` list).
"""
from __future__ import annotations

import os

# CIFAR-100 fine labels in TFDS `label` order (the dataset's alphabetical
# fine_label_names.txt). TFDS only learns these names while building, from the
# downloaded archive, so they are written out here.
CIFAR100_LABELS = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
    "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree",
    "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper",
    "table", "tank", "telephone", "television", "tiger", "tractor", "train",
    "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm")

# Prompt-ready CIFAR-100 names ("aquarium fish", not "aquarium_fish").
CIFAR100_CLASSES = tuple(n.replace("_", " ") for n in CIFAR100_LABELS)

# The 80 ImageNet prompt templates of CLIP (Radford et al., 2021), in the order
# of CLIP's "Prompt_Engineering_for_ImageNet" notebook. Their ungrammatical
# "a origami"/"a embroidered" are kept: they are what CLIP numbers used.
CLIP_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

NUM_IMAGENET_CLASSES = 1000


def read_class_names(path, expected: int | None = None) -> tuple[str, ...]:
  """Class names from a UTF-8 text file, one per line in label order.

  Blank lines and surrounding whitespace are dropped. With `expected`, a file
  with a different number of names is an error (a short file would silently
  shift every later label).
  """
  with open(os.fspath(path), encoding="utf-8") as f:
    names = tuple(line.strip() for line in f if line.strip())
  if expected is not None and len(names) != expected:
    raise ValueError(f"{path} has {len(names)} class names; expected "
                     f"{expected}, one per line in label order.")
  return names


def imagenet_class_names(path) -> tuple[str, ...]:
  """The 1000 ImageNet class names (label order) from a one-per-line file."""
  return read_class_names(path, expected=NUM_IMAGENET_CLASSES)
