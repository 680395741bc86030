"""The typed settings of a search (:mod:`mpsearch.job.config`): built and validated once,
frozen, round-tripped through YAML without loss, and every problem reported with its key path
before any work starts; and the public API names of ``mpsearch`` resolve to them."""

from __future__ import annotations

import dataclasses
import math

import pytest

import mpsearch
from mpsearch.core.errors import UsageError
from mpsearch.core.formats import parse_candidate
from mpsearch.job.config import (
    CacheConfig,
    CandidateConfig,
    MeasureConfig,
    RefinementConfig,
    RunConfig,
    SearchConfig,
    VerifyConfig,
    load_run_config,
    parse,
    to_yaml,
)
from mpsearch.quant.analysis import QuantizeOptions
from mpsearch.quant.gating import GateSearch
from mpsearch.quant.layer import Rounding
from mpsearch.sensitivity.run import Method
from mpsearch.sensitivity.table import SparsityChoice


def _everything(tmp_path) -> RunConfig:
    """A config with every field away from its default."""
    search = SearchConfig(
        budgets=("latency=0.7", "size_mb=4"), method="measured",
        candidates=CandidateConfig(only=("w8a8", "w4a8"), sparsity="2:4", gating="exact",
                                   pin={"conv_0": "w8a16"}, keep_float=("fc",)),
        convert_penalty=0.25,
        refinement=RefinementConfig(rounds=1, explore=2.5, select=False, polish=2),
        measurement=MeasureConfig(enabled=False, front_points=4, all_uniform=True),
        quantize=QuantizeOptions(batch_size=4, rounding=Rounding.NEAREST, bias_correction=False),
        seed=7, workers=2, cache=CacheConfig(enabled=False, dir=str(tmp_path / "cache")))
    return RunConfig(model=str(tmp_path / "in" / "model.onnx"), hw=str(tmp_path / "hw.yaml"),
                     data=str(tmp_path / "in" / "calib.npz"), eval_data=None,
                     sample_axes={"state": 1, "sr": "none"},
                     out=str(tmp_path / "out"), search=search,
                     verification=VerifyConfig(samples=2, input_shapes={"x": "1,3,32,32"}))


def test_a_config_survives_yaml_unchanged(tmp_path):
    cfg = _everything(tmp_path)
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "config.yaml"
    path.write_text(to_yaml(cfg, relative_to=tmp_path / "out"))
    text = path.read_text()
    assert "model: ../in/model.onnx" in text and "out: ." in text  # the folder can move
    back = parse(RunConfig, load_run_config(path))
    assert back == cfg
    assert back.search.method is Method.MEASURED
    assert back.search.candidates.sparsity is SparsityChoice.SEMI_STRUCTURED
    assert back.search.candidates.gating is GateSearch.EXACT
    assert back.search.candidates.pin["conv_0"] == parse_candidate("w8a16")
    assert back.verification.input_shapes["x"] == (1, 3, 32, 32)
    assert dict(back.sample_axes) == {"state": 1, "sr": None}
    assert [b.metric for b in back.search.budgets] == ["latency_s", "weight_bytes"]


def test_configs_are_frozen_all_the_way_down(tmp_path):
    cfg = _everything(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.search.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError, match="read-only"):
        cfg.search.candidates.pin["fc"] = parse_candidate("w8a8")  # type: ignore[index]
    with pytest.raises(TypeError, match="read-only"):
        cfg.verification.input_shapes["y"] = (1,)  # type: ignore[index]


@pytest.mark.parametrize("build, message", [
    (lambda: SearchConfig(budgets=()), "needs a budget or a target"),
    (lambda: SearchConfig(target="snr=25"), "did you mean .sqnr."),
    (lambda: SearchConfig(budgets=("bops=0.9", "bops=0.8")), "both limit bops"),
    (lambda: SearchConfig(budgets=("speed=2",)), "not KEY=VALUE with a known KEY"),
    (lambda: SearchConfig(budgets=("bops=0.9",), method="guess"), "method guess is not a known"),
    (lambda: RefinementConfig(rounds=-1), "rounds -1 is negative"),
    (lambda: RefinementConfig(rounds=1.5), "rounds 1.5 is not an integer"),
    (lambda: RefinementConfig(explore=0.5), "explore 0.5 is below 1"),
    (lambda: RefinementConfig(explore=math.inf), "explore inf is not a finite number"),
    (lambda: SearchConfig(budgets=("bops=0.9",), convert_penalty=math.nan),
     "convert_penalty nan is not a finite number"),
    (lambda: SearchConfig(budgets=("bops=0.9",), workers=0), "workers 0 is below 1"),
    (lambda: CandidateConfig(only=("w9a9",)), "w9a9"),
    (lambda: CandidateConfig(sparsity="3:4"), "sparsity 3:4 is not a known choice"),
    (lambda: VerifyConfig(input_shapes={"x": "1,0,3"}), "not a shape of positive integers"),
    (lambda: QuantizeOptions(batch_size=0), "batch size 0 is not a positive integer"),
])
def test_bad_settings_are_refused_where_the_config_is_built(build, message):
    with pytest.raises(UsageError, match=message):
        build()


def test_unknown_keys_name_the_key_path_and_the_keys_there():
    with pytest.raises(UsageError) as e:
        parse(SearchConfig, {"budgets": ["bops=0.9"], "refinement": {"round": 2}},
              origin="run.yaml")
    assert str(e.value).startswith("run.yaml: refinement.round is not a known key")
    assert "rounds, explore, select, polish" in str(e.value)


def test_the_public_names_resolve():
    for name in mpsearch.__all__:
        assert getattr(mpsearch, name) is not None, name
    assert mpsearch.SearchConfig is SearchConfig and mpsearch.RunConfig is RunConfig
    assert set(mpsearch.__all__) <= set(dir(mpsearch))
    with pytest.raises(AttributeError):
        mpsearch.no_such_name  # noqa: B018
