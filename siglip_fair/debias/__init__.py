"""CLIP-debias (SPEC §6): infer sensitive groups from a two-tower model's similarities to
attribute prompts, cluster them into pseudo groups, and train a target model with loss-aware
cluster re-sampling.

* `tasks`: target tasks (coloured digits, the synthetic world, CelebA, UTKFace, Dollar Street).
* `infer`: similarity of every image to attribute prompts under a two-tower checkpoint.
* `cluster`: jitted k-means (k-means++, restarts) and pseudo-group quality (ARI, NMI, purity).
* `sampling`, `trainer`, `nets`: the re-sampling methods and baselines, the training harness with
  model selection on pseudo groups, a small CNN and ResNet-18.
* `metrics`: accuracy, worst-group accuracy, gap, demographic-parity and equalised-odds
  differences of a target classifier.
* `run`, `sensitivity`, `report`: the methods comparison and the sensitivity analysis, with
  tables and plots (`python -m siglip_fair debias`).
"""
from siglip_fair.debias.cluster import (KMeansResult, adjusted_rand_index, kmeans,
                                        normalized_mutual_info, purity)
from siglip_fair.debias.metrics import classification_fairness, pair_groups

__all__ = ["KMeansResult", "adjusted_rand_index", "classification_fairness", "kmeans",
           "normalized_mutual_info", "pair_groups", "purity"]
