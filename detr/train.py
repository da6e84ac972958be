"""``python -m detr.train``, kept for one release: the trainer is :mod:`training.train`
(``python -m training.train``), which is the suite's and not the model's."""
import sys

if __name__ == "__main__":
    from training.train import cli

    sys.exit(cli())
