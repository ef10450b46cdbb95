"""torch_mlp.testing can fail: each check of check_function catches a bug planted for it, with a
message naming the Function, the check and the input; fast_mode=False refuses what it cannot
hold; ``python -m torch_mlp.testing`` passes the shipped matrix and exits 1 on a broken case."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import Function

import torch_mlp.testing as testing
from torch_mlp import functional as F
from torch_mlp.testing import CheckResult, GradientCheckError, check_function

ROOT = Path(__file__).resolve().parents[1]
ALL_CHECKS = ["gradcheck", "gradgradcheck", "parity float32", "parity float64"]
PARITY = {"parity float32", "parity float64"}


@pytest.fixture(autouse=True)
def _seed():
    # check_function's default seed too: its upstream gradients must still differ from inputs.
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------
# deliberately wrong Functions
# --------------------------------------------------------------------------------------------
class ReLUGradAtNegative(Function):
    """ReLU whose backward forgets the mask: it passes g through at u < 0 as well."""

    @staticmethod
    def forward(u):
        return u.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g.clone()


class _SavesInputs(Function):
    """Saves every input for the backward; subclasses give forward and backward."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)


class _LinearNoBias(_SavesInputs):
    """x · weightᵀ, real or complex; the subclasses below get its backward right or wrong."""

    @staticmethod
    def forward(x, weight):
        return x @ weight.t()


class _MeanCrossEntropy(_SavesInputs):
    """Mean softmax-CE's forward; the subclasses below get its backward wrong, each its way."""

    @staticmethod
    def forward(z, y):
        logp = z - z.logsumexp(-1, keepdim=True)
        return -logp.gather(1, y.unsqueeze(1)).mean()


class CrossEntropyWithoutMean(_MeanCrossEntropy):
    """Mean softmax-CE whose backward drops the 1/N: (p − onehot(y)) · g instead of ... / N."""

    @staticmethod
    def backward(ctx, g):
        z, y = ctx.saved_tensors
        dz = torch.softmax(z, -1) - TF.one_hot(y, z.shape[-1]).to(z.dtype)
        return g * dz, None  # missing / N


class CrossEntropyDetachedBackward(_MeanCrossEntropy):
    """Mean softmax-CE with the right first derivative, computed from a detached softmax: the
    backward is not differentiable in z, so double backward is wrong."""

    @staticmethod
    def backward(ctx, g):
        z, y = ctx.saved_tensors
        p = torch.softmax(z.detach(), -1)  # cuts double backward
        return g * (p - TF.one_hot(y, z.shape[-1]).to(z.dtype)) / z.shape[0], None


class LinearTransposedGradWeight(_LinearNoBias):
    """x · weightᵀ whose grad_weight is xᵀ · g, the transpose of the right gᵀ · x (same shape
    for a square weight, so only the values betray it)."""

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        return g @ weight, x.t() @ g  # should be g.t() @ x


class LinearWrongLayout(_SavesInputs):
    """x · weight (the derivation's W taken as nn.Linear's weight, not its transpose), with a
    backward that is right for that formula: gradcheck passes, parity with F.linear does not."""

    @staticmethod
    def forward(x, weight):
        return x @ weight

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        return g @ weight.t(), x.t() @ g


def _check(*args, **kwargs):
    """check_function without forward mode: the Functions planted here have no jvp (forward mode
    has its own tests below)."""
    return check_function(*args, forward_ad=False, **kwargs)


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _u():
    u = torch.randn(3, 4, dtype=torch.float64)
    return (u + 0.1 * u.sign()).requires_grad_()  # away from the kink


def _y():
    return torch.tensor([0, 2, 1, 1, 3])


BROKEN = {
    # id: (custom, reference, inputs, the checks that must fail and no other)
    "relu-grad-at-negative": (ReLUGradAtNegative.apply, TF.relu, lambda: (_u(),),
                              {"gradcheck", *PARITY}),
    "ce-missing-1/N": (CrossEntropyWithoutMean.apply, TF.cross_entropy,
                       lambda: (_x(5, 4), _y()), {"gradcheck", *PARITY}),
    "linear-transposed-grad_weight": (LinearTransposedGradWeight.apply, TF.linear,
                                      lambda: (_x(2, 3), _x(3, 3)), {"gradcheck", *PARITY}),
    "ce-detached-backward": (CrossEntropyDetachedBackward.apply, TF.cross_entropy,
                             lambda: (_x(5, 4), _y()), {"gradgradcheck"}),
    "linear-wrong-layout": (LinearWrongLayout.apply, TF.linear,
                            lambda: (_x(2, 3), _x(3, 3)), PARITY),
}
MODES = pytest.mark.parametrize("fast_mode", [True, False], ids=["fast", "exhaustive"])


