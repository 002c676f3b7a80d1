"""CLIP-debias (SPEC §6): infer sensitive groups from a two-tower model's similarities to
attribute prompts, cluster them into pseudo groups, and train a target model with loss-aware
cluster re-sampling.

* `cluster`: jitted k-means (k-means++, restarts) and pseudo-group quality (ARI, NMI, purity).
* `metrics`: accuracy, worst-group accuracy, gap, demographic-parity and equalised-odds
  differences of a target classifier.
* `tasks`: offline debiasing tasks (coloured digits with a spurious colour shortcut).
"""
from siglip_fair.debias.cluster import (KMeansResult, adjusted_rand_index, kmeans,
                                        normalized_mutual_info, purity)
from siglip_fair.debias.metrics import classification_fairness, pair_groups

__all__ = ["KMeansResult", "adjusted_rand_index", "classification_fairness", "kmeans",
           "normalized_mutual_info", "pair_groups", "purity"]
