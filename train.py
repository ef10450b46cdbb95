#!/usr/bin/env python
"""Train an MLP on MNIST with torch_mlp's hand-derived backward passes: ``python train.py
--help``. The trainer is torch_mlp/train.py (also ``python -m torch_mlp.train`` and the
``torch-mlp-train`` command of an installed package); this file runs it from a checkout."""

from torch_mlp.train import cli, main  # noqa: F401  (main: train.main(argv) in a script)

if __name__ == "__main__":
    cli()