def _failed(result: CheckResult) -> set[str]:
    return {message.split(" failed")[0] for message in result.failures}


@MODES
@pytest.mark.parametrize("name", list(BROKEN), ids=list(BROKEN))
def test_each_check_catches_the_bug_planted_for_it(name, fast_mode):
    custom, reference, make, caught_by = BROKEN[name]
    result = _check(custom, reference, *make(), name=name, fast_mode=fast_mode,
                    raise_on_failure=False)
    assert result.checks == ALL_CHECKS
    assert _failed(result) == caught_by
    first = sorted(caught_by, key=ALL_CHECKS.index)[0]
    # Anchored on the label, so "gradcheck" cannot match inside "gradgradcheck".
    pattern = "^" + re.escape(name) + rf" \(\w+\): {first} failed on "
    with pytest.raises(GradientCheckError, match=pattern):
        _check(custom, reference, *make(), name=name, fast_mode=fast_mode)


def test_gradcheck_message_names_the_function_the_input_and_gives_torchs_report():
    with pytest.raises(GradientCheckError) as exc:
        check_function(ReLUGradAtNegative.apply, TF.relu, _u(), fast_mode=False)
    msg = str(exc.value)
    assert msg.startswith("ReLUGradAtNegative: gradcheck failed on input[0]: Jacobian mismatch "
                          "for output 0 with respect to input 0")
    assert "numerical:tensor(" in msg and "analytical:tensor(" in msg


def test_the_input_is_named_by_its_position_among_all_arguments():
    # torch counts only the inputs that require grad: its "input 0" here is the weight.
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(GradientCheckError, match=r"gradcheck failed on input\[1\]: Jacobian "
                       r"mismatch for output 0 with respect to input 0"):
        check_function(LinearTransposedGradWeight.apply, None, x, _x(3, 3))


def test_fast_mode_message_gives_the_largest_entry_error():
    with pytest.raises(GradientCheckError, match=r"(?s)gradcheck failed on input\[1\].*"
                       r"The max per-element difference \(slow mode\) is"):
        check_function(LinearTransposedGradWeight.apply, TF.linear, _x(2, 3), _x(3, 3))


def test_missing_one_over_n_fails_gradient_parity_not_output_parity():
    result = check_function(CrossEntropyWithoutMean.apply, TF.cross_entropy, _x(5, 4), _y(),
                            raise_on_failure=False)
    parity = [m for m in result.failures if m.startswith("parity")]
    assert [m.split(":")[0] for m in parity] == [
        "parity float32 failed on the gradient of input[0]",
        "parity float64 failed on the gradient of input[0]"]
    assert "Tensor-likes are not close!" in parity[0]  # assert_close's own report
    assert result.parity_max_err["torch.float64"] > 0.1


def test_parity_with_a_correct_but_different_reference_names_the_output():
    with pytest.raises(GradientCheckError, match=r"^LinearWrongLayout: parity float32 failed on "
                       r"output\[0\]: Tensor-likes are not close!"):
        _check(LinearWrongLayout.apply, TF.linear, _x(2, 3), _x(3, 3))


class OnceDifferentiableSquare(_SavesInputs):
    @staticmethod
    def forward(u):
        return u * u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return 2 * u * g


def test_once_differentiable_backward_gets_a_gradgrad_false_hint():
    with pytest.raises(GradientCheckError, match=r"(?s)^OnceDifferentiableSquare: gradgradcheck "
                       r"failed.*if the backward is @once_differentiable, it has no second "
                       r"derivative to check: pass gradgrad=False"):
        _check(OnceDifferentiableSquare.apply, torch.square, _u())
    result = _check(OnceDifferentiableSquare.apply, torch.square, _u(), gradgrad=False)
    assert result.failures == [] and "gradgradcheck" not in result.checks


