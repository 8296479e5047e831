"""Orchestration: the pipeline's parameters, steps, local runs, compilation and submission.

The step functions here are what the KFP components (`unifl.components`) call, one each;
they wrap the stage libraries with what a pipeline adds around them: MLflow stage runs,
lineage, checkpoint locations that survive a retried pod, and artifact metadata. Nothing in
this package imports kfp at module level, so the steps run in tests and DVC without it.
"""
