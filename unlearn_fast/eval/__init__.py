"""Evaluation: metrics (ROUGE, truth ratio, KS test, membership inference), evaluating a model on
forget / retain / held-out sets, the baseline methods (retrain, GA, GradDiff, NPO) and the report.
Imports :mod:`unlearn_fast.fusion` and below."""
