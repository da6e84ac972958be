"""The trainer (``python -m training.train``), its DDP equivalence check and injected faults,
distributed jobs under torchrun, FlagPerf metrics, the training report and the convergence verdict.
Imports detr and runtime; knows nothing of pytest."""
