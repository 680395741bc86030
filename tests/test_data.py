"""Tests for mpsearch.data.dataset: real .npz/.npy files in tmp_path, tiny models built in code."""

from __future__ import annotations

import logging
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import ModelProto, TensorProto, helper

from mpsearch.core.errors import DataError, UsageError
from mpsearch.data import dataset as data
from mpsearch.data import npyio
from mpsearch.data.dataset import open_dataset, split
from mpsearch.data.spec import DataSpec, is_symbol

ROOT = Path(__file__).resolve().parent.parent


def _model(inputs: list[tuple[str, int, list[int | str]]]) -> ModelProto:
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture
def image_model() -> ModelProto:
    return _model([("x", TensorProto.FLOAT, ["N", 3, 8, 8])])


@pytest.fixture
def two_input_model() -> ModelProto:
    return _model([("ids", TensorProto.INT64, ["N", "seq"]),
                   ("x", TensorProto.FLOAT, ["N", "seq", 4])])


def _images(n: int, start: int = 0) -> np.ndarray:
    """Samples whose every value is the sample's index, so order is easy to check."""
    return np.broadcast_to(np.arange(start, start + n, dtype=np.float32)[:, None, None, None],
                           (n, 3, 8, 8)).copy()


def _stack(ds: data.Dataset, batch_size: int | None = None) -> tuple[list[int], np.ndarray]:
    batches = list(ds.batches(batch_size))
    for b in batches:
        assert b["x"].dtype == ds.spec["x"].dtype and b["x"].flags.c_contiguous
    return [len(b["x"]) for b in batches], np.concatenate([b["x"] for b in batches])


def _error(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- happy paths


def test_spec_from_model(two_input_model: ModelProto) -> None:
    spec = DataSpec.from_model(two_input_model)
    assert spec.names == ("ids", "x")
    assert spec["ids"].dtype == np.int64 and spec["x"].dtype == np.float32
    assert spec["x"].shape == (None, None, 4) and spec["x"].describe() == "(N, seq, 4)"
    assert spec.static_batch is None


def test_npz_file_batches_and_labels(tmp_path: Path, image_model: ModelProto) -> None:
    x = np.random.default_rng(0).normal(size=(10, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x, labels=np.arange(10) % 3)
    ds = open_dataset(tmp_path / "calib.npz", image_model, batch_size=4)
    assert len(ds) == 10
    sizes, got = _stack(ds)
    assert sizes == [4, 4, 2]
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(ds.labels, np.arange(10) % 3)
    assert _stack(ds, 10)[0] == [10]


def test_folder_of_npz_in_file_name_order(tmp_path: Path, image_model: ModelProto) -> None:
    np.savez_compressed(tmp_path / "b.npz", x=_images(5, start=3), labels=np.arange(3, 8))
    np.savez(tmp_path / "a.npz", x=_images(3), labels=np.arange(3))
    ds = open_dataset(tmp_path, image_model, batch_size=4)
    sizes, got = _stack(ds)
    assert sizes == [4, 4]
    np.testing.assert_array_equal(got, _images(8))
    np.testing.assert_array_equal(ds.labels, np.arange(8))


def test_folder_of_npy_chunks_single_input(tmp_path: Path, image_model: ModelProto) -> None:
    np.save(tmp_path / "part0.npy", _images(4))
    np.save(tmp_path / "part1.npy", _images(3, start=4).astype(np.float64))  # cast, warned
    np.save(tmp_path / "labels.npy", np.arange(7, dtype=np.int32))
    ds = open_dataset(tmp_path, image_model, batch_size=5)
    sizes, got = _stack(ds)
    assert sizes == [5, 2]
    np.testing.assert_array_equal(got, _images(7))
    assert ds.labels.dtype == np.int64 and list(ds.labels) == list(range(7))


def test_single_npy_file_and_float64_warning(tmp_path: Path, image_model: ModelProto,
                                             caplog: pytest.LogCaptureFixture) -> None:
    np.save(tmp_path / "x.npy", _images(3).astype(np.float64))
    with caplog.at_level(logging.WARNING, logger="mpsearch.data.dataset"):
        ds = open_dataset(tmp_path / "x.npy", image_model)
    assert "float64" in caplog.text and "'x'" in caplog.text
    assert ds.labels is None and _stack(ds)[0] == [3]


def test_folder_of_named_npy_two_inputs(tmp_path: Path, two_input_model: ModelProto) -> None:
    ids = np.arange(12, dtype=np.int32).reshape(6, 2)  # int32 data for an int64 input: cast
    x = np.ones((6, 2, 4), np.float32)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "x.npy", x)
    ds = open_dataset(tmp_path, two_input_model, batch_size=4)
    batches = list(ds.batches())
    assert [b["ids"].shape for b in batches] == [(4, 2), (2, 2)]
    assert batches[0]["ids"].dtype == np.int64
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches]), ids)