# --------------------------------------------------------------------------------------------
# fast mode and exhaustive mode
# --------------------------------------------------------------------------------------------
class RowOff(Function):
    """y = 3x whose backward is 10% too large in the first row of x only."""

    @staticmethod
    def forward(x):
        return 3 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        scale = torch.ones(g.shape[0], 1, dtype=g.dtype)
        scale[0] = 1.1
        return 3 * g * scale


def test_fast_mode_passes_a_10_percent_error_in_one_row_that_exhaustive_mode_catches():
    x = _x(100, 4)  # the error is 4 of 400 Jacobian rows, diluted in fast mode's projection
    assert _check(RowOff.apply, None, x, gradgrad=False).failures == []
    with pytest.raises(GradientCheckError, match=r"gradcheck failed on input\[0\]"):
        _check(RowOff.apply, None, x, gradgrad=False, fast_mode=False)
    # With a reference, parity catches it in fast mode too.
    result = _check(RowOff.apply, lambda x: 3 * x, x, raise_on_failure=False)
    assert _failed(result) == PARITY


def test_exhaustive_mode_refuses_a_jacobian_it_cannot_hold_before_any_work(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("torch's check ran")

    monkeypatch.setattr(torch.autograd, "gradcheck", never)
    monkeypatch.setattr(torch.autograd, "gradgradcheck", never)
    x, w, b = _x(256, 512), _x(256, 512), _x(256)
    # 262,400 input entries; 65,536 output entries; gradgradcheck adds the grad_outputs.
    with pytest.raises(MemoryError, match=r"^fast_mode=False would need ~[\d,.]+ GiB for the "
                       r"Jacobians of gradgradcheck \(327,936 × 262,400 entries.*use "
                       r"fast_mode=True"):
        check_function(F.linear, TF.linear, x, w, b, fast_mode=False)
    with pytest.raises(MemoryError, match=r"gradcheck \(262,400 × 65,536 entries"):
        check_function(F.linear, TF.linear, x, w, b, fast_mode=False, gradgrad=False)


class LinearWithBias(Function):
    """x · weightᵀ + bias, written out (the backward is the textbook one)."""

    @staticmethod
    def forward(x, weight, bias):
        return x @ weight.t() + bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        return g @ weight, g.t() @ x, g.sum(0)


def test_fast_mode_cost_does_not_grow_with_the_input_size():
    # A (64, 128) Linear has 16 448 input and 4 096 output entries: a whole Jacobian takes
    # tens of thousands of calls, the default random projections a few dozen.
    calls = 0

    def counted(*args):
        nonlocal calls
        calls += 1
        return LinearWithBias.apply(*args)

    result = _check(counted, TF.linear, _x(64, 128), _x(64, 128), _x(64))
    assert result.failures == []
    assert 0 < calls < 200, calls


def test_fast_mode_catches_one_wrong_bias_entry():
    class OneWrongBiasEntry(LinearWithBias):
        @staticmethod
        def backward(ctx, g):
            gx, gw, gb = LinearWithBias.backward(ctx, g)
            return gx, gw, gb + 0.5 * (torch.arange(gb.numel()) == 7)

    with pytest.raises(GradientCheckError, match=r"gradcheck failed on input\[2\]"):
        check_function(OneWrongBiasEntry.apply, None, _x(16, 32), _x(16, 32), _x(16),
                       gradgrad=False)


# --------------------------------------------------------------------------------------------
# complex Functions
# --------------------------------------------------------------------------------------------
class ComplexLinear(_LinearNoBias):
    """x · weightᵀ for complex tensors; the backward conjugates what it multiplies by."""

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        return g @ weight.conj(), g.t() @ x.conj()


class ComplexLinearMissingConj(ComplexLinear):
    """The real-valued formula applied to complex tensors: grad_x = g · W without the conjugate."""

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        return g @ weight, g.t() @ x.conj()


def _c(*shape):
    return torch.randn(*shape, dtype=torch.complex128, requires_grad=True)


def _native_linear(x, weight):
    return x @ weight.t()


@MODES
def test_complex_function_with_conjugates_passes(fast_mode):
    result = _check(ComplexLinear.apply, _native_linear, _c(3, 4), _c(2, 4),
                    fast_mode=fast_mode)
    assert result.failures == [] and result.checks == ALL_CHECKS
    assert result.max_err < 1e-5


@MODES
def test_complex_function_missing_a_conjugate_is_caught(fast_mode):
    result = check_function(ComplexLinearMissingConj.apply, _native_linear, _c(3, 4), _c(2, 4),
                            fast_mode=fast_mode, raise_on_failure=False)
    assert result.failures[0].startswith("gradcheck failed on input[0]")
    # grad_weight is right: only grad_x (input 0) differs from native autograd.
    parity = [m for m in result.failures if m.startswith("parity")]
    assert len(parity) == 2 and all("on the gradient of input[0]:" in m for m in parity)


def test_complex_inputs_are_cast_for_parity():
    seen = []

    def spy(x, weight):
        seen.append(x.dtype)
        return ComplexLinear.apply(x, weight)

    _check(spy, _native_linear, _c(3, 4), _c(2, 4), gradgrad=False)
    assert torch.complex64 in seen and torch.complex128 in seen  # float32 / float64 parity


# --------------------------------------------------------------------------------------------
# options and results
# --------------------------------------------------------------------------------------------
def test_correct_function_passes_every_check():
    result = check_function(F.relu, TF.relu, _u())
    assert result.failures == []
    assert result.name == "relu"  # the label defaults to the function's name
    assert result.checks == ALL_CHECKS
    assert set(result.parity_max_err) == {"torch.float32", "torch.float64"}
    assert result.max_err < 1e-6


def test_gradgrad_false_skips_double_backward():
    result = _check(CrossEntropyDetachedBackward.apply, TF.cross_entropy, _x(5, 4), _y(),
                    gradgrad=False)
    assert result.failures == []
    assert result.checks == ["gradcheck", "parity float32", "parity float64"]


def test_reference_none_skips_parity():
    result = _check(LinearWrongLayout.apply, None, _x(2, 3), _x(3, 3))
    assert result.failures == [] and result.checks == ["gradcheck", "gradgradcheck"]
    assert result.parity_max_err == {}


def test_parity_tolerances_are_applied():
    def off(u):  # 1e-4 relative off the native op, with a consistent gradient
        return F.relu(u) * (1 + 1e-4)

    with pytest.raises(GradientCheckError, match=r"parity float32 failed on output\[0\]"):
        check_function(off, TF.relu, _u())
    loose = {torch.float32: (1e-3, 1e-3), torch.float64: (1e-3, 1e-3)}
    assert check_function(off, TF.relu, _u(), tolerances=loose).failures == []


def test_parity_max_err_is_the_largest_difference():
    def off(u):  # one entry of the output off by 0.25, with a consistent gradient
        return F.relu(u) + 0.25 * (torch.arange(u.numel()).reshape(u.shape) == 5)

    result = check_function(off, TF.relu, _u(), raise_on_failure=False)
    assert result.parity_max_err["torch.float64"] == pytest.approx(0.25)
    assert "Mismatched elements: 1 / 12" in result.failures[0]


def test_a_different_number_of_outputs_fails_parity():
    result = check_function(lambda u: (F.relu(u), u * 2), lambda u: (TF.relu(u),), _u(),
                            raise_on_failure=False)
    assert result.failures == [f"parity {d} failed on the outputs: custom's shapes [(3, 4), "
                               "(3, 4)], the reference's [(3, 4)]" for d in ("float32", "float64")]


def test_an_output_of_another_shape_fails_parity_naming_the_shapes():
    with pytest.raises(GradientCheckError, match=r"^linear: parity float32 failed on the outputs: "
                       r"custom's shapes \[\(3, 2\)\], the reference's \[\(2, 3\)\]"):
        check_function(F.linear, lambda x, w: TF.linear(x, w).t(), _x(3, 4), _x(2, 4))
    # The same reference, transposed back, passes: only the shape was wrong.
    assert check_function(F.linear, lambda x, w: TF.linear(x, w).t().t(), _x(3, 4),
                          _x(2, 4)).failures == []


@pytest.mark.parametrize("bad", [lambda u: u.detach().sum().item(), lambda u: [u * 2],
                                 lambda u: {"out": u * 2}, lambda u: (u * 2, None)],
                         ids=["float", "list", "dict", "tuple-with-None"])
def test_an_output_that_is_not_a_tensor_is_refused_naming_who_returned_it(bad):
    kind = type(bad(torch.ones(1))).__name__
    with pytest.raises(TypeError, match=rf"^custom .*<lambda> \(test_testing.py:\d+\) returned "
                       rf"a {kind}: check_function needs a Tensor or a tuple of Tensors$"):
        check_function(bad, TF.relu, _u())
    with pytest.raises(TypeError, match=rf"^reference .*<lambda> .* returned a {kind}:"):
        check_function(F.relu, bad, _u())


def test_tensors_in_a_list_input_are_refused_with_the_way_to_pass_them():
    x, w = _x(3, 4), _x(2, 3)

    def ref(a, b):
        return 0.05 * (a.square().sum() + b.square().sum())

    with pytest.raises(TypeError, match=r"^input\[0\] is a list of tensors: pass them as "
                       r"separate inputs, e\.g\. `lambda a, b: l2_penalty\(\[a, b\], 0\.1\)`"):
        check_function(lambda ws: F.l2_penalty(ws, 0.1), lambda ws: ref(*ws), [x, w])
    with pytest.raises(TypeError, match=r"^input\[1\] is a tuple of tensors"):
        check_function(lambda a, ws: a.sum() + ws[0].sum(), None, x, (w,))
    result = check_function(lambda a, b: F.l2_penalty([a, b], 0.1), ref, x, w)
    assert result.failures == [] and result.checks == ALL_CHECKS
    # A list of plain values is an ordinary argument.
    assert check_function(lambda u, dims: u.sum(dims), None, _u(), [0, 1]).failures == []


def test_a_meta_tensor_input_is_refused():
    u = torch.randn(3, 4, dtype=torch.float64, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match=r"^input\[0\] is a meta tensor: gradcheck needs values$"):
        check_function(F.relu, TF.relu, u)


def test_half_precision_parity_takes_assert_closes_defaults_for_the_dtype():
    result = check_function(F.linear, TF.linear, _x(3, 4), _x(2, 4),
                            parity_dtypes=(torch.bfloat16, torch.float16))
    assert result.failures == [] and result.checks[2:] == ["parity bfloat16", "parity float16"]

    def off(u):  # 1% off the native op, with a consistent gradient
        return F.relu(u) * 1.01

    # bfloat16's default rtol (1.6e-2) lets 1% through; float32's (1.3e-6) does not.
    assert check_function(off, TF.relu, _u(), parity_dtypes=(torch.bfloat16,)).failures == []
    with pytest.raises(GradientCheckError, match=r"parity float32 failed on output\[0\]"):
        check_function(off, TF.relu, _u(), parity_dtypes=(torch.float32,))
    with pytest.raises(GradientCheckError, match=r"parity bfloat16 failed on output\[0\]"):
        check_function(lambda u: F.relu(u) * 1.05, TF.relu, _u(), parity_dtypes=(torch.bfloat16,))


def test_a_detached_output_fails_gradcheck():
    result = check_function(lambda u: u.detach() * 2, lambda u: u * 2, _u(),
                            raise_on_failure=False)
    assert _failed(result) == {"gradcheck"}
    assert "Numerical gradient for function expected to be zero" in result.failures[0]


def test_no_differentiable_input_is_refused():
    with pytest.raises(ValueError, match="at least one input tensor to require gradient"):
        check_function(F.relu, TF.relu, torch.randn(3, dtype=torch.float64))


def test_noncontiguous_inputs_are_checked():
    x = torch.randn(4, 3, dtype=torch.float64).t().requires_grad_()
    assert not x.is_contiguous()
    assert check_function(F.linear, TF.linear, x, _x(2, 4)).failures == []


def test_message_names_a_lambda_and_where_it_was_defined():
    line = sys._getframe().f_lineno + 1
    fn = lambda u: ReLUGradAtNegative.apply(u)  # noqa: E731
    pattern = rf"^test_message_names.*<lambda> \(test_testing.py:{line}\): gradcheck failed"
    with pytest.raises(GradientCheckError, match=pattern):
        check_function(fn, TF.relu, _u())


def test_message_names_a_plain_function_by_its_qualified_name():
    def wrong_relu(u):
        return ReLUGradAtNegative.apply(u)

    with pytest.raises(GradientCheckError) as exc:
        check_function(wrong_relu, TF.relu, _u())
    assert str(exc.value).startswith(f"{wrong_relu.__qualname__}: gradcheck failed")
    assert "<locals>.wrong_relu" in str(exc.value)


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------
def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "torch_mlp.testing", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_python_m_torch_mlp_testing_passes_the_whole_matrix():
    proc = _cli()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"^(\d+)/(\d+) passed$", proc.stdout, re.M)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 40, proc.stdout
    assert "FAIL" not in proc.stdout and "linear_relu" not in proc.stdout
    assert re.search(r"^case\s+result\s+fp32 parity\s+fp64 parity$", proc.stdout, re.M)


