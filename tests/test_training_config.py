"""torch_mlp.training.config: every "(default: X)" in --help is the parser's real default;
a resume takes the checkpoint's flags."""

from __future__ import annotations

import argparse
import re

import pytest

from torch_mlp.training import config as C


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


def test_resume_takes_the_checkpoints_flags_unless_given_otherwise() -> None:
    saved = vars(C.parse_args(["--hidden", "8", "4", "--lr", "0.1"]))  # as a checkpoint keeps
    args = C.parse_args(["--resume", "c.pt", "--epochs", "13"])  # 13: the checkpoint's too
    C.merge_resume_args(args, saved, "c.pt")
    assert args.hidden == [8, 4] and args.lr == 0.1 and args.limit is None
    with pytest.raises(C.TrainingError, match=r"^checkpoint c\.pt is from a run with other "
                       r"settings: --hidden 8 \(checkpoint: 8 4\)\. --resume continues"):
        C.merge_resume_args(C.parse_args(["--hidden", "8"]), saved, "c.pt")


def test_resume_keeps_the_checkpoints_threads_and_compile_unless_given() -> None:
    # Another thread count sums in another order: a resume is bit-identical only with the
    # run's own, so it is the default; one given on the command line is taken, as asked.
    saved = vars(C.parse_args(["--threads", "1", "--compile"]))
    args = C.parse_args(["--resume", "c.pt"])
    C.merge_resume_args(args, saved, "c.pt")
    assert args.threads == 1 and args.compile is True
    args = C.parse_args(["--resume", "c.pt", "--threads", "2"])
    C.merge_resume_args(args, saved, "c.pt")
    assert args.threads == 2 and args.compile is True


def test_default_out_differs_between_runs_started_in_the_same_second(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C.time, "strftime", lambda _: "20260101-120000")
    outs = []
    for pid in (4001, 4002):  # two processes, one clock reading
        monkeypatch.setattr(C.os, "getpid", lambda pid=pid: pid)
        outs.append(C.parse_args([]).out)
    assert outs[0] != outs[1] and all(o.startswith("runs/20260101-120000") for o in outs)