def test_dynamic_dims_differ_between_files(tmp_path: Path, two_input_model: ModelProto) -> None:
    for name, n, seq in [("a", 3, 5), ("b", 3, 7)]:
        np.savez(tmp_path / f"{name}.npz", ids=np.zeros((n, seq), np.int64),
                 x=np.zeros((n, seq, 4), np.float32), note=np.zeros(n))
    np.savez(tmp_path / "c.npz", ids=np.zeros((2, 7), np.int64), x=np.zeros((2, 7, 4), np.float32))
    ds = open_dataset(tmp_path, two_input_model, batch_size=4)
    # A batch never mixes sequence lengths: it is cut short at the file boundary.
    assert [b["x"].shape for b in ds.batches()] == [(3, 5, 4), (4, 7, 4), (1, 7, 4)]
    sub = ds.take([0, 1, 6, 7])  # nothing from b.npz
    assert [b["x"].shape for b in sub.batches()] == [(2, 5, 4), (2, 7, 4)]


def test_fortran_order_arrays(tmp_path: Path, image_model: ModelProto) -> None:
    x = np.asfortranarray(np.random.default_rng(1).normal(size=(5, 3, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "f.npz", x=x)
    np.save(tmp_path / "f.npy", x)
    for path in ("f.npz", "f.npy"):
        ds = open_dataset(tmp_path / path, image_model, batch_size=2).take([0, 2, 3, 4])
        np.testing.assert_array_equal(_stack(ds)[1], x[[0, 2, 3, 4]])


def test_static_batch_is_forced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _model([("x", TensorProto.FLOAT, [2, 3])])
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 3), np.float32))
    with caplog.at_level(logging.WARNING, logger="mpsearch.data.dataset"):
        ds = open_dataset(tmp_path / "d.npz", model, batch_size=8)
        assert [len(b["x"]) for b in ds.batches()] == [2, 2]
    assert "fixed at 2" in caplog.text and "dropping a batch of 1" in caplog.text


def test_seeded_split_is_disjoint_and_deterministic(tmp_path: Path,
                                                     image_model: ModelProto) -> None:
    np.savez(tmp_path / "a.npz", x=_images(12), labels=np.arange(12))
    np.savez(tmp_path / "b.npz", x=_images(8, start=12), labels=np.arange(12, 20))
    ds = open_dataset(tmp_path, image_model, batch_size=3)
    calib, held = split(ds, 0.25, seed=7)
    assert (len(calib), len(held)) == (15, 5) and held.name == "evaluation"
    seen = {name: _stack(part)[1][:, 0, 0, 0].astype(int) for name, part in
            [("calib", calib), ("eval", held)]}
    np.testing.assert_array_equal(seen["calib"], calib.labels)  # values follow the labels
    np.testing.assert_array_equal(seen["eval"], held.labels)
    assert not set(calib.labels) & set(held.labels)
    assert sorted([*calib.labels, *held.labels]) == list(range(20))
    again = split(ds, 0.25, seed=7)
    np.testing.assert_array_equal(again.evaluation.labels, held.labels)
    assert list(split(ds, 0.25, seed=8).evaluation.labels) != list(held.labels)
    sub = held.take([0, 4])
    np.testing.assert_array_equal(_stack(sub)[1][:, 0, 0, 0], held.labels[[0, 4]])


