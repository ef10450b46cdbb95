"""The parts of the trainer (:mod:`torch_mlp.train`): its command line (config), what a run
keeps on disk (rundir: the lock, checkpoints, metrics.csv) and its pictures (plots)."""
