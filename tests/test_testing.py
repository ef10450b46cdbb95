"""torch_mlp.testing can fail: deliberately wrong Functions are caught by check_function, with a
message naming the failed check and the size of the error; ``python -m torch_mlp.testing``
exits 0 on the shipped matrix and its ``main()`` returns 1 when a case is broken."""

from __future__ import annotations

import re
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


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _u():
    u = torch.randn(3, 4, dtype=torch.float64)
    return (u + 0.1 * u.sign()).requires_grad_()  # away from the kink


def _y():
    return torch.tensor([0, 2, 1, 1, 3])


BROKEN = {
    # id: (custom, reference, inputs, the check that must fail)
    "relu-grad-at-negative": (ReLUGradAtNegative.apply, TF.relu, lambda: (_u(),), "gradcheck"),
    "ce-missing-1/N": (CrossEntropyWithoutMean.apply, TF.cross_entropy,
                       lambda: (_x(5, 4), _y()), "gradcheck"),
    "linear-transposed-grad_weight": (LinearTransposedGradWeight.apply, TF.linear,
                                      lambda: (_x(2, 3), _x(3, 3)), "gradcheck"),
    "ce-detached-backward": (CrossEntropyDetachedBackward.apply, TF.cross_entropy,
                             lambda: (_x(5, 4), _y()), "gradgradcheck"),
    "linear-wrong-layout": (LinearWrongLayout.apply, TF.linear,
                            lambda: (_x(2, 3), _x(3, 3)), "parity"),
}
FAILED_CHECK_MESSAGE = {
    "gradcheck": r"gradcheck failed: max \|analytical − numerical\| = [0-9.e+-]+ "
    r"\(atol 1e-05, (fast_mode|exhaustive)\)",
    "gradgradcheck": r"gradgradcheck failed: max \|analytical − numerical\| = [0-9.e+-]+",
    "parity": r"parity with the reference failed in torch.float32 on output\[0\]: "
    r"max \|ours − reference\| = [0-9.e+-]+",
}


MODES = pytest.mark.parametrize("fast_mode", [True, False], ids=["fast", "exhaustive"])


@MODES
@pytest.mark.parametrize("name", list(BROKEN), ids=list(BROKEN))
def test_broken_function_raises_naming_the_failed_check(name, fast_mode):
    custom, reference, make, check = BROKEN[name]
    # Anchored on the label, so "gradcheck" cannot match inside "gradgradcheck".
    pattern = "^" + re.escape(name) + r" \(\w+\): " + FAILED_CHECK_MESSAGE[check]
    with pytest.raises(GradientCheckError, match=pattern):
        check_function(custom, reference, *make(), name=name, fast_mode=fast_mode)


@MODES
@pytest.mark.parametrize("name", list(BROKEN), ids=list(BROKEN))
def test_broken_function_without_raising_returns_its_failures(name, fast_mode):
    custom, reference, make, check = BROKEN[name]
    result = check_function(custom, reference, *make(), name=name, raise_on_failure=False,
                            fast_mode=fast_mode)
    assert isinstance(result, CheckResult)
    assert result.failures, "a broken Function passed every check"
    assert any(re.match(FAILED_CHECK_MESSAGE[check], msg) for msg in result.failures)
    assert result.max_err > 1e-3
    if check == "gradcheck":
        assert result.gradcheck_max_err > 1e-3
    if check == "gradgradcheck":
        assert result.gradcheck_max_err < 1e-6  # first order is right ...
        assert result.gradgradcheck_max_err > 1e-3  # ... second order is not
    if check == "parity":
        assert result.gradcheck_max_err < 1e-6
        assert result.parity_max_err["torch.float32"] > 1e-3


def test_relu_without_mask_error_size_is_reported():
    # At u < 0 the analytical Jacobian entry is 1 where finite differences give 0.
    result = check_function(ReLUGradAtNegative.apply, TF.relu, _u(), raise_on_failure=False,
                            fast_mode=False)
    assert result.gradcheck_max_err == pytest.approx(1.0, abs=1e-6)


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
    result = check_function(ComplexLinear.apply, _native_linear, _c(3, 4), _c(2, 4),
                            fast_mode=fast_mode)
    assert result.failures == []
    assert result.max_err < 1e-6
    assert set(result.parity_max_err) == {"torch.float32", "torch.float64"}


