"""Benchmarks of torch_mlp against torch.nn: ``make bench`` (``python -m bench``).

Sections (``--only``): ``step`` training step (plus the compiled step with ``--compile``),
``split`` the step by phase with the model and the loss swapped one at a time (``--split``
shapes), ``ops`` per-op forward+backward, ``memory`` saved-for-backward bytes and step peak,
``roofline`` the step against its GEMMs alone, ``e2e`` seconds per MNIST epoch of train.py.
Custom and native always run in one process, interleaved, after a warm-up; ratios are
custom/native per interleaved pair. Never part of ``make test``: tests/test_bench.py only checks
that ``--quick`` runs write well-formed results.
"""

# OpenMP's wait policy is left as you set it (torch's default unless OMP_WAIT_POLICY is in the
# environment), as train.py leaves it: the e2e section times train.py as it runs for you, and
# on an idle CPU the default is the faster one (docs/training.md, "Threads"). On a CPU shared
# with other jobs, run ``OMP_WAIT_POLICY=PASSIVE make bench``. The results file records the
# value in force.
