"""Bias and quality of a released model (big_vision .npz or Hugging Face folder) on prepared data.

The `eval` subcommand with
``--config configs/released.py:source=hf,path=CKPT,datasets=fairface+cifar100 --workdir OUT``
writes eval.json, eval_rows.json, summary.json / summary.md and released.json
(the resolved model, tokenizer and preprocessing) to OUT.

Arguments (``get_config("key=value,...")``):
  source: hf | big_vision | '' (from the path).  path: the checkpoint.  family: '' (the
    checkpoint's preprocessing preset) or one of siglip, siglip2, siglip_hf, siglip2_hf, clip.
  tokenizer: an .npz's tokenizer file (sentencepiece model or tokenizer.json).
  datasets: '+'-joined prepared datasets to evaluate on: fairface, utkface, cifar100, coco,
    imagenet (needs imagenet_classes, a file of 1000 names), dollar_street.
  data_dir: the TFDS data dir that holds them ('' = TFDS's default).
  k: the cut-off of MaxSkew / NDKL (default 1000).  bootstrap: resamples for the
    intervals (0 = none).  batch: evaluation batch size.

Evaluators per dataset (config.evals; every field overridable):
  fairface / utkface: gender and race zero-shot accuracy (per group, worst, gap; race in the CLIP
    paper's style: "a photo of a {race} person."), AB of the occupation pairs over gender, and
    MaxSkew@k / NDKL@k over gender and race of five concept pairs (good/evil, smart/dumb,
    attractive/unattractive, lawful/criminal, friendly/unfriendly) in "A photo of a {}
    celebrity.", averaged over the ten concepts;
  cifar100 / imagenet: zero-shot top-1/top-5 (CLIP's 80 templates) and RB (SPEC §3) on their
    object images;  coco: image-text retrieval R@1/5/10 (Karpathy test split);
  dollar_street: zero-shot top-5 over its topics per income quartile and the richest-minus-
    poorest disparity.
Fields left None in config.tokenizer / config.preprocess take the checkpoint's preset
(data/preprocess.py); setting one overrides it.
"""
import ml_collections

from siglip_fair.config import parse_arg
from siglip_fair.data.faces import FAIRFACE_RACES, UTKFACE_RACES
from siglip_fair.evaluate import classnames, prompts

ARGS = dict(source="", path="", family="", tokenizer="", datasets="fairface+cifar100+coco",
            data_dir="", k=1000, bootstrap=1000, batch=64, imagenet_classes="")
DATASETS = ("fairface", "utkface", "cifar100", "coco", "imagenet", "dollar_street")
# (dataset, split) of each name: the splits the papers report.
SPLITS = {"fairface": ("fairface", "validation"), "utkface": ("utkface", "train"),
          "cifar100": ("cifar100", "test"), "coco": ("coco_captions", "test"),
          "imagenet": ("imagenet2012", "validation"), "dollar_street": ("dollar_street", "test")}
CONCEPT_PAIRS = (("good", "evil"), ("smart", "dumb"), ("attractive", "unattractive"),
                 ("lawful", "criminal"), ("friendly", "unfriendly"))
CELEBRITY = ("A photo of a {} celebrity.",)
RACE_WORDS = {"White": ["white"], "Black": ["black"], "Latino_Hispanic": ["latino", "hispanic"],
              "East Asian": ["east asian"], "Southeast Asian": ["southeast asian"],
              "Indian": ["indian"], "Middle Eastern": ["middle eastern"], "Asian": ["asian"],
              "Others": ["other race"]}
PERSON = ("a photo of a {} person.",)