def test_subset_of_npz_read_in_small_chunks(tmp_path: Path, image_model: ModelProto,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(npyio, "CHUNK_BYTES", 3 * 3 * 8 * 8 * 4)  # three samples per read
    np.savez_compressed(tmp_path / "a.npz", x=_images(40))
    ds = open_dataset(tmp_path / "a.npz", image_model).take([1, 2, 9, 10, 11, 12, 30, 39])
    sizes, got = _stack(ds, 3)
    assert sizes == [3, 3, 2]
    np.testing.assert_array_equal(got[:, 0, 0, 0], [1, 2, 9, 10, 11, 12, 30, 39])


# --------------------------------------------------------------------------- errors


def test_missing_path_and_empty_folder(tmp_path: Path, image_model: ModelProto) -> None:
    assert "does not exist" in _error(lambda: open_dataset(tmp_path / "no.npz", image_model))
    (tmp_path / "notes.txt").write_text("hello")
    assert "no .npz, .npy, image or .wav files" in _error(
        lambda: open_dataset(tmp_path, image_model))


def test_not_an_npz(tmp_path: Path, image_model: ModelProto) -> None:
    (tmp_path / "calib.npz").write_text("this is not a zip file\nat all\n")
    message = _error(lambda: open_dataset(tmp_path / "calib.npz", image_model))
    assert "calib.npz" in message and "not a readable .npz" in message


def test_truncated_npz(tmp_path: Path, image_model: ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", x=_images(4))
    raw = (tmp_path / "calib.npz").read_bytes()
    (tmp_path / "calib.npz").write_bytes(raw[: len(raw) // 2])
    assert "calib.npz" in _error(lambda: open_dataset(tmp_path / "calib.npz", image_model))


def test_missing_input_lists_keys(tmp_path: Path, two_input_model: ModelProto) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 4), np.float32), input_ids=np.zeros((2, 3)))
    message = _error(lambda: open_dataset(tmp_path / "d.npz", two_input_model))
    assert "input 'ids'" in message and "input_ids, x" in message


def test_wrong_shape_names_input_and_both_shapes(tmp_path: Path,
                                                 image_model: ModelProto) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 7, 8), np.float32))
    message = _error(lambda: open_dataset(tmp_path / "d.npz", image_model))
    assert "'x'" in message and "(4, 3, 7, 8)" in message and "(N, 3, 8, 8)" in message
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 8, 8), np.float32))  # no sample axis
    assert "(3, 8, 8)" in _error(lambda: open_dataset(tmp_path / "d.npz", image_model))


def test_named_dim_must_agree_across_inputs(tmp_path: Path, two_input_model: ModelProto) -> None:
    np.savez(tmp_path / "d.npz", ids=np.zeros((2, 5), np.int64), x=np.zeros((2, 6, 4), np.float32))
    message = _error(lambda: open_dataset(tmp_path / "d.npz", two_input_model))
    assert "'seq'" in message and "'ids'" in message and "'x'" in message


@pytest.mark.parametrize(("ids", "x", "words"), [
    (np.zeros((2, 3), np.int64), np.zeros((2, 3, 4), np.uint8), ["'x'", "uint8", "float32"]),
    (np.zeros((2, 3), np.float32), np.zeros((2, 3, 4), np.float32), ["'ids'", "int64"]),
])
def test_wrong_dtype(tmp_path: Path, two_input_model: ModelProto, ids: np.ndarray, x: np.ndarray,
                     words: list[str]) -> None:
    np.savez(tmp_path / "d.npz", ids=ids, x=x)
    message = _error(lambda: open_dataset(tmp_path / "d.npz", two_input_model))
    assert all(w in message for w in words)


def test_int_values_out_of_range(tmp_path: Path) -> None:
    model = _model([("ids", TensorProto.INT32, ["N", 2])])
    np.savez(tmp_path / "d.npz", ids=np.array([[1, 2], [3, 2**40]], np.int64))
    ds = open_dataset(tmp_path / "d.npz", model)
    assert "'ids'" in _error(lambda: list(ds.batches()))


