"""One SigLIP (or CLIP) training run on the synthetic biased world.

    python -m siglip_fair train --config configs/siglip.py:data=balanced,steps=1500 --workdir w/bal

Arguments (``get_config("key=value,...")``):
  variant: image tower, e.g. mu/4, Ti/8, S/16.  text: text tower size (mu, Ti, S, ...).
  width: override both towers' width (0 keeps the variant's).  depth: same for depth.
  embed: representation (embedding) width.  res: image resolution.
  steps: training steps.  batch: global batch size.  loss: sigmoid | softmax.
  data: baseline | balanced (reads the keep mask from ``balance_dir``).  seed: run seed.
  lr: peak learning rate (``optim.lr``).
  init: a released checkpoint to fine-tune (big_vision .npz or Hugging Face folder): model and
    tokenizer come from it and its preprocessing preset (models/released.py), ``model.init_from``
    loads its weights (its position grid resampled when ``res`` differs) and the loss follows
    it (sigmoid with a learnt bias, softmax without); variant, text, width, depth and embed are
    then unused.  init_tokenizer: the tokenizer file of a big_vision .npz (which carries none).
"""
import ml_collections

from siglip_fair.annotate import default_config as annotate_config
from siglip_fair.balance.m4 import default_config as m4_config
from siglip_fair.config import parse_arg
from siglip_fair.data import world
from siglip_fair.evaluate.evaluators import default_evals_config


ARGS = dict(variant="mu/8", text="mu", width=64, depth=2, embed=64, res=32, steps=1200,
            batch=128, loss="sigmoid", data="baseline", seed=0, lr=3e-3, init="",
            init_tokenizer="")


