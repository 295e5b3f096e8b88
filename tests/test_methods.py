"""Methods by registry: a toy method with a two-stage list runs through the unchanged driver,
with status, skipping, staleness and selection working from its list."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.methods import CRT, Method, get_method, register_method
from pipeline.runner import run_pipeline, select_stages, stage_status
from pipeline.runtime import Runtime
from pipeline.stage import StageSpec


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """Two stage modules written to a temporary package: `toy_count` writes a metrics record,
    `toy_double` reads it and writes its own."""
    package = tmp_path / "toy_stages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "count.py").write_text(textwrap.dedent('''
        CALLS = []
        def run(ctx):
            CALLS.append(ctx.name)
            ctx.artifacts.metrics.write(ctx.name, {"value": 21})
            return {"metrics": {"value": 21}}
        def expected_outputs(ctx):
            return [ctx.artifacts.metrics.path(ctx.name)]
    '''))
    (package / "double.py").write_text(textwrap.dedent('''
        def run(ctx):
            value = ctx.artifacts.metrics.read("toy_count")["value"] * 2
            ctx.artifacts.metrics.write(ctx.name, {"value": value})
            return {"metrics": {"value": value}}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    method = register_method(Method("toy", (
        StageSpec("toy_count", writes=("metrics",), needs=(), module="toy_stages.count"),
        StageSpec("toy_double", reads=("toy_count",), writes=("metrics",), needs=(), module="toy_stages.double"),
    ), about="a toy"))
    yield method
    for name in [m for m in sys.modules if m.startswith("toy_stages")]:
        del sys.modules[name]


def test_toy_method_runs_through_the_driver(toy_method, tmp_path):
    cfg = load_config(None, [f"work_dir={tmp_path}", "method=toy", "run_name=toy_run", "data.root=/nonexistent"])
    runtime = Runtime(device=torch.device("cpu"))
    plan = select_stages(cfg)
    assert [s.name for s in plan] == ["toy_count", "toy_double"]
    assert run_pipeline(cfg, runtime, plan) == ["toy_count", "toy_double"]
    assert stage_status(cfg, "toy_double", runtime).manifest["metrics"] == {"value": 42}
    assert run_pipeline(cfg, runtime, plan) == []                 # both current: nothing re-runs
    assert run_pipeline(cfg, runtime, plan, force_names=("toy_count",)) == ["toy_count", "toy_double"]
    with pytest.raises(PipelineError, match="unknown stage 'make_cam' for method 'toy'"):
        select_stages(cfg, only=("make_cam",))


def test_unknown_method_and_bad_lists():
    with pytest.raises(PipelineError, match="unknown method 'nope'.*crt"):
        get_method("nope")
    with pytest.raises(ValueError, match="does not come before"):
        register_method(Method("broken", (StageSpec("b", reads=("a",)), StageSpec("a"))))
    assert get_method("crt") is CRT
    assert CRT.stage_names[0] == "train_cam" and CRT.stage_names[-1] == "crf"
