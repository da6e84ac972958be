"""Distributed training jobs under torchrun, FlagPerf metrics, the training report and the convergence verdict. Knows nothing of pytest."""
