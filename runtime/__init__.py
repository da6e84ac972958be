"""What is neither DETR nor judgement: the device layer (one :class:`~runtime.device.Backend` per
device type), the private torch APIs the suite uses (``compat``), atomic files and locks, process
groups for torchrun jobs, FLOP counting, the precision names and the fault grammar's shared part.

Imports neither ``detr`` nor pytest (``tests/test_layout.py`` keeps it so).
"""
