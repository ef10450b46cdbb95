"""torch_mlp.training.config: every "(default: X)" in --help is the parser's real default."""

from __future__ import annotations

import argparse
import re

import pytest

from torch_mlp.training import config as C
from torch_mlp.training.errors import CheckpointError


def _help_defaults(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the X of "(default: X)" in that flag's help, as --help prints it."""
    formatter = parser._get_formatter()
    text = " ".join(parser.format_help().split())  # argparse wraps lines: undo it
    found = {}
    for action in parser._actions:
        if action.dest == "help":
            continue
        shown = formatter._expand_help(action)  # the help text, %% expanded
        assert " ".join(shown.split()) in text, action.dest
        m = re.fullmatch(r".*\(default: ([^)]*)\)", shown, re.DOTALL)
        assert m, f"{action.option_strings}: no '(default: ...)' at the end of its help"
        found[action.dest] = m.group(1)
    return found


def test_every_help_default_is_the_real_default() -> None:
    parser = C.build_parser()
    shown = _help_defaults(parser)
    assert set(shown) == {a.dest for a in parser._actions if a.dest != "help"}
    for action in parser._actions:
        if action.dest == "help":
            continue
        if action.default is None:  # resolved later: the text says how
            assert shown[action.dest] == C.DEFAULT_TEXT[action.dest], action.dest
        else:
            assert shown[action.dest] == C.format_default(action.default), action.dest
    # --lr's default depends on --optimizer: the help names each, as parse_args resolves it.
    for opt in ("sgd", "adam"):
        lr = C.parse_args(["--optimizer", opt]).lr
        assert lr == C.LR_DEFAULTS[opt]
        assert f"{lr} for {opt}" in shown["lr"]
    assert C.parse_args([]).lr == 0.4


def test_help_defaults_follow_the_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    # A changed table changes the help and the parser together: nothing is typed twice.
    monkeypatch.setitem(C.DEFAULTS, "epochs", 7)
    monkeypatch.setitem(C.DEFAULTS, "hidden", [64, 32])
    parser = C.build_parser()
    shown = _help_defaults(parser)
    assert shown["epochs"] == "7" and parser.parse_args([]).epochs == 7
    assert shown["hidden"] == "64 32" and parser.parse_args([]).hidden == [64, 32]


def test_defaults_tables_cover_every_flag() -> None:
    dests = {a.dest for a in C.build_parser()._actions if a.dest != "help"}
    assert dests == set(C.DEFAULTS) | set(C.RUN_DEFAULTS)
    assert not set(C.DEFAULTS) & set(C.RUN_DEFAULTS)
    assert set(C.TRAJECTORY_KEYS) <= dests


def _saved_args(**changes: object) -> dict:
    """A checkpoint's ``args``: the defaults as a run saves them, with ``changes``."""
    args = {k: v for k, v in vars(C.parse_args([])).items() if k != "explicit"}
    return {**args, **changes}


@pytest.mark.parametrize(("changes", "message"), [
    ({"lr": -5.0}, r"field args\.lr: must be in \(0, 1000000\.0\], got -5\.0"),
    ({"lr": "x"}, r"field args\.lr: invalid float value: 'x'"),
    ({"epochs": 0}, "field args.epochs: must be a positive integer, got 0"),
    ({"epochs": 2.5}, "field args.epochs: invalid int value: '2.5'"),
    ({"hidden": [32, -1]}, "field args.hidden: must be a positive integer, got -1"),
    ({"hidden": 32}, "field args.hidden: must be a non-empty list of integers, got 32"),
    ({"momentum": 1.0}, r"field args\.momentum: must be in \[0, 1\), got 1\.0"),
    ({"optimizer": "rmsprop"}, "field args.optimizer: invalid choice: 'rmsprop'"),
    ({"nesterov": "yes"}, "field args.nesterov: must be true or false, got 'yes'"),
    ({"seed": 2**64}, r"field args\.seed: must be in \[0, 2\*\*64 - 1\]"),
    ({"limit": 0}, "field args.limit: must be a positive integer, got 0"),
], ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_resume_args_from_a_checkpoint_are_checked_like_flags(changes: dict,
                                                               message: str) -> None:
    args = C.parse_args([])
    with pytest.raises(CheckpointError, match=f"^checkpoint c\\.pt: {message}"):
        C.merge_resume_args(args, {"args": _saved_args(**changes)}, "c.pt")


def test_resume_args_that_pass_are_taken() -> None:
    args = C.parse_args([])
    C.merge_resume_args(args, {"args": _saved_args(hidden=[8, 4], lr=0.1, limit=None)}, "c.pt")
    assert args.hidden == [8, 4] and args.lr == 0.1 and args.limit is None


def test_resume_args_missing_from_a_checkpoint_are_named() -> None:
    for saved, missing in (({}, ", ".join(C.TRAJECTORY_KEYS)), (_saved_args(), "lr, amp")):
        saved = {k: v for k, v in saved.items() if k not in ("lr", "amp")}
        with pytest.raises(CheckpointError, match=f"^checkpoint c\\.pt lacks its run's arguments "
                           f"\\(args has no {missing}\\): it was not written by train\\.py, or "
                           f"it is damaged"):
            C.merge_resume_args(C.parse_args(["--hidden", "32"]), {"args": saved}, "c.pt")