def _faces(name, races, arg, bootstrap):
  """Evaluators on a face dataset (gender 0 = man, race indexing `races`)."""
  concepts = [c for pair in CONCEPT_PAIRS for c in pair]
  skew = dict(type="retrieval_skew", split=name, queries=concepts, templates=CELEBRITY,
              ks=(arg.k,))
  return {
      f"{name}_gender": dict(type="attribute_accuracy", split=name, label_key="gender",
                             prefix=f"{name}/", bootstrap=bootstrap),
      f"{name}_race": dict(type="attribute_accuracy", split=name, label_key="race",
                           groups=list(races), group_words={r: RACE_WORDS[r] for r in races},
                           templates=PERSON, name="race_acc", prefix=f"{name}/",
                           bootstrap=bootstrap),
      f"{name}_ab": dict(type="association_bias", split=name, prefix=f"{name}/",
                         bootstrap=bootstrap),
      f"{name}_skew_gender": dict(skew, group_key="gender", prefix=f"{name}/gender_"),
      f"{name}_skew_race": dict(skew, group_key="race", prefix=f"{name}/race_"),
  }


def get_config(arg=None):
  arg = parse_arg(arg, **ARGS)
  c = ml_collections.ConfigDict()
  # The checkpoint: resize_posemb resamples its position grid when preprocess.size asks for
  # another resolution (posemb_method: posemb.METHODS); scan runs the blocks under nn.scan.
  c.released = ml_collections.ConfigDict(dict(
      source=arg.source, path=arg.path, family=arg.family, resize_posemb=False,
      posemb_method="zoom", scan=False))
  # None: the checkpoint's preset (data/preprocess.py, models/released.py).
  c.tokenizer = ml_collections.ConfigDict(dict(
      kind=None, path=arg.tokenizer or None, max_len=None, lower=None, canonicalize=None,
      bos=None, eos=None, eos_token=None, pad_token=None))
  c.preprocess = ml_collections.ConfigDict(dict(
      size=None, resize=None, method=None, crop=None, mean=None, std=None))
  c.model = ml_collections.ConfigDict(dict(dtype="float32"))  # 'bfloat16' on accelerators
  c.data_dir = arg.data_dir
  c.eval_batch_size = arg.batch
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  bootstrap = dict(num_samples=arg.bootstrap)

  names = [n for n in arg.datasets.split("+") if n]
  unknown = sorted(set(names) - set(DATASETS))
  if unknown:
    raise ValueError(f"datasets={arg.datasets!r} names unknown datasets {unknown}; use "
                     f"'+'-joined names of {DATASETS}.")
  c.eval_data = ml_collections.ConfigDict()
  evals = {}
  for name in names:
    dataset, split = SPLITS[name]
    c.eval_data[name] = dict(dataset=dataset, split=split, data_dir="")
    if name in ("fairface", "utkface"):
      evals.update(_faces(name, FAIRFACE_RACES if name == "fairface" else UTKFACE_RACES, arg,
                          bootstrap))
    elif name in ("cifar100", "imagenet"):
      if name == "imagenet" and not arg.imagenet_classes:
        raise ValueError("datasets=...imagenet needs imagenet_classes=FILE (1000 class names "
                         "in label order; evaluate/classnames.py).")
      classes = (classnames.CIFAR100_CLASSES if name == "cifar100"
                 else classnames.imagenet_class_names(arg.imagenet_classes))
      evals[f"{name}_zeroshot"] = dict(type="zeroshot", split=name, classes=list(classes),
                                       label_key="label", ks=(1, 5),
                                       templates=list(classnames.CLIP_IMAGENET_TEMPLATES),
                                       prefix=f"{name}/", bootstrap=bootstrap)
      evals[f"{name}_rb"] = dict(type="representation_bias", split=name, prefix=f"{name}/",
                                 bootstrap=bootstrap)
    elif name == "coco":
      evals["coco_retrieval"] = dict(type="retrieval", split=name, prefix="coco/")
    else:
      evals["dollar_street"] = dict(type="income_zeroshot", split=name, ks=(5,),
                                    templates=list(prompts.DEFAULT_TEMPLATES),
                                    prefix="dollar_street/", bootstrap=bootstrap)
  c.evals = ml_collections.ConfigDict(evals)
  return c