def test_nan_names_input_and_sample(tmp_path: Path, image_model: ModelProto) -> None:
    np.savez(tmp_path / "a.npz", x=_images(4))
    bad = _images(4, start=4)
    bad[2, 1, 5, 5] = np.nan
    np.savez(tmp_path / "b.npz", x=bad)
    ds = open_dataset(tmp_path, image_model, batch_size=3)  # opening reads headers only
    message = _error(ds.check_values)
    assert "input 'x'" in message and "NaN at sample 6" in message and "b.npz" in message
    np.save(tmp_path / "inf.npy", np.full((2, 3, 8, 8), np.inf, np.float32))
    assert "Inf at sample 0" in _error(open_dataset(tmp_path / "inf.npy", image_model).check_values)


def test_sample_counts_differ(tmp_path: Path, two_input_model: ModelProto) -> None:
    np.savez(tmp_path / "d.npz", ids=np.zeros((3, 2), np.int64), x=np.zeros((4, 2, 4), np.float32))
    message = _error(lambda: open_dataset(tmp_path / "d.npz", two_input_model))
    assert "'ids' 3" in message and "'x' 4" in message


def test_empty_data(tmp_path: Path, image_model: ModelProto) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((0, 3, 8, 8), np.float32))
    assert "0 samples" in _error(lambda: open_dataset(tmp_path / "d.npz", image_model))


@pytest.mark.parametrize(("labels", "words"), [
    (np.arange(3), ["3 labels for 4 samples"]),
    (np.zeros(4, np.float32), ["'labels'", "float32"]),
])
def test_bad_labels(tmp_path: Path, image_model: ModelProto, labels: np.ndarray,
                    words: list[str]) -> None:
    np.savez(tmp_path / "d.npz", x=_images(4), labels=labels)
    message = _error(lambda: open_dataset(tmp_path / "d.npz", image_model))
    assert all(w in message for w in words)


def test_folder_layout_errors(tmp_path: Path, two_input_model: ModelProto) -> None:
    np.save(tmp_path / "ids.npy", np.zeros((2, 3), np.int64))
    assert "x.npy" in _error(lambda: open_dataset(tmp_path, two_input_model))
    np.savez(tmp_path / "more.npz", ids=np.zeros((2, 3), np.int64))
    assert "mixes .npz and .npy" in _error(lambda: open_dataset(tmp_path, two_input_model))


# --------------------------------------------------------------------------- streaming


