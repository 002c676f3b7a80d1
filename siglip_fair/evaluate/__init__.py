"""Evaluation: metric math on embeddings and evaluators that embed eval splits.

* `metrics`: zero-shot classification, retrieval Recall@k (quality, SPEC §4).
* `ceiling`: the best Recall@k any model could reach when images share identical captions.
* `bias`: representation bias, association bias, attribute accuracy (SPEC §3), each in the
  paper's share reading and the model's probability reading (RB `rb` / `rb_smooth`); RB and
  AB are reported in points (`bias.POINTS` × a share or probability) everywhere.
* `bootstrap`: percentile confidence intervals over images.
* `fairness`: MaxSkew@k, NDKL@k (exact or debias-vision-lang convention), per-group /
  worst-group accuracy, the equalised-odds difference (fairlearn's convention), template
  bootstrap.
* `data_bias`: the same biases measured on dataset annotations (before/after M4).
* `base`: the evaluator protocol (`EvalContext`, `Evaluator`) and shared batching.
* `evaluators`: quality evaluators, the registry, `build_evaluators(config.evals, context)`,
  `run_all(evaluators, params)`, `as_rows(results)` (one JSON row per metric);
  `bias_evaluators`: RB, AB, attribute accuracy, retrieval skew.
"""
from siglip_fair.evaluate.bootstrap import bootstrap_ci
from siglip_fair.evaluate.data_bias import data_bias_before_after, data_bias_metrics
from siglip_fair.evaluate.evaluators import (
    EVALUATORS,
    EvalContext,
    as_rows,
    build_evaluators,
    default_evals_config,
    preprocess_images,
    run_all,
)

__all__ = [
    "EVALUATORS", "EvalContext", "as_rows", "bootstrap_ci", "build_evaluators",
    "data_bias_before_after", "data_bias_metrics", "default_evals_config",
    "preprocess_images", "run_all",
]
