"""The demo study: baseline vs M4-balanced SigLIP on the synthetic biased world.

    python -m siglip_fair demo --workdir workdir/demo
    python -m siglip_fair demo --config configs/demo.py:steps=300 --config.balance.eta=0.8

Arguments are those of configs/siglip.py (the base it overrides).
"""
from configs import siglip


def get_config(arg=None):
  c = siglip.get_config(arg)
  # The planted biases: 30 % women among people (RB) and P(woman | occupation) of 0.5 / 0.1
  # for the stereotypically female / male occupation of each pair (AB).
  c.world.woman_prevalence = 0.3
  c.world.association = 0.4
  # Balance on the image-side attributes: the world's ground truth stands in for zero-shot image
  # annotation here. The text lexicons' precision / recall is still reported; balancing on them
  # ('combined', rule 'text_first') leaves a residual association, because a caption that names
  # the wrong group (caption_gender_noise) is a large share of the minority group of a skewed
  # occupation.
  c.annotate.source = "ground_truth"
  # Equal prevalence of the two groups, decorrelated from occupations. Exact balance keeps at most
  # 74 % of this world (every unowned object scene, twice the minority among owned scenes and,
  # per occupation, twice its minority group), so the budget is 65 %.
  c.balance.pi = (0.5, 0.5)
  c.balance.eta = 0.65
  # Tolerances relative to each occupation's prevalence: a rare occupation is held to the same
  # conditional gap as a common one (about 2 points of P(woman | occupation) here).
  c.balance.tolerance = "relative"
  c.balance.eps_rep = 0.002
  c.balance.eps_assoc = 0.005
  c.demo = dict(versions=("baseline", "balanced"))
  return c