def test_large_npy_is_memory_mapped_and_streamed(tmp_path: Path,
                                                 image_model: ModelProto) -> None:
    model = _model([("x", TensorProto.FLOAT, ["N", 3, 64, 64])])
    n = 4096  # 4096 x 48 KiB = 192 MiB, a sparse file: written without touching the data
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32,
                                    shape=(n, 3, 64, 64))
    big[-1] = 1.0
    del big
    start = time.perf_counter()
    ds = open_dataset(tmp_path / "big.npy", model, batch_size=64)
    assert time.perf_counter() - start < 0.5 and len(ds) == n
    tracemalloc.start()
    try:
        sizes, last = [], None
        for batch in ds.batches():
            sizes.append(len(batch["x"]))
            last = batch["x"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sizes == [64] * (n // 64) and last[-1].min() == 1.0
    assert peak < 32 << 20  # a few batches of 3 MiB, never the 192 MiB file


def test_npz_member_is_streamed(tmp_path: Path, image_model: ModelProto) -> None:
    np.savez_compressed(tmp_path / "d.npz", x=np.zeros((8192, 3, 8, 8), np.float32))  # 24 MiB
    ds = open_dataset(tmp_path / "d.npz", image_model, batch_size=256)
    tracemalloc.start()
    try:
        count = sum(len(b["x"]) for b in ds.batches())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 8192 and peak < 8 << 20


@pytest.mark.parametrize("placeholder", ["?", "-1", "None", ""])
def test_placeholder_dims_are_independent_sizes(tmp_path, placeholder):
    """PaddlePaddle exports write "?" for every unknown dim: H=48 and W=192 are two sizes, not
    one symbol. A real symbol still binds: two dims named S must agree."""
    np.savez(tmp_path / "d.npz", x=np.ones((4, 3, 48, 192), np.float32))
    m = _model([("x", TensorProto.FLOAT, [placeholder, 3, placeholder, placeholder])])
    ds = open_dataset(tmp_path / "d.npz", m)
    assert ds.spec["x"].dim_names == (None, None, None, None)
    assert next(ds.batches(4))["x"].shape == (4, 3, 48, 192)
    named = _model([("x", TensorProto.FLOAT, ["N", 3, "S", "S"])])
    with pytest.raises(DataError, match="dim 'S' is 192 in input 'x' but 48"):
        open_dataset(tmp_path / "d.npz", named)


def test_is_symbol():
    assert all(is_symbol(s) for s in ("N", "batch_size", "unk__12", "seq_len/2"))
    assert not any(is_symbol(s) for s in ("?", "-1", "", "None", "null", "3"))


def test_a_model_that_fails_the_checker_is_never_written(tmp_path):
    """Nodes out of topological order (what a real export's subgraph weights once led to):
    the full checker refuses the model before it is renamed into place; mpsearch's bug, not
    the user's input, so not an MpsearchError."""
    from mpsearch.core.errors import InternalError, MpsearchError
    from mpsearch.data.outputs import OutputDir

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["y"], ["z"]),  # reads y before it is
                               helper.make_node("Relu", ["x"], ["y"])], "g", [x], [z])
    bad = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = OutputDir(tmp_path / "out", inputs=[], names=["model.qdq.onnx", "ok.onnx"])
    with pytest.raises(InternalError, match="mpsearch wrote model.qdq.onnx, which fails "
                                            "onnx.checker .*this is a bug") as e:
        out.write_model("model.qdq.onnx", bad)
    assert not isinstance(e.value, MpsearchError)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no file, no temporary
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]),
                               helper.make_node("Relu", ["y"], ["z"])], "g", [x], [z])
    out.write_model("ok.onnx", helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert (tmp_path / "out" / "ok.onnx").is_file()


def _stateful(state_shape: list, audio_shape: list) -> ModelProto:
    """A wake-word-like model: audio frames, a recurrent state, a scalar sample rate; outputs
    the score and the next state (samples on its axis 1, as Silero VAD's)."""
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((576, 128)) * 0.05).astype(np.float32), "w")
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    k = numpy_helper.from_array(np.array(1 / 16000, np.float32), "k")
    axis = 1 if state_shape[0] == 2 else 0
    nodes = [helper.make_node("MatMul", ["audio", "w"], ["h"]),
             helper.make_node("Gather", ["state", "zero"], ["s0"], axis=0),
             helper.make_node("Add", ["h", "s0"], ["hs"]),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["srf", "k"], ["scale"]),
             helper.make_node("Mul", ["hs", "scale"], ["y"]),
             helper.make_node("Add", ["state", "state"], ["state_out"])]
    del axis
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, audio_shape),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, state_shape),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [audio_shape[0], 128]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, state_shape)],
        [w, zero, k])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_state_and_a_sample_rate_are_given_once(tmp_path):
    """A static state [2, 1, 128] beside audio [1, 576]: the state is not a batch of 2 (the
    model's batch is 1), it is given once, as the sample rate (a scalar) is; every batch feeds
    ONNX Runtime what the model takes."""
    import onnxruntime as ort

    model = _stateful([2, 1, 128], [1, 576])
    state = np.full((2, 1, 128), 0.5, np.float32)
    np.savez(tmp_path / "d.npz", audio=np.ones((5, 576), np.float32), state=state,
             sr=np.array(16000, np.int64))
    ds = open_dataset(tmp_path / "d.npz", model)
    assert len(ds) == 5 and ds.batch_size == 1
    assert ds.spec["state"].sample_axis is None and ds.spec["sr"].sample_axis is None
    sess = ort.InferenceSession(model.SerializeToString())
    batches = list(ds.batches())
    assert len(batches) == 5
    for b in batches:
        assert b["audio"].shape == (1, 576) and b["state"].shape == (2, 1, 128)
        assert b["sr"].shape == () and b["sr"].dtype == np.int64
        assert sess.run(None, b)[0].shape == (1, 128)
        assert sess.run(None, b)[1].shape == (2, 1, 128)