@MODES
def test_complex_function_missing_a_conjugate_is_caught(fast_mode):
    result = check_function(ComplexLinearMissingConj.apply, _native_linear, _c(3, 4), _c(2, 4),
                            fast_mode=fast_mode, raise_on_failure=False)
    assert result.failures[0].startswith("gradcheck failed")
    assert result.gradcheck_max_err > 1e-2
    # grad_weight is right: only grad_x (input 0) differs from native autograd.
    parity = [m for m in result.failures if m.startswith("parity")]
    assert len(parity) == 2 and all("on grad[0]" in m for m in parity)
    with pytest.raises(GradientCheckError, match="gradcheck failed"):
        check_function(ComplexLinearMissingConj.apply, _native_linear, _c(3, 4), _c(2, 4),
                       fast_mode=fast_mode)


def test_complex_inputs_are_cast_for_parity():
    seen = []

    def spy(x, weight):
        seen.append(x.dtype)
        return ComplexLinear.apply(x, weight)

    check_function(spy, _native_linear, _c(3, 4), _c(2, 4), gradgrad=False)
    assert torch.complex64 in seen and torch.complex128 in seen  # float32 / float64 parity


# --------------------------------------------------------------------------------------------
# cost
# --------------------------------------------------------------------------------------------
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

    result = check_function(counted, TF.linear, _x(64, 128), _x(64, 128), _x(64))
    assert result.failures == []
    assert 0 < calls < 200, calls
    assert result.gradcheck_max_err < 1e-6 and result.gradgradcheck_max_err < 1e-6


def test_exhaustive_jacobian_calls_fn_twice_per_input_entry_whatever_the_outputs():
    # One call to find the outputs, then one pair per input entry, read for all three outputs.
    from torch_mlp.testing import _jacobian_exhaustive

    calls = 0

    def three_outputs(x):
        nonlocal calls
        calls += 1
        return 2 * x, x.sin(), x.square()

    x = torch.randn(37, dtype=torch.float64, requires_grad=True)
    err, where = _jacobian_exhaustive(three_outputs, [x], ["x"], ["a", "b", "c"], atol=1e-5)
    assert calls == 1 + 2 * 37
    assert err < 1e-6 and where == []


def test_fast_mode_catches_one_wrong_entry_in_a_large_jacobian():
    # Only grad_bias[7] is wrong: a projection over 4 096 × 16 448 entries still sees it.
    class OneWrongBiasEntry(LinearWithBias):
        @staticmethod
        def backward(ctx, g):
            gx, gw, gb = LinearWithBias.backward(ctx, g)
            return gx, gw, gb + 0.5 * (torch.arange(gb.numel()) == 7)

    with pytest.raises(GradientCheckError, match="gradcheck failed"):
        check_function(OneWrongBiasEntry.apply, None, _x(64, 128), _x(64, 128), _x(64),
                       gradgrad=False)


def test_missing_one_over_n_also_fails_gradient_parity():
    # Same forward, gradient N times too large: parity flags the gradient, not the output.
    result = check_function(CrossEntropyWithoutMean.apply, TF.cross_entropy, _x(5, 4), _y(),
                            raise_on_failure=False)
    parity = [m for m in result.failures if m.startswith("parity")]
    assert len(parity) == 2  # float32 and float64
    assert all("on grad[0]" in m for m in parity)


def test_correct_function_passes_with_small_errors():
    result = check_function(F.relu, TF.relu, _u())
    assert result.failures == []
    assert result.name == "relu"  # the label defaults to the function's name
    assert result.max_err < 1e-6
    assert set(result.parity_max_err) == {"torch.float32", "torch.float64"}


def test_gradgrad_false_skips_double_backward():
    result = check_function(CrossEntropyDetachedBackward.apply, TF.cross_entropy, _x(5, 4), _y(),
                            gradgrad=False)
    assert result.failures == []
    assert result.gradgradcheck_max_err == 0.0


def test_reference_none_skips_parity():
    result = check_function(LinearWrongLayout.apply, None, _x(2, 3), _x(3, 3))
    assert result.failures == []
    assert result.parity_max_err == {}


def test_parity_tolerances_are_applied():
    def off(u):  # 1e-4 relative off the native op, with a consistent gradient
        return F.relu(u) * (1 + 1e-4)

    with pytest.raises(GradientCheckError, match=r"parity with the reference failed"):
        check_function(off, TF.relu, _u())
    loose = {torch.float32: (1e-3, 1e-3), torch.float64: (1e-3, 1e-3)}
    assert check_function(off, TF.relu, _u(), tolerances=loose).failures == []


