"""Real tiny models and data for the tuner tests: an MLP and a CNN trained on sklearn digits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuner.onnx_tools import export_onnx


@dataclass(frozen=True)
class Digits:
    """Digits split into train / calibration / holdout, pixels scaled to [0, 1]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray


def load_digits_split(seed: int = 0) -> Digits:
    """Return a shuffled split of sklearn's bundled digits (no download)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x = (data.data[order] / 16.0).astype(np.float32)
    y = data.target[order].astype(np.int64)
    return Digits(x[:1200], y[:1200], x[1200:1328], x[1328:1584], y[1328:1584])


class MLP(torch.nn.Module):
    """64 -> 32 -> 10 classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(64, 32)
        self.out = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


class CNN(torch.nn.Module):
    """Two small convolutions on 8x8 digits, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


def train(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 30
) -> torch.nn.Module:
    """Train with Adam for a few full-batch epochs (well under a second here)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine train several times slower
    try:
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(epochs):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt), yt).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def trained_mlp(digits: Digits) -> MLP:
    """Return an MLP trained on the digits training split."""
    torch.manual_seed(0)
    model = train(MLP(), digits.x_train, digits.y_train, epochs=60)
    assert isinstance(model, MLP)
    return model


def trained_cnn(digits: Digits) -> CNN:
    """Return a CNN trained on the digits training split (images 1x8x8)."""
    torch.manual_seed(0)
    model = train(CNN(), digits.x_train.reshape(-1, 1, 8, 8), digits.y_train, epochs=25)
    assert isinstance(model, CNN)
    return model


def export(model: torch.nn.Module, sample: np.ndarray, path: Path) -> Path:
    """Export ``model`` with input ``input`` and output ``logits``, dynamic batch."""
    return export_onnx(model, {"input": sample[:2]}, path, output_names=["logits"])


def outlier_calibration(x: np.ndarray) -> np.ndarray:
    """Return calibration rows where one pixel is huge, which ruins static MinMax scales."""
    bad = x.copy()
    bad[:, 0] = 1000.0
    return bad


def dead_branch(mlp_onnx: Path, out: Path, width: int = 4096) -> Path:
    """The MLP plus a wide branch multiplied by zero: the same answers, many more FLOPs.

    A champion built like this is faithful to the MLP and certainly slower than anything
    rebuilt from the MLP; as a source, everything rebuilt from it is slower than the MLP.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(mlp_onnx))
    graph = model.graph
    x, y = graph.input[0].name, graph.output[0].name
    rng = np.random.default_rng(0)
    a = numpy_helper.from_array(rng.normal(size=(64, width)).astype(np.float32), "dead_a")
    b = numpy_helper.from_array(rng.normal(size=(width, 10)).astype(np.float32), "dead_b")
    zero = numpy_helper.from_array(np.zeros((1,), np.float32), "dead_zero")
    graph.initializer.extend([a, b, zero])
    for node in graph.node:
        node.output[:] = [o if o != y else "live_out" for o in node.output]
    graph.node.extend([
        helper.make_node("MatMul", [x, "dead_a"], ["dead_h"], "dead_mm1"),
        helper.make_node("Relu", ["dead_h"], ["dead_r"], "dead_relu"),
        helper.make_node("MatMul", ["dead_r", "dead_b"], ["dead_o"], "dead_mm2"),
        helper.make_node("Mul", ["dead_o", "dead_zero"], ["dead_z"], "dead_mul"),
        helper.make_node("Add", ["live_out", "dead_z"], [y], "dead_add"),
    ])  # fmt: skip
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out