def get_config(arg=None, **defaults):
  """`defaults` replace entries of `ARGS` for configs built on this one (configs/demo.py)."""
  arg = parse_arg(arg, **{**ARGS, **defaults})
  c = ml_collections.ConfigDict()
  c.seed = arg.seed

  # data -> annotate -> balance
  c.world = world.default_config()
  c.world.image_size = arg.res
  c.data_dir = ""  # '' = <workdir>/data; share one folder between runs to build it once.
  c.cache_train = True  # hold the decoded train split in memory (small data sets only)
  # '' = train on the synthetic world; else a corpus imported with `python -m
  # siglip_fair.data.imports` (its folder), annotated from its captions (annotate.source='text').
  c.train_data = ""
  # path '' trains a sentencepiece model on the captions. The encoding rules (data/tokenizer.py;
  # released models' presets in data/preprocess.py): kind 'sentencepiece' | 'hf' (a Hugging Face
  # tokenizer.json), lower-casing, canonicalize (punctuation removed, whitespace collapsed), bos
  # (a token, '' = none), eos 'none' | 'yes' | 'sticky', eos_token ('' = the sentencepiece
  # model's EOS), pad_token ('' = id 0).
  c.tokenizer = ml_collections.ConfigDict(dict(
      path="", vocab_size=320, max_len=16, kind="sentencepiece", lower=False,
      canonicalize=False, bos="", eos="sticky", eos_token="", pad_token=""))
  c.annotate = annotate_config()
  c.balance = m4_config()
  c.data_version = arg.data  # baseline | balanced
  c.balance_dir = ""  # '' = <workdir>/balance (written by the `balance` subcommand)
  # '' = annotate the training split; else a folder of annotation shards (.npz, in training-split
  # order) that M4 streams (balance/shards.py).
  c.annotations_dir = ""

  # train
  c.loss = arg.loss
  # 'full': [B, B] logits under jit; 'ring': chunked across the batch axes of the mesh
  # (train/ring_losses.py); 'chunked': blocks of loss_chunk rows inside each device
  # (train/chunked_losses.py), for big batches on one accelerator.
  c.loss_impl = "full"
  c.loss_chunk = 1024
  # Gradient accumulation (train/accumulate.py): the global batch in accum_steps micro-batches,
  # one update. 'cached' (open_clip's --accum-freq) gives the whole batch's contrastive gradient
  # for one more forward pass; 'micro' trains on each micro-batch's own negatives.
  c.accum_steps = 1
  c.accum_mode = "cached"
  c.batch_size = arg.batch
  c.total = str(arg.steps)
  c.warmup = "5%"
  c.log_every = "2%"
  c.ckpt_every = "25%"
  c.eval_every = "10%"
  c.keep_ckpts = 2
  # A step whose loss, gradients or updated parameters are NaN/Inf: 'stop' ends training with an
  # error naming the step (the last good checkpoint stays the latest); 'skip' drops that update
  # and trains on, counting such steps in the metric nonfinite_steps (train/loop.py).
  c.nonfinite = "stop"
  # > 0: also keep an exponential moving average of the parameters (decay per update, warmed up
  # as TF's ExponentialMovingAverage) and evaluate and export it instead of the last step's
  # weights; it smooths the step-to-step jitter of bias readings (docs/NOISE.md). 0 = off.
  c.ema_decay = 0.0
  c.progress = True
  c.tensorboard = True  # also write <workdir>/tensorboard (metrics.jsonl is always written)
  # Peak FLOP/s of one device for the MFU metric; 0.0 = the vendor figure for known
  # accelerators (train/flops.py), none elsewhere. Set it for others or for fp32 runs.
  c.peak_flops = 0.0
  # None keeps the variant's own size; the fields are always there, so `--config.model.image.
  # depth=...` works whatever the argument.
  overrides = {k: v or None for k, v in dict(width=arg.width, depth=arg.depth).items()}
  # Tower options (models/two_tower.py): OpenAI CLIP's are image.pool='tok', cls_posemb,
  # pre_norm, patch_bias=False; text.causal, pool='eos', eos_id, padding='none'; act
  # 'quick_gelu', norm_eps 1e-5, head_bias=False. image.pixel_mean / pixel_std: the pixel
  # normalisation the model applies to its [-1, 1] images (() = none; CLIP's mean / std).
  tower = dict(head="", scan=False, act="gelu", norm_eps=1e-6, remat="none")
  c.model = ml_collections.ConfigDict(dict(
      # head='' uses model.head; scan=True runs the blocks under nn.scan with big_vision's
      # stacked parameter layout (same numbers, one compiled block). remat: 'none' | 'full'
      # (recompute each block in the backward pass) | 'dots' (keep its matmul outputs).
      image=dict(variant=arg.variant, pool="gap", posemb="learn", cls_posemb=False,
                 pre_norm=False, patch_bias=True, pixel_mean=(), pixel_std=(), **tower,
                 **overrides),
      text=dict(variant=arg.text, vocab_size=c.tokenizer.vocab_size, max_len=c.tokenizer.max_len,
                pool="last", padding="mask", causal=False, eos_id=None, **tower, **overrides),
      embed_dim=arg.embed,
      head="linear",  # linear | mlp | none (see models/two_tower.py)
      head_bias=True,
      dtype="float32",  # compute dtype; 'bfloat16' on accelerators (parameters stay float32)
      t_init=10.0 if arg.loss == "sigmoid" else 1 / 0.07,
      b_init=-10.0 if arg.loss == "sigmoid" else None,
      # A released checkpoint (big_vision .npz, Hugging Face folder) whose weights replace the
      # random initialisation: training fine-tunes it. Its config.model must match (the `init`
      # argument builds it); init_resize_posemb resamples its position grid to world.image_size.
      init_from="",
      init_resize_posemb=False,
  ))
  if arg.init:
    _from_checkpoint(c, arg)
  # name: adamw | sgd | adafactor. The lr warms up linearly, then follows `schedule`: 'cosine'
  # to end_lr_frac * lr, 'rsqrt' (lr / sqrt(1 + t / timescale), big_vision's) or 'constant';
  # `cooldown` ends any of them linearly at 0, `rewarmup` restarts it (warm-up from 0) at each
  # switch of a data_version schedule. Those three are durations like `warmup` ('0' = off), as
  # strings so that --config.optim.rewarmup=10% is accepted. Weight decay applies to the
  # parameters whose path matches wd_params (train/optim.py).
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=arg.lr, wd=1e-4, b1=0.9, b2=0.98, eps=1e-8, clip_norm=1.0,
      schedule="cosine", end_lr_frac=0.0, timescale="10000", cooldown="0", rewarmup="0",
      wd_params=r"(.*/)?(kernel|embedding)$"))
  # Device mesh (train/sharding.py): the batch is split over data x fsdp, parameters and
  # optimizer state over fsdp as well; sizes multiply to the device count, one may be -1.
  # fsdp=1 is plain data parallelism; e.g. --config.mesh.data=2 --config.mesh.fsdp=4 on 8.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  # (regex over each state leaf's path, 'fsdp' | 'replicate'), first full match wins; 'fsdp'
  # splits a leaf's largest dimension divisible by mesh.fsdp (replicated when that is 1).
  c.sharding_rules = ((".*", "fsdp"),)

  # evaluate
  c.evals = default_evals_config(
      world.OBJECT_CLASSES,
      occupation_pairs=[(world.OCCUPATIONS[i], world.OCCUPATIONS[j])
                        for i, j in world.OCCUPATION_PAIRS],
      groups=world.GROUPS, num_bootstrap=1000)
  # Real evaluation data next to the synthetic splits, e.g.
  #   c.eval_data.fairface = dict(dataset="fairface", split="validation")
  # with an evaluator on it: c.evals.fairface_gender = dict(type="attribute_accuracy",
  #   split="fairface", prefix="fairface/"). Loaders: siglip_fair/data/datasets.py.
  # The world's object classes follow its knobs (world.object_scenes, object_class_mode, ...):
  # the evaluator names them when it is built (study.make_evaluators).
  del c.evals.zeroshot["classes"]
  c.evals.zeroshot.classes = "world"
  c.eval_data = ml_collections.ConfigDict()
  c.eval_batch_size = 250
  return c


def _from_checkpoint(c, arg):
  """Model, tokenizer and loss of the released checkpoint `arg.init` (see the docstring)."""
  from siglip_fair.models import released  # pylint: disable=g-import-not-at-top
  spec = released.resolve(arg.init, tokenizer=dict(path=arg.init_tokenizer or None))
  dtype = c.model.dtype
  c.model = ml_collections.ConfigDict(spec.model)
  c.model.update(dtype=dtype, init_from=arg.init,
                 init_resize_posemb=spec.released.image_size != arg.res)
  c.tokenizer = ml_collections.ConfigDict(spec.tokenizer)
  c.loss = "sigmoid" if c.model.b_init is not None else "softmax"


def sweep(add):
  """Baseline vs balanced data over three seeds (the launcher of a later issue runs these)."""
  for data in ("baseline", "balanced"):
    for seed in range(3):
      add(data=data, seed=seed)