def test_a_state_with_its_batch_on_axis_1_takes_samples_there(tmp_path):
    """[2, N, 128]: axis 0 is static, so the samples go to the first dynamic axis; the stored
    array keeps them on its axis 0. A sequence-first input declares its axis."""
    model = _stateful([2, "N", 128], ["N", 576])
    rng = np.random.default_rng(3)
    states = rng.standard_normal((6, 2, 128)).astype(np.float32)
    np.savez(tmp_path / "d.npz", audio=np.ones((6, 576), np.float32), state=states,
             sr=np.array(8000, np.int64))
    ds = open_dataset(tmp_path / "d.npz", model, batch_size=4)
    assert ds.spec["state"].sample_axis == 1
    b = next(ds.batches())
    assert b["state"].shape == (2, 4, 128) and b["audio"].shape == (4, 576)
    assert np.array_equal(b["state"][:, 3], states[3])  # sample 3 is at index 3 of axis 1
    with pytest.raises(DataError, match=r"input 'state' has shape \(6, 2, 128\) but the model "
                                        r"wants \(2, N, 128\) \(given once.*store arrays of "
                                        r"shape \(2, N, 128\)"):
        open_dataset(tmp_path / "d.npz", model, sample_axes={"state": None})
    with pytest.raises(UsageError, match="--sample-axis names nope, not an input"):
        open_dataset(tmp_path / "d.npz", model, sample_axes={"nope": 0})


@pytest.mark.parametrize("dims, axis", [
    (["batch", 576], 0),
    ([1, 1, 64, "W"], 0),  # a batch fixed at 1 with a dynamic width: batch-first
    ([2, "N", 128], 1),  # a static leading 2 is no batch: the first dynamic axis
    ([1, "batch", 64], 1),  # the symbol another input has on axis 0
])
def test_inferred_sample_axes(dims, axis):
    model = _model([("x", TensorProto.FLOAT, ["batch", 8]), ("s", TensorProto.FLOAT, dims)])
    assert DataSpec.from_model(model)["s"].sample_axis == axis


