"""siglip_fair: fair contrastive image-text pretraining in JAX.

Data flow (one sub-package each): data -> annotate -> balance -> train -> evaluate -> report.
`siglip_fair.study.train_and_evaluate(config, workdir)` is the library entry point for one run;
`siglip_fair.demo.run(config, workdir)` runs the whole baseline-vs-balanced study.
"""
__version__ = "0.1.0"
