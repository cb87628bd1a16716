"""Samples a user can trust and use: copied when sampled, numbers kept as numbers, raw rows
kept for real-sized inputs within a per-version byte budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from monitor import Monitor, schema, storage

HW = 224


def _samples(mon: Monitor, model: str) -> list[storage.SampleRow]:
    assert mon.flush()
    return storage.read_samples(mon.db, model, with_raw=True)


def test_a_buffer_reused_after_the_call_leaves_the_stored_sample_intact(sqlite_url: str) -> None:
    inputs = np.arange(4 * 100, dtype=np.float32).reshape(4, 100)  # 100 columns: a tensor
    out = np.zeros((4, 3), dtype=np.float32)

    def model(x: np.ndarray) -> np.ndarray:  # writes into a preallocated output, like servers do
        out[:] = 0.0
        out[np.arange(4), np.arange(4) % 3] = 1.0
        return out

    with Monitor(sqlite_url, sample_rate=1.0) as mon:
        mon.wrap(model, name="reuse")(inputs)
        expected_raw = inputs.copy()
        inputs[:] = -999.0  # the caller reuses both buffers for the next request
        out[:] = -999.0
        rows = _samples(mon, "reuse")
    assert len(rows) == 4
    for i, row in enumerate(rows):
        assert row.raw is not None
        np.testing.assert_array_equal(row.raw["arg0"], expected_raw[i])
        assert row.features["min"] == 100.0 * i and row.features["max"] == 100.0 * i + 99
        probs = [1.0 if c == i % 3 else 0.0 for c in range(3)]
        assert row.outputs == {"top_class": i % 3, "confidence": 1.0, "probs": probs}


def test_a_reused_tabular_buffer_keeps_what_the_call_saw(sqlite_url: str) -> None:
    buf = np.arange(8, dtype=np.float64).reshape(8, 1)
    with Monitor(sqlite_url, sample_rate=1.0) as mon:
        mon.wrap(lambda x: x.sum(axis=1), name="tab")(buf)
        buf[:] = -999.0
        rows = _samples(mon, "tab")
    assert [r.features["x0"] for r in rows] == [float(i) for i in range(8)]
    assert [r.outputs for r in rows] == [{"value": float(i)} for i in range(8)]


@pytest.mark.parametrize(
    "output", [np.float64(0.25), np.array(0.25), 0.25, np.float32(0.25), [0.25]],
    ids=["numpy-scalar", "0-d-array", "python-float", "float32", "list"],
)  # fmt: skip
def test_numeric_outputs_are_stored_as_numbers(sqlite_url: str, output: Any) -> None:
    with Monitor(sqlite_url, sample_rate=1.0) as mon:
        mon.wrap(lambda x: output, name="num")(np.ones((1, 3)))
        (row,) = _samples(mon, "num")
    assert row.outputs == {"value": 0.25}


def test_raw_rows_have_their_size_and_the_reservoir_keeps_the_newest(db_url: str) -> None:
    row_values = 1000  # a 4,000-byte float32 row: about 4.3 kB as .npz
    budget_mb = 40_000 / (1 << 20)
    with Monitor(db_url, sample_rate=1.0, raw_reservoir_mb=budget_mb) as mon:
        model = mon.wrap(lambda x: x[:, :3], name="res")
        for i in range(30):
            model(np.full((1, row_values), i, dtype=np.float32))
            assert mon.flush()  # one flush per call: the trim runs many times
        rows = _samples(mon, "res")
        with mon.db.session() as s:
            sizes = s.execute(
                select(schema.Sample.raw_bytes, func.length(schema.Sample.raw)).where(
                    schema.Sample.model == "res"
                )
            ).all()
        cleared = mon.stats()["counters"]["raw_rows_cleared"]
    assert len(rows) == 30  # every summary row is kept
    kept = [r for r in rows if r.raw is not None]
    assert all(size == length for size, length in sizes)  # raw_bytes is the stored size
    assert sum(size for size, _ in sizes if size) <= 40_000
    assert 5 <= len(kept) < 30 and cleared == 30 - len(kept)
    values = sorted(int(r.raw["arg0"][0]) for r in kept)  # type: ignore[index]
    assert values == list(range(30 - len(kept), 30))  # the freshest rows keep their raw


def test_an_image_row_keeps_its_raw_and_a_row_over_the_cap_does_not(sqlite_url: str) -> None:
    image = np.random.default_rng(0).random((2, 3, HW, HW), dtype=np.float32)
    with Monitor(sqlite_url, sample_rate=1.0, raw_row_max_bytes=1 << 20) as mon:
        mon.wrap(lambda x: x.mean(axis=(1, 2, 3)), name="img")(image)
        mon.wrap(lambda x: x.mean(axis=(1, 2, 3)), name="big")(np.zeros((1, 3, 400, 400)))
        img_rows, big_rows = _samples(mon, "img"), _samples(mon, "big")
    assert [r.raw["arg0"].shape for r in img_rows] == [(3, HW, HW)] * 2  # type: ignore[index]
    np.testing.assert_array_equal(img_rows[1].raw["arg0"], image[1])  # type: ignore[index]
    assert len(big_rows) == 1 and big_rows[0].raw is None and big_rows[0].features["max"] == 0.0


def _image_model(path: Path) -> Path:
    """A tiny real vision model: conv 3->4 (stride 4), global average pool, linear 4->3."""
    from onnx import TensorProto, helper, save

    rng = np.random.default_rng(0)
    conv_w = helper.make_tensor(
        "cw",
        TensorProto.FLOAT,
        [4, 3, 4, 4],
        rng.normal(size=(4, 3, 4, 4)).astype(np.float32).ravel(),
    )
    lin_w = helper.make_tensor("lw", TensorProto.FLOAT, [4, 3],
                               rng.normal(size=(4, 3)).astype(np.float32).ravel())  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "cw"], ["c"], strides=[4, 4]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("MatMul", ["f", "lw"], ["y"]),
        ],
        "vision",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, HW, HW])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [conv_w, lin_w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


def test_tuning_from_production_samples_of_a_224_image_model(
    sqlite_url: str, tmp_path: Path
) -> None:
    import onnxruntime as ort

    from monitor.settings import Settings
    from tuner import registry
    from tuner.tuning import run_tuning

    settings = Settings(database_url=sqlite_url, artifacts_dir=str(tmp_path / "artifacts"))
    onnx_path = _image_model(tmp_path / "vision.onnx")
    with Monitor(settings=settings, sample_rate=1.0) as mon:
        registry.register("vision", onnx_path, version="v1", db=mon.db, settings=settings)
        session = mon.wrap(ort.InferenceSession(str(onnx_path)), name="vision", version="v1")
        rng = np.random.default_rng(1)
        for _ in range(100):
            session({"x": rng.random((1, 3, HW, HW), dtype=np.float32)})
        assert mon.flush()
        assert storage.count_samples(mon.db, "vision") == 100
        outcome = run_tuning(mon.db, settings, "vision", quick=True)
    assert outcome.data_source.startswith("production samples of vision:v1")
    assert outcome.outcome in ("registered", "no_change")
    assert outcome.to_dict()["leaderboard"]  # candidates were built and measured on them


def test_raw_rows_round_trip_any_layout(sqlite_url: str) -> None:
    images = np.asfortranarray(np.arange(3 * 70 * 2, dtype=np.float64).reshape(3, 70, 2))
    with Monitor(sqlite_url, sample_rate=1.0) as mon:
        mon.wrap(lambda x, ids, names: 0, name="layout")(
            images, ids=np.arange(3), names=["ab", "cde", "f"]
        )
        rows = _samples(mon, "layout")
    for i, row in enumerate(rows):
        raw = row.raw or {}
        np.testing.assert_array_equal(raw["arg0"], images[i])
        assert raw["ids"].shape == () and int(raw["ids"]) == i
        assert str(raw["names"]) == ["ab", "cde", "f"][i]


def test_a_reused_torch_tensor_leaves_the_stored_sample_intact(sqlite_url: str) -> None:
    import torch

    net = torch.nn.Linear(100, 3)
    x = torch.arange(200, dtype=torch.float32).reshape(2, 100)
    with Monitor(sqlite_url, sample_rate=1.0) as mon:
        expected = net(x).detach().argmax(dim=1).tolist()
        mon.wrap(net, name="torch-reuse")(x)
        x.fill_(-999.0)  # a serving loop refills its input tensor in place
        rows = _samples(mon, "torch-reuse")
    assert [r.features["max"] for r in rows] == [99.0, 199.0]
    assert [r.outputs["top_class"] for r in rows if r.outputs] == expected
    np.testing.assert_array_equal(rows[1].raw["arg0"], np.arange(100, 200))  # type: ignore[index]


def test_a_new_process_trims_what_earlier_ones_left_over_budget(sqlite_url: str) -> None:
    def send(budget_bytes: int, values: range) -> int:
        with Monitor(sqlite_url, sample_rate=1.0, raw_reservoir_mb=budget_bytes / (1 << 20)) as mon:
            model = mon.wrap(lambda x: x[:, :3], name="restart")
            for i in values:
                model(np.full((1, 1000), i, dtype=np.float32))
            assert mon.flush()
            return int(mon.stats()["counters"].get("raw_rows_cleared", 0))

    assert send(1 << 20, range(30)) == 0  # a roomy budget: all 30 raw rows kept
    cleared = send(40_000, range(30, 31))  # restarted with a small one: it re-reads the total
    db = storage.Database(sqlite_url)
    with db.session() as s:
        kept = s.execute(select(func.sum(schema.Sample.raw_bytes))).scalar()
    newest = storage.read_samples(db, "restart", with_raw=True)[-1]
    db.dispose()
    assert cleared >= 20 and kept <= 40_000
    assert newest.raw is not None and newest.raw["arg0"][0] == 30


def test_a_list_of_row_arrays_is_copied_whole_and_only_the_list_is_capped() -> None:
    from monitor.features import snapshot

    rows = [np.arange(784, dtype=np.float32) + i for i in range(5)]
    kept = snapshot(rows, max_rows=3)  # e.g. sample_cap_per_minute below the row's width
    assert len(kept) == 3
    assert [k.shape for k in kept] == [(784,)] * 3
    rows[0][:] = -999.0  # the caller reuses its buffers
    np.testing.assert_array_equal(kept[0], np.arange(784, dtype=np.float32))
