"""ONNX: both exporters, as docs/compatibility.md writes them; onnxruntime gives torch's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # dynamo=False


def _ops(path: Path) -> list[str]:
    onnx = pytest.importorskip("onnx")
    return [node.op_type for node in onnx.load(path).graph.node]


@pytest.mark.parametrize("path", ["mlp.onnx", "mlp_legacy.onnx"], ids=["dynamo", "legacy"])
def test_onnx_recipe_both_exporters_run_in_onnxruntime(run_recipe, tmp_path: Path,
                                                        path: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    ns = run_recipe("ONNX")
    ops = _ops(tmp_path / path)
    assert ops.count("Relu") == 1 and ops.count("Gemm") == 2, ops
    session = ort.InferenceSession(str(tmp_path / path), providers=["CPUExecutionProvider"])
    for n in (1, 33):
        x = torch.randn(n, 784)
        (logits,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), ns["model"](x).detach())


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_the_relu_check_sees_a_clip(tmp_path: Path, dynamo: bool) -> None:
    # The Relu check can fail: a max(0, u) written as clamp_min exports as Clip.
    pytest.importorskip("onnxscript")

    class ClampReLU(torch.nn.Module):
        def forward(self, u: torch.Tensor) -> torch.Tensor:
            return u.clamp_min(0)

    torch.onnx.export(ClampReLU(), (torch.randn(3, 4),), tmp_path / "clamp.onnx", dynamo=dynamo)
    ops = _ops(tmp_path / "clamp.onnx")
    assert "Clip" in ops and "Relu" not in ops
