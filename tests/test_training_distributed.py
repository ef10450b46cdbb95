"""torch_mlp.training.distributed: teardown order, and only for a group it created."""

from __future__ import annotations

from typing import Any

import pytest

from torch_mlp.training import distributed as D


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records barrier / destroy_process_group instead of running them."""
    seen: list[str] = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "barrier", lambda *a, **k: seen.append("barrier"))
    monkeypatch.setattr(D.dist, "destroy_process_group", lambda *a: seen.append("destroy"))
    return seen


def test_close_meets_at_a_barrier_then_destroys(calls: list[str]) -> None:
    dd = D.Dist(rank=1, world_size=2, owns_group=True)
    dd.close()
    assert calls == ["barrier", "destroy"]
    dd.close()  # once only
    assert calls == ["barrier", "destroy"]


def test_close_after_a_failure_destroys_without_a_barrier(calls: list[str]) -> None:
    D.Dist(rank=0, world_size=2, owns_group=True).close(failed=True)
    assert calls == ["destroy"]


def test_close_leaves_a_group_it_did_not_create(calls: list[str]) -> None:
    D.Dist(rank=0, world_size=2, owns_group=False).close()
    D.Dist().close()
    assert calls == []


def test_destroy_runs_even_if_the_barrier_fails(calls: list[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("peer gone")

    monkeypatch.setattr(D.dist, "barrier", broken)
    with pytest.raises(RuntimeError, match="peer gone"):
        D.Dist(rank=0, world_size=2, owns_group=True).close()
    assert calls == ["destroy"]


def test_closing_closes_after_the_block(calls: list[str]) -> None:
    with D.Dist(rank=0, world_size=2, owns_group=True).closing() as dd:
        assert calls == [] and dd.world_size == 2
    assert calls == ["barrier", "destroy"]
    calls.clear()
    with pytest.raises(KeyboardInterrupt), D.Dist(rank=0, world_size=2, owns_group=True).closing():
        raise KeyboardInterrupt  # a failure: no barrier, the exception goes on
    assert calls == ["destroy"]


def test_init_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_distributed("cpu") == D.Dist()
    # A group the caller made already (e.g. a test harness) is joined, not owned.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    dd = D.init_distributed("cpu")
    assert (dd.rank, dd.world_size, dd.owns_group, dd.enabled, dd.is_main) == (1, 2, False,
                                                                               True, False)

