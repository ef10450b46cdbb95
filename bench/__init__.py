"""Benchmarks of torch_mlp against torch.nn: ``make bench`` (``python -m bench``).

Sections (``--only``): ``step`` training step (plus the compiled step with ``--compile``),
``split`` the step by phase with the model and the loss swapped one at a time (``--split``
shapes), ``ops`` per-op forward+backward, ``memory`` saved-for-backward bytes and step peak,
``roofline`` the step against its GEMMs alone, ``e2e`` seconds per MNIST epoch of train.py.
Custom and native always run in one process, interleaved, after a warm-up; ratios are
custom/native per interleaved pair. Never part of ``make test``: tests/test_bench.py only checks
that ``--quick`` runs write well-formed results.
"""

import os

# OpenMP threads that sleep rather than spin while they wait, as train.py sets: on a CPU shared
# with other jobs, spinning threads starve each other and the timings measure the scheduler.
# Set before torch loads (``python -m bench`` imports this first); an OMP_WAIT_POLICY of your
# own wins. The results file records the value in force.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
