#!/usr/bin/env python
"""``python train.py [--help]`` in a checkout: the trainer, torch_mlp/training."""

from torch_mlp.training import cli, main  # noqa: F401  (main: train.main(argv) in a script)

if __name__ == "__main__":
    cli()
