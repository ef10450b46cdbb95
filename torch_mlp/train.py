"""``python -m torch_mlp.train``: the MNIST trainer, :mod:`torch_mlp.training`."""

from torch_mlp.training import cli, main  # noqa: F401  (main: torch_mlp.train.main(argv))

if __name__ == "__main__":
    cli()