def test_main_returns_1_and_reports_a_broken_case(monkeypatch, capsys):
    good = ("relu-ok", F.relu, TF.relu, (_u(),))
    bad = ("relu-broken", ReLUGradAtNegative.apply, TF.relu, (_u(),))
    monkeypatch.setattr(testing, "function_cases", lambda: iter([good, bad]))
    assert testing.main([]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^relu-ok\s+pass", out, re.M)
    assert re.search(r"^relu-broken\s+FAIL", out, re.M)
    assert re.search(r"^    gradcheck failed on input\[0\]", out, re.M)
    assert "1/2 passed; 1 FAILED" in out


def test_help_prints_usage_and_unknown_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        testing.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: python -m torch_mlp.testing")
    assert "-k PATTERN" in out and "--list" in out and "--exhaustive" in out
    with pytest.raises(SystemExit) as exc:
        testing.main(["--bogus"])
    captured = capsys.readouterr()
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in captured.err and captured.out == ""


def test_list_prints_the_case_ids(capsys):
    assert testing.main(["--list"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids == [c[0] for c in testing.function_cases()]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("args", [["--list"], ["-k", "relu"]], ids=["list", "run"])
def test_a_closed_pipe_ends_the_run_quietly_by_sigpipe(args):
    # `| head -1` whose head is gone before anything is written: killed by SIGPIPE, as `yes`
    # is (141 in the shell), neither a traceback nor the exit status 1 of a failed check.
    proc = subprocess.Popen([sys.executable, "-m", "torch_mlp.testing", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert err == b"" and proc.returncode == -signal.SIGPIPE, (proc.returncode, err.decode())


def test_a_failing_case_exits_1_from_the_command_line():
    # The shipped relu swapped for abs before the module runs: parity with TF.relu fails.
    code = ("import runpy, torch_mlp.functional as F; F.relu = lambda u, inplace=False: u.abs(); "
            "runpy.run_module('torch_mlp.testing', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, "-k", "relu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"^relu\s+FAIL", proc.stdout, re.M) and "0/1 passed; 1 FAILED" in proc.stdout


def test_k_runs_only_the_matching_cases(capsys):
    assert testing.main(["-k", "LINEAR-X4-", "--exhaustive"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^(\S+)\s+pass\s", out, re.M) == ["linear-x4-bias", "linear-x4-nobias"]
    assert "2/2 passed" in out


def test_k_matching_nothing_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        testing.main(["-k", "no-such-case"])
    assert exc.value.code == 2
    assert "no case id contains 'no-such-case'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# forward mode: the Function's jvp
# --------------------------------------------------------------------------------------------
@MODES
def test_a_wrong_jvp_fails_gradcheck_in_forward_mode(fast_mode, monkeypatch):
    from torch_mlp.functions import ReLUFunction

    monkeypatch.setattr(ReLUFunction, "jvp", staticmethod(lambda ctx, u_t: 2 * u_t))
    result = check_function(F.relu, TF.relu, _u(), fast_mode=fast_mode, raise_on_failure=False)
    assert _failed(result) == {"gradcheck"}  # the backward, double backward and parity are right
    assert "forward mode" in result.failures[0] and "on input[0]" in result.failures[0]
    assert check_function(F.relu, TF.relu, _u(), fast_mode=fast_mode,
                          forward_ad=False).failures == []


class SquareWithoutJvp(_SavesInputs):
    """x², backward right, no jvp: forward mode cannot run."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_a_function_without_jvp_is_told_to_pass_forward_ad_false():
    with pytest.raises(GradientCheckError, match=r"^SquareWithoutJvp: gradcheck failed in "
                       r"forward mode: .*jvp.* \(or pass forward_ad=False\)"):
        check_function(SquareWithoutJvp.apply, torch.square, _u())
    assert check_function(SquareWithoutJvp.apply, torch.square, _u(),
                          forward_ad=False).failures == []