def test_no_differentiable_input_is_refused():
    with pytest.raises(ValueError, match="no input requires grad"):
        check_function(F.relu, TF.relu, torch.randn(3, dtype=torch.float64))


def test_noncontiguous_inputs_are_checked():
    x = torch.randn(4, 3, dtype=torch.float64).t().requires_grad_()
    assert not x.is_contiguous()
    assert check_function(F.linear, TF.linear, x, _x(2, 4)).failures == []


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------
def test_main_returns_1_and_reports_a_broken_case(monkeypatch, capsys):
    good = ("relu-ok", F.relu, TF.relu, (_u(),))
    bad = ("relu-broken", ReLUGradAtNegative.apply, TF.relu, (_u(),))
    monkeypatch.setattr(testing, "function_cases", lambda seed=0: iter([good, bad]))
    assert testing.main([]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^relu-ok\s+pass", out, re.M)
    assert re.search(r"^relu-broken\s+FAIL", out, re.M)
    assert "gradcheck failed" in out
    assert "1/2 passed; 1 FAILED" in out


def test_main_returns_0_when_every_case_passes(monkeypatch, capsys):
    good = ("relu-ok", F.relu, TF.relu, (_u(),))
    monkeypatch.setattr(testing, "function_cases", lambda seed=0: iter([good]))
    assert testing.main([]) == 0
    assert "1/1 passed" in capsys.readouterr().out


def test_python_m_torch_mlp_testing_passes_the_whole_matrix():
    proc = subprocess.run(
        [sys.executable, "-m", "torch_mlp.testing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"^(\d+)/(\d+) passed$", proc.stdout, re.M)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 40, proc.stdout
    assert "FAIL" not in proc.stdout
    assert re.search(r"^case\s+result\s+gradcheck\s+gradgrad", proc.stdout, re.M)


def test_help_prints_usage_and_unknown_flags_exit_2():
    run = [sys.executable, "-m", "torch_mlp.testing"]
    proc = subprocess.run([*run, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m torch_mlp.testing")
    assert "-k PATTERN" in proc.stdout and "--list" in proc.stdout
    proc = subprocess.run([*run, "--bogus"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unrecognized arguments: --bogus" in proc.stderr and proc.stdout == ""


def test_list_prints_the_case_ids(capsys):
    assert testing.main(["--list"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids == [c[0] for c in testing.function_cases()]


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
# failure messages
# --------------------------------------------------------------------------------------------
def test_message_names_the_function_class_for_apply():
    with pytest.raises(GradientCheckError, match=r"^ReLUGradAtNegative: gradcheck failed"):
        check_function(ReLUGradAtNegative.apply, TF.relu, _u())


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


def test_gradcheck_message_quotes_the_entries_that_differ_most():
    u = torch.tensor([[0.5, -0.5], [-1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    with pytest.raises(GradientCheckError) as exc:
        check_function(ReLUGradAtNegative.apply, TF.relu, u, fast_mode=False)
    msg = str(exc.value)
    assert "Jacobian mismatch for output 0 with respect to input 0" in msg
    entries = re.findall(r"^    (d output\[0\]\[\d, \d\] / d input\[0\]\[\d, \d\]): "
                         r"analytical ([-0-9.e]+), numerical ([-0-9.e]+)$", msg, re.M)
    # The two negative entries, where the mask is missing: 1 against 0.
    assert sorted(e[0] for e in entries) == ["d output[0][0, 1] / d input[0][0, 1]",
                                             "d output[0][1, 0] / d input[0][1, 0]"]
    assert all(float(a) == 1 and abs(float(n)) < 1e-6 for _, a, n in entries)


def test_fast_mode_message_names_the_input_with_the_wrong_gradient():
    with pytest.raises(GradientCheckError) as exc:
        check_function(LinearTransposedGradWeight.apply, TF.linear, _x(2, 3), _x(3, 3))
    msg = str(exc.value)
    assert re.search(r"^    uᵀJv for input\[1\] along a random direction: analytical", msg, re.M)
    assert "input[0] along" not in msg  # grad_x is right
    assert msg.endswith("fast_mode=False gives the Jacobian entries")


def test_parity_message_says_where_the_greatest_difference_is():
    def off(u):  # one entry of the output off by 0.25, with a consistent gradient
        return F.relu(u) + 0.25 * (torch.arange(u.numel()).reshape(u.shape) == 5)

    with pytest.raises(GradientCheckError) as exc:
        check_function(off, TF.relu, _u())
    assert re.search(r"on output\[0\]: max \|ours − reference\| = 0\.25 .*at output\[0\]\[1, 1\]"
                     r": ours [-0-9.e]+, reference [-0-9.e]+; 1 / 12 entries differ",
                     str(exc.value)), str(exc.value)


class OnceDifferentiableSquare(_SavesInputs):
    @staticmethod
    def forward(u):
        return u * u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return 2 * u * g


@MODES
def test_once_differentiable_backward_gets_a_gradgrad_false_hint(fast_mode):
    with pytest.raises(GradientCheckError, match=r"^OnceDifferentiableSquare: gradgradcheck "
                       r"cannot run: the backward has no double backward "
                       r"\(a @once_differentiable backward.*pass gradgrad=False"):
        check_function(OnceDifferentiableSquare.apply, torch.square, _u(), fast_mode=fast_mode)
    assert check_function(OnceDifferentiableSquare.apply, torch.square, _u(),
                          gradgrad=False).failures == []


def test_failures_is_a_dataclass_field():
    import dataclasses

    assert "failures" in {f.name for f in dataclasses.fields(CheckResult)}
    assert CheckResult().failures == [] and CheckResult().failures is not CheckResult().failures


# --------------------------------------------------------------------------------------------
# outputs that do not line up, and argument misuse
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("custom, reference, ours, theirs", [
    (lambda u: (F.relu(u),), lambda u: (TF.relu(u), u * 100), "1 output", "2"),
    (lambda u: (F.relu(u), u * 2), lambda u: (TF.relu(u),), "2 outputs", "1"),
], ids=["reference-has-more", "custom-has-more"])
def test_a_different_number_of_outputs_fails_parity_once(custom, reference, ours, theirs):
    message = rf"parity with the reference failed: custom returns {ours}, the reference {theirs}"
    with pytest.raises(GradientCheckError, match=message):
        check_function(custom, reference, _u())
    result = check_function(custom, reference, _u(), raise_on_failure=False)
    assert len(result.failures) == 1 and re.search(message, result.failures[0])


def test_a_tensor_against_a_one_tuple_fails_parity():
    with pytest.raises(GradientCheckError, match=r"custom returns a tuple of 1 Tensor, the "
                       r"reference a Tensor"):
        check_function(lambda u: (F.relu(u),), TF.relu, _u())
    with pytest.raises(GradientCheckError, match=r"custom returns a Tensor, the reference a "
                       r"tuple of 1 Tensor"):
        check_function(F.relu, lambda u: (TF.relu(u),), _u())


@pytest.mark.parametrize("returned, said", [
    (lambda u: 1.0, r"custom returned a float \(1\.0\)"),
    (lambda u: None, r"custom returned None"),
    (lambda u: [u * 2], r"custom returned a list, not a tuple"),
    (lambda u: {"a": u * 2}, r"custom returned a dict"),
    (lambda u: (u * 2, 3), r"custom returned a tuple whose element 1 is an int \(3\)"),
    (lambda u: (), r"custom returned an empty tuple"),
], ids=["float", "None", "list", "dict", "tuple-with-int", "empty-tuple"])
def test_custom_returning_no_tensor_is_a_type_error(returned, said):
    with pytest.raises(TypeError, match=rf"^check_function: {said}.*expected a Tensor or a "
                       r"tuple of Tensors"):
        check_function(returned, TF.relu, _u(), raise_on_failure=False)


def test_reference_returning_no_tensor_is_a_type_error():
    with pytest.raises(TypeError, match=r"^check_function: reference returned a float \(1\.5\); "
                       r"expected a Tensor or a tuple of Tensors"):
        check_function(F.relu, lambda u: 1.5, _u())


def test_custom_with_only_integer_outputs_is_refused():
    with pytest.raises(ValueError, match=r"custom returns no floating-point or complex output "
                       r"\(dtypes: torch.int64\)"):
        check_function(lambda u: u.argmax(), None, _u(), raise_on_failure=False)


def test_a_detached_output_fails_gradcheck_without_crashing():
    result = check_function(lambda u: u.detach() * 2, lambda u: u * 2, _u(),
                            raise_on_failure=False)
    assert any(re.search(r"gradcheck failed: no output of custom requires grad", f)
               for f in result.failures), result.failures


@pytest.mark.parametrize("tolerances, error, said", [
    ({torch.float32: 1e-3}, TypeError,
     r"tolerances\[torch.float32\] must be an \(rtol, atol\) pair.*got 0.001"),
    ({torch.float32: (1e-3,)}, TypeError, r"tolerances\[torch.float32\] must be an \(rtol, atol"),
    ({torch.float32: ("a", 1e-3)}, TypeError, r"tolerances\[torch.float32\] must be an \(rtol"),
    ({torch.float32: (-1e-3, 1e-3)}, ValueError,
     r"tolerances\[torch.float32\] must be non-negative.*got \(-0.001, 0.001\)"),
    ({"float32": (1e-3, 1e-3)}, TypeError, r"tolerances' keys must be torch.dtype, got 'float32'"),
    ([1e-3, 1e-3], TypeError, r"tolerances must be a dict \{dtype: \(rtol, atol\)\}, got list"),
], ids=["bare-float", "1-tuple", "str", "negative", "str-key", "list"])
def test_tolerances_in_the_wrong_form_are_refused(tolerances, error, said):
    with pytest.raises(error, match=rf"^check_function: {said}"):
        check_function(F.relu, TF.relu, _u(), tolerances=tolerances)


@pytest.mark.parametrize("kwargs, error, said", [
    ({"parity_dtypes": torch.float32}, TypeError,
     r"parity_dtypes must be a sequence of torch.dtype, got torch.float32; pass "
     r"\(torch.float32,\)"),
    ({"parity_dtypes": ("float32",)}, TypeError, r"parity_dtypes must be a sequence of torch"),
    ({"parity_dtypes": (torch.int64,), "tolerances": {torch.int64: (0, 0)}}, ValueError,
     r"parity_dtypes must be real floating-point dtypes, got torch.int64"),
    ({"fd_atol": "a"}, TypeError, r"fd_atol must be a number, got str"),
    ({"fd_atol": -1.0}, ValueError, r"fd_atol must be finite and non-negative, got -1.0"),
    ({"seed": "a"}, TypeError, r"seed must be an int, got str"),
    ({"seed": 2**64}, ValueError,
     r"seed must be in \[-2\*\*63, 2\*\*64 - 1\], got 18446744073709551616"),
    ({"fast_mode": "yes"}, TypeError, r"fast_mode must be a bool, got str"),
    ({"gradgrad": None}, TypeError, r"gradgrad must be a bool, got NoneType"),
    ({"raise_on_failure": 0}, TypeError, r"raise_on_failure must be a bool, got int"),
    ({"name": 3}, TypeError, r"name must be a str, got int"),
], ids=["single-dtype", "str-dtype", "int-dtype", "fd_atol-str", "fd_atol-negative",
        "seed-str", "seed-too-big", "fast_mode-str", "gradgrad-None", "raise_on_failure-int",
        "name-int"])
def test_argument_misuse_is_refused_naming_the_argument(kwargs, error, said):
    with pytest.raises(error, match=rf"^check_function: {said}"):
        check_function(F.relu, TF.relu, _u(), **kwargs)


def test_non_callables_are_refused():
    with pytest.raises(TypeError, match=r"^check_function: custom must be callable, got int"):
        check_function(3, TF.relu, _u())
    with pytest.raises(TypeError, match=r"^check_function: reference must be callable or None, "
                       r"got str"):
        check_function(F.relu, "relu", _u())


def test_tensors_inside_a_list_get_a_hint():
    with pytest.raises(ValueError, match=r"no input requires grad.*input\[0\] is a list holding "
                       r"tensors that require grad; pass them as separate arguments"):
        check_function(lambda ws: F.l2_penalty(ws, 0.1), None, [_x(2, 3), _x(3)])


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", "1.5"])
def test_seed_out_of_range_is_a_usage_error(seed, capsys):
    with pytest.raises(SystemExit) as exc:
        testing.main(["--list", "--seed", seed])
    assert exc.value.code == 2
    assert re.search(r"argument --seed: .*(0 to 2\*\*64 - 1|integer)", capsys.readouterr().err)


def test_the_largest_seed_is_accepted(capsys):
    assert testing.main(["--list", "--seed", str(2**64 - 1)]) == 0
    assert capsys.readouterr().out.split() == [c[0] for c in testing.function_cases()]
