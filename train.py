#!/usr/bin/env python
"""``python train.py [--help]`` in a checkout: the trainer of torch_mlp/train.py."""

from torch_mlp.train import cli, main  # noqa: F401  (main: train.main(argv) in a script)

if __name__ == "__main__":
    cli()
