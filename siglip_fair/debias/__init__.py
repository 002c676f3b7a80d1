"""CLIP-debias (SPEC §6): infer sensitive groups from a two-tower model's similarities to
attribute prompts, cluster them into pseudo groups, and train a target model with loss-aware
cluster re-sampling.

* `cluster`: jitted k-means (k-means++, restarts) and pseudo-group quality (ARI, NMI, purity).
"""
from siglip_fair.debias.cluster import (KMeansResult, adjusted_rand_index, kmeans,
                                        normalized_mutual_info, purity)

__all__ = ["KMeansResult", "adjusted_rand_index", "kmeans", "normalized_mutual_info", "purity"]
