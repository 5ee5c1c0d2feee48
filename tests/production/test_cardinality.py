"""Cardinality control and worker identity: which series a process exports, checked on a real scrape."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtel
from gradtel import export
from gradtel.config import Config, Worker
from gradtel.naming import PatternSet
from gradtel.series import SeriesPolicy
from tests.core.helpers import free_port
from tests.core.test_export import scrape


def layered_step(name: str, n_layers: int = 4):
    """A real optimizer step over n_layers layers (kernel + bias), one layer disconnected, one with NaN."""
    variables, grads = [], []
    rng = np.random.default_rng(7)
    for i in range(n_layers):
        for part, shape in (("kernel", (3, 2)), ("bias", (2,))):
            variables.append(keras.Variable(np.zeros(shape, "float32"), name=part))
            if i == 1:
                grads.append(None)
            elif i == 2 and part == "bias":
                grads.append(tf.constant([np.nan, 1.0]))
            else:
                grads.append(tf.constant(rng.normal(size=shape).astype("float32")))
    # Give each pair a layer path, as Keras layers would (the display name is the path).
    for i, v in enumerate(variables):
        v._path = f"block{i // 2}/{v.name}"
    optimizer = keras.optimizers.SGD(0.0)
    handle = gradtel.instrument(optimizer, name=name)
    optimizer.apply_gradients(zip(grads, variables, strict=True))
    return handle, variables, grads


@pytest.fixture
def scraped(request):
    """Start an endpoint with the given policy, run the layered step, scrape, stop."""
    export.shutdown()
    policy = request.param
    started = export.ensure_started(Config(prometheus_port=free_port(), run_id="card", series=policy))
    handle, _, grads = layered_step(f"card-{policy.mode}")
    metrics = scrape(started.endpoint[1])
    yield handle, grads, metrics
    from gradtel.instrumenting import uninstrument_all

    uninstrument_all()
    export.shutdown()


def series_for(metrics, metric: str, optimizer: str) -> dict[str, float]:
    return {s.labels["variable"]: s.value for s in metrics.get(metric, []) if s.labels["optimizer"] == optimizer}


@pytest.mark.parametrize("scraped", [SeriesPolicy(mode="layer")], indirect=True)
def test_layer_rollup_sums_counts_and_combines_norms(scraped):
    handle, grads, metrics = scraped
    norms = series_for(metrics, "gradtel_gradient_norm", handle.name)
    # block0 and block3 are healthy: their roll-up norm is sqrt(kernel^2 + bias^2), computed independently.
    for block, (k, b) in {"block0": (0, 1), "block3": (6, 7)}.items():
        expected = math.sqrt(float(tf.norm(grads[k])) ** 2 + float(tf.norm(grads[b])) ** 2)
        assert norms[f"{block}/*"] == pytest.approx(expected, rel=1e-5)
    missing = series_for(metrics, "gradtel_gradient_missing", handle.name)
    assert missing["block1/*"] == 2  # two variables missing for one step
    # Unhealthy variables keep series of their own next to their layer's.
    assert missing["block1/kernel"] == 1 and missing["block1/bias"] == 1
    nonfinite = series_for(metrics, "gradtel_gradient_nonfinite", handle.name)
    assert nonfinite["block2/*"] == 1 and nonfinite["block2/bias"] == 1
    assert "block0/kernel" not in norms  # healthy variables have no series of their own
    states = {s.labels["state"]: s.value for s in metrics["gradtel_variables"] if s.labels["optimizer"] == handle.name}
    assert (states["ok"], states["missing"], states["nonfinite"]) == (5, 2, 1)  # every variable still counted


@pytest.mark.parametrize("scraped", [SeriesPolicy(mode="topk", top_k=2)], indirect=True)
def test_topk_keeps_the_largest_norms_and_every_unhealthy_variable(scraped):
    handle, grads, metrics = scraped
    healthy = {
        f"block{i // 2}/{'kernel' if i % 2 == 0 else 'bias'}": float(tf.norm(g))
        for i, g in enumerate(grads)
        if g is not None and i != 5
    }
    top2 = sorted(healthy, key=healthy.get, reverse=True)[:2]
    zero = series_for(metrics, "gradtel_gradient_zero", handle.name)
    assert set(zero) == {*top2, "block1/kernel", "block1/bias", "block2/bias"}


@pytest.mark.parametrize("scraped", [SeriesPolicy(exclude=PatternSet(["block0/*", "re:bias$"]))], indirect=True)
def test_include_exclude_patterns_select_variables(scraped):
    handle, _, metrics = scraped
    assert set(series_for(metrics, "gradtel_gradient_zero", handle.name)) == {
        "block1/kernel",
        "block2/kernel",
        "block3/kernel",
    }


@pytest.mark.parametrize("scraped", [SeriesPolicy(exporting_worker=False)], indirect=True)
def test_a_non_chief_worker_exports_only_its_summary(scraped):
    handle, _, metrics = scraped
    assert not series_for(metrics, "gradtel_gradient_zero", handle.name)
    assert [s.value for s in metrics["gradtel_steps"] if s.labels["optimizer"] == handle.name] == [1]
    assert any(s.labels["optimizer"] == handle.name for s in metrics["gradtel_gradient_global_norm"])


def test_auto_mode_switches_to_layers_past_the_budget():
    small = SeriesPolicy(budget=8)
    large = SeriesPolicy(budget=7)
    handle, _, _ = layered_step("auto-budget")
    records = handle.records()
    assert len(small.select(records).records) == 8
    assert {r.name for r in large.select(records).records} >= {"block0/*", "block1/*", "block2/*", "block3/*"}


@pytest.mark.parametrize(
    ("tf_config", "label", "chief"),
    [
        ({"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "chief", "index": 0}}, "chief:0", True),
        ({"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}, "worker:0", False),
        ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, "worker:0", True),
        ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, "worker:1", False),
    ],
)
def test_worker_identity_and_chief_come_from_tf_config(tf_config, label, chief):
    config = Config.from_env({"TF_CONFIG": json.dumps(tf_config)})
    assert (config.worker.label, config.worker.is_chief) == (label, chief)
    assert config.series.exporting_worker is chief
    assert Config.from_env(
        {"TF_CONFIG": json.dumps(tf_config), "GRADTEL_VARIABLE_SERIES_WORKERS": "all"}
    ).series.exporting_worker
    attributes = config.resource().attributes
    assert attributes["gradtel.task.type"] == label.split(":")[0]


def test_bad_series_settings_say_what_was_expected():
    config = Config.from_env({"GRADTEL_VARIABLE_SERIES": "all"})
    assert config.series.mode == "auto"
    assert [str(p) for p in config.problems] == [
        "gradtel: GRADTEL_VARIABLE_SERIES='all': expected one of auto, variable, layer, topk, none; using the "
        "default, auto."
    ]
    config = Config.from_env({"TF_CONFIG": "{not json"})
    assert config.worker.label == "" and config.worker.is_chief
    assert len(config.problems) == 1 and str(config.problems[0]).startswith(
        "gradtel: TF_CONFIG='{not json': expected JSON like"
    )
    assert Worker.from_tf_config(None).label == ""
