"""Config checks that run before any work: a bad config fails before data are built or anything
is written (an earlier run's config.json included).

The library validates each field where it reads it, often late (a model's pooling only when it
first runs, the tokenizer's vocabulary only after the world is built); these run the same
validators first, each owned by the module that reads the field, plus the few that need to
look ahead (the patch size against the image size, the vocabulary against the captions'
alphabet).
"""
from __future__ import annotations

import os

TOKENIZER_SPECIALS = 3  # pad, eos, unk (tokenizer.py)


def check_balance(config) -> None:
  from siglip_fair.balance import m4, shards
  m4.check_config(config.balance)
  if config.get("annotations_dir"):
    shards.as_shards(config.annotations_dir)  # opens headers only


def check_data(config) -> None:
  """The world, a training corpus to import from and the tokenizer's vocabulary."""
  from siglip_fair.data import builder, world
  builder.builder_config(config.world)  # validates every knob and split size
  if config.get("train_data"):
    path = os.path.expanduser(config.train_data)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"train_data={config.train_data!r} is not a folder; import a corpus "
                              "first (python -m siglip_fair.data.imports ...) and pass its folder.")
  tok = config.tokenizer
  if not tok.get("path"):
    need = len(world.caption_alphabet()) + TOKENIZER_SPECIALS
    if not config.get("train_data") and tok.vocab_size < need:
      raise ValueError(
          f"tokenizer.vocab_size={tok.vocab_size} is too small: the world's captions can use "
          f"{need - TOKENIZER_SPECIALS} distinct characters, and a SentencePiece vocabulary needs "
          f"one piece each plus pad, eos and unk; use --config.tokenizer.vocab_size={need} or "
          "more (e.g. 320).")
    if tok.vocab_size < 4:
      raise ValueError(f"tokenizer.vocab_size={tok.vocab_size} must be >= 4 (pad, eos, unk and "
                       "one piece); e.g. --config.tokenizer.vocab_size=320.")
  elif not os.path.isfile(os.path.expanduser(tok.path)):
    raise FileNotFoundError(f"tokenizer.path={tok.path!r} does not exist; point it at a "
                            "SentencePiece `.model` file, or set it to '' to train one.")


def check_train(config) -> None:
  """Everything `train` reads: durations, data schedule, losses, model, optimizer, mesh,
  evaluators (and the balance config when a balanced version is used)."""
  from siglip_fair.config import durations
  from siglip_fair.data import versions
  from siglip_fair.evaluate import evaluators
  from siglip_fair.models.two_tower import check_config as check_model
  from siglip_fair.train import sharding
  from siglip_fair.train.losses import LOSS_NAMES
  from siglip_fair.train.optim import make_optimizer
  from siglip_fair.train.state import LOSS_IMPLS, NONFINITE_POLICIES
  check_data(config)
  durations.check_durations(config)
  steps = durations.resolve_steps(config, num_examples=config.batch_size)
  schedule = versions.parse_schedule(config.data_version)
  if any(v != "baseline" for v, _ in schedule):
    check_balance(config)
  if config.get("nonfinite", "stop") not in NONFINITE_POLICIES:
    raise ValueError(f"config.nonfinite={config.nonfinite!r}; use one of {NONFINITE_POLICIES} "
                     "(stop at a non-finite loss or gradient, or skip that step's update).")
  loss = config.get("loss", "sigmoid")
  if loss not in LOSS_NAMES:
    raise ValueError(f"config.loss={loss!r} is not a loss; use one of {LOSS_NAMES}.")
  impl = config.get("loss_impl", "full")
  if impl not in LOSS_IMPLS:
    import difflib  # pylint: disable=g-import-not-at-top
    close = difflib.get_close_matches(str(impl), LOSS_IMPLS, n=1)
    raise ValueError(f"config.loss_impl={impl!r} is not a loss implementation; use one of "
                     f"{LOSS_IMPLS}{f' (did you mean {close[0]!r}?)' if close else ''}.")
  chunk = config.get("loss_chunk", 1024)
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"config.loss_chunk={chunk!r} must be a positive number of rows, e.g. 1024.")
  keep = config.get("keep_ckpts", 2)
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
    raise ValueError(f"config.keep_ckpts must be >= 1, got {keep!r} (a run keeps its latest "
                     "checkpoints to resume from); e.g. --config.keep_ckpts=2.")
  check_model(config.model, config.world.image_size)
  # Epochs count as one batch here, as in check_durations: the sign and syntax are what matter.
  make_optimizer(config.optim, steps.total_steps, steps.warmup_steps,
                 versions.switch_steps(config.data_version, batch_size=config.batch_size,
                                       total_steps=steps.total_steps,
                                       num_examples=config.batch_size),
                 batch_size=config.batch_size, num_examples=config.batch_size)
  sharding.check_batch_size(config.batch_size, sharding.make_mesh(config.get("mesh")))
  for name, sub in dict(config.evals).items():
    evaluators.evaluator_class(name, sub)
