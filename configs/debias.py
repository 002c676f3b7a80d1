"""CLIP-debias (SPEC §6): fairness without group labels, compared with ERM, JTT, GroupDRO and
the oracles on one target task.

    python -m siglip_fair debias --config configs/debias.py:task=digits --workdir w/debias_digits
    python -m siglip_fair debias --config configs/debias.py:task=world,analysis=sensitivity \
        --workdir w/debias_world
    python -m siglip_fair debias --config configs/debias.py:task=celeb_a,net=resnet18 \
        --config.task.data_dir=~/tensorflow_datasets --workdir w/debias_celeba

Arguments (``get_config("key=value,...")``):
  task: digits | world | celeb_a | utkface | dollar_street.
  analysis: methods (every method x seed, a results table) | sensitivity (CLIP-debias over
    prompt sets, k, F and tau on the task, a table and plots).
  net: small_cnn | resnet18.  steps: target-model steps.  seeds: number of seeds.
  clip_steps: training steps of the two-tower model when it has to be trained first.
"""
import ml_collections

from configs import siglip
from siglip_fair.config import parse_arg

ALL_METHODS = ("erm", "cluster_uniform", "clip_debias", "group_dro", "jtt", "oracle_balanced",
               "oracle_group_dro")
TEMPLATES = ("a photo of {}", "a picture of {}", "{}", "a close-up of {}")


def _task(name: str) -> ml_collections.ConfigDict:
  common = dict(name=name, seed=0, image_size=32, val_fraction=0.15, data_dir="",
                max_examples=0)
  if name == "digits":
    # 95 % of training digits drawn in the colour of their class; test colours are random.
    # The digits are 8x8 scans: 16x16 keeps every stroke and costs a quarter of 32x32.
    return ml_collections.ConfigDict(dict(common, image_size=16, correlation=0.95))
  if name == "world":
    # Within-pair occupation vs gender, P(woman | female-stereotyped occupation) = 0.95 in
    # training. Tools and proxies are drawn less often than in the study's world, so a third of
    # the training images show the target only through the gender tint.
    return ml_collections.ConfigDict(dict(
        common, size=3000, val_size=600, test_size=2000, association=0.9,
        world=dict(tool_rate=0.4, proxy_strength=0.5, proxy_base_rate=0.05)))
  if name == "celeb_a":
    return ml_collections.ConfigDict(dict(common, image_size=64, target="Blond_Hair",
                                          sensitive="Male"))
  if name == "utkface":
    return ml_collections.ConfigDict(dict(common, image_size=64, target="gender",
                                          sensitive="race", test_fraction=0.2))
  if name == "dollar_street":
    return ml_collections.ConfigDict(dict(common, image_size=64, sensitive="income_quartile",
                                          num_topics=10))
  raise ValueError(f"unknown debias task {name!r}.")


def _prompts(task: str) -> ml_collections.ConfigDict:
  """Attribute value -> phrases, per named prompt set; `use` picks the set for the main run."""
  if task == "digits":
    sets = {"colour": {"red": ["red", "a red object"], "blue": ["blue", "a blue object"]},
            "colour_words": {"red": ["red"], "blue": ["blue"]},
            "colours8": {c: [c] for c in ("red", "brown", "green", "blue", "white", "yellow",
                                           "purple", "orange")}}
    use = "colour"
  elif task == "utkface":
    # UTKFace's race labels, in faces.UTKFACE_RACES order.
    sets = {"race": {"white": ["a white person"], "black": ["a black person"],
                     "asian": ["an asian person"], "indian": ["an indian person"],
                     "other": ["a latino person", "a middle eastern person"]},
            "gender": {"man": ["a man"], "woman": ["a woman"]}}
    use = "race"
  elif task == "dollar_street":
    sets = {"income": {"poor": ["a poor home", "a simple house"],
                       "rich": ["a rich home", "a luxurious house"]}}
    use = "income"
  else:
    sets = {"gender": {"man": ["a man", "a male person"], "woman": ["a woman", "a female person"]},
            "gender_short": {"man": ["man"], "woman": ["woman"]},
            "gender_age": {"man": ["a man"], "woman": ["a woman"], "old": ["an old person"],
                           "young": ["a young person"]}}
    use = "gender"
  return ml_collections.ConfigDict(dict(sets=sets, use=use, templates=TEMPLATES))


def get_config(arg=None):
  arg = parse_arg(arg, task="digits", analysis="methods", net="small_cnn", steps=600, seeds=3,
                  clip_steps=1200)
  c = ml_collections.ConfigDict()
  c.analysis = arg.analysis
  c.task = _task(arg.task)
  c.prompts = _prompts(arg.task)

  # The two-tower model that infers the groups: by default a SigLIP trained on the synthetic
  # world's captions (it never sees the target task) in <workdir>/clip, or any run's workdir
  # (clip.workdir) or a big_vision checkpoint (clip.kind='big_vision', clip.npz, clip.tokenizer,
  # clip.image_size: 0 = the checkpoint's), or a released big_vision .npz / Hugging Face folder
  # with its own preprocessing (clip.kind='released', clip.path, clip.family: '' = its own).
  # Another image_size than the checkpoint's needs clip.resize_posemb=true.
  c.clip = ml_collections.ConfigDict(dict(
      kind="run", workdir="", train_if_missing=True, npz="", tokenizer="", image_size=0,
      eos="none", text_padding="none", batch_size=256, path="", family="",
      resize_posemb=False,
      config=siglip.get_config(f"steps={arg.clip_steps}")))
  c.clip.config.progress = False

  # Pseudo groups: k-means of the standardised similarity vectors (k = 0: as many clusters as
  # the sensitive attribute has values), crossed with the target label (groups are
  # (label, attribute) pairs, as in the fairness literature).
  c.cluster = ml_collections.ConfigDict(dict(k=0, restarts=10, iters=300, seed=0,
                                             cross_with_label=True))

  c.target = ml_collections.ConfigDict(dict(
      # The world's 32x32 scenes at width 8 train 2.3x faster than at 16 on CPU, and every
      # method's worst-group accuracy moved by less than 5 points in a check.
      net=arg.net,
      net_kwargs=dict(width=8 if arg.task == "world" else 16) if arg.net == "small_cnn" else {},
      optimizer="adam", learning_rate=1e-3, weight_decay=1e-4, momentum=0.9,
      batch_size=64, steps=arg.steps, eval_every="10%",  # steps, '10%', '2ep' or '5000ex'
      selection="worst_pseudo_group",
      # clip_debias: loss-aware re-sampling every refresh_every (F) steps at temperature tau,
      # cluster losses measured on up to probe_per_group training examples per group.
      # Group losses differ by whole nats early on; tau = 1 keeps every group in the mix, while
      # a small tau chases the current worst group and oscillates.
      tau=1.0, refresh_every=25, probe_per_group=256,
      dro_step_size=0.01,  # GroupDRO's q step size (Sagawa et al. 2020)
      jtt_first_steps=max(arg.steps // 3, 1), jtt_upweight=20.0))
  c.methods = ALL_METHODS
  c.seeds = tuple(range(arg.seeds))

  # One factor at a time, the others at their values above.
  c.sensitivity = ml_collections.ConfigDict(dict(
      prompt_sets=tuple(c.prompts.sets), k=(2, 3, 4), refresh_every=(5, 25, 100),
      tau=(0.3, 1.0, 3.0, float("inf")), seeds=(0,)))
  return c