def _photos(folder: Path, n: int, size: tuple[int, int] = (40, 30), seed: int = 0) -> None:
    """``n`` structured RGB pictures (gradients and a bright square), JPEG and PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1)
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        img[y0:y0 + 8, x0:x0 + 8] = rng.integers(0, 256, 3)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"p{i:02d}.{'png' if i % 2 else 'jpg'}")


def test_a_folder_of_images_is_decoded_as_documented(tmp_path):
    """Each image: shorter side resized to the input's size, centre crop, (pixel - mean) /
    std, NCHW for a [N, 3, H, W] input; equal to decoding it by hand with Pillow; limit takes
    the first images by name; a model with two inputs is told what a folder of images feeds."""
    from PIL import Image

    from mpsearch.data.images import parse_preprocess

    _photos(tmp_path / "photos", 5)
    m = _model([("x", TensorProto.FLOAT, ["N", 3, 16, 16])])
    pre = parse_preprocess("mean=127;std=128;limit=4")
    ds = open_dataset(tmp_path / "photos", m, preprocess=pre)
    assert len(ds) == 4
    got = np.concatenate([b["x"] for b in ds.batches(8)])
    with Image.open(tmp_path / "photos" / "p01.png") as im:  # 40 x 30 -> 21 x 16, crop 16
        im = im.convert("RGB").resize((21, 16), Image.Resampling.BILINEAR).crop((2, 0, 18, 16))
        want = ((np.asarray(im, np.float32) - 127) / 128).transpose(2, 0, 1)
    np.testing.assert_allclose(got[1], want, atol=1e-6)
    nhwc = open_dataset(tmp_path / "photos", _model([("x", TensorProto.FLOAT, ["N", 16, 16, 3])]))
    first = next(nhwc.batches(8))["x"]
    assert first.shape == (5, 16, 16, 3) and first.min() >= 0 and first.max() <= 1
    two = _model([("x", TensorProto.FLOAT, ["N", 3, 16, 16]), ("y", TensorProto.FLOAT, ["N", 4])])
    with pytest.raises(DataError, match="feeds a model with one image input"):
        open_dataset(tmp_path / "photos", two)
    with pytest.raises(UsageError, match="unknown key 'size'"):
        parse_preprocess("size=3")
    assert DataSpec.from_model(m).inputs[0].name == "x"


def test_a_run_takes_a_folder_of_photos_as_data(tmp_path):
    """The MBConv block on the Snapdragon profile, calibrated on 24 decoded photos and
    evaluated on 8 others: exit 0, 18 fitted and 6 check samples, 8 evaluation samples."""
    import json

    from models import mbconv

    from mpsearch.cli.main import main

    _photos(tmp_path / "calib", 24, seed=1)
    _photos(tmp_path / "eval", 8, seed=2)
    onnx.save(mbconv(seed=5), str(tmp_path / "m.onnx"))
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "m.onnx"), "--hw", str(ROOT / "hw_profiles" /
                 "snapdragon_8gen3.yaml"), "--data", str(tmp_path / "calib"), "--eval-data",
                 str(tmp_path / "eval"), "--preprocess", "mean=127;std=128", "--out", str(out),
                 "-q", "--no-cache", "--budget", "bops=0.9", "--no-verify"]) == 0
    doc = json.loads((out / "plan.json").read_text())
    assert doc["data"]["fit"] == 18 and doc["data"]["check"] == 6
    assert doc["quality"]["measured"]["samples"] == 8


def _wav(path: Path, x: np.ndarray, rate: int) -> None:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def test_a_folder_of_recordings_is_cut_into_windows_of_the_input_length(tmp_path):
    """Two 16 kHz recordings (1.0 s and 0.3 s) and one at 8 kHz (0.5 s), into a [N, 4000]
    input at rate=16000: 4 + 1 (padded) + 2 windows; a window equals the file's samples /
    32768 times scale, cut where the documented hop says; the 8 kHz file is resampled to
    twice its length."""
    from mpsearch.data.images import parse_preprocess

    rng = np.random.default_rng(0)
    rec = tmp_path / "rec"
    rec.mkdir()
    a = 0.5 * np.sin(np.linspace(0, 200 * np.pi, 16000)) * rng.uniform(0.5, 1, 16000)
    _wav(rec / "a.wav", a, 16000)
    _wav(rec / "b.wav", 0.2 * rng.standard_normal(4800), 16000)
    _wav(rec / "c.wav", 0.3 * np.sin(np.linspace(0, 40 * np.pi, 4000)), 8000)
    m = _model([("audio", TensorProto.FLOAT, ["N", 4000])])
    ds = open_dataset(rec, m, preprocess=parse_preprocess("rate=16000;scale=32768"))
    x = np.concatenate([b["audio"] for b in ds.batches(16)])
    assert x.shape == (7, 4000)
    pcm = (np.clip(a, -1, 1) * 32767).astype("<i2").astype(np.float64) / 32768
    np.testing.assert_allclose(x[1], pcm[4000:8000] * 32768, rtol=1e-6, atol=1e-3)
    assert np.all(x[4, 4800:] == 0) and np.any(x[4, :4800] != 0)  # b: one window, padded
    c = x[5:7].ravel()  # c: 0.5 s at 8 kHz -> 8000 samples at 16 kHz
    assert np.abs(c).max() == pytest.approx(0.3 * 32768, rel=0.05)
    hop = open_dataset(rec, m, preprocess=parse_preprocess("rate=16000;hop=2000;limit=1"))
    assert len(hop) == 7  # a.wav alone: 1 + (16000 - 4000) / 2000 windows
