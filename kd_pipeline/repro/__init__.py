"""The controlled micro-reproduction of the paper's distillation (``python -m kd_pipeline.repro``, ``make repro``).

Modules, in the order a run uses them: ``design`` (the pre-registered experiment: conditions, arms, sizes, pass
rule), ``tasks`` (the task graph per seed), ``runner`` (resumable parallel execution), ``evaluate`` (one model on
its world's benchmark, forced choice + greedy + agreement), ``baselines`` (image-free predictors), ``stats``
(paired tests over seeds), ``report`` (results JSON, tables, plot).
"""
