"""The conformance tests users run: one file per DETR part, the core-step benchmark and the training test."""
