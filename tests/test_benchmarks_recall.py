"""Smoke test of benchmarks/bench_recall.py: the tiny `--quick` configuration in process
(ceiling + one memory configuration, a few steps), on the backend under test; checks that
the table and the PNG are produced."""

import importlib.util
import json
import os
import sys

import keras
import pytest

BENCHMARKS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"
)


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCHMARKS)  # the script imports its sibling `_common`
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_recall", os.path.join(BENCHMARKS, "bench_recall.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(BENCHMARKS)
    return module


def test_bench_recall_quick(bench, tmp_path, capsys):
    png, out = tmp_path / "recall.png", tmp_path / "recall.json"
    rc = bench.main(["--quick", "--in-process", "--png", str(png), "--json", str(out)])
    assert rc == 0
    assert png.exists() and png.stat().st_size > 1000
    records = json.loads(out.read_text())["records"]
    assert {r["config"] for r in records} == {"ceiling", "linear-beta-gate"}
    for record in records:
        result = record["result"]
        assert record["status"] == "ok" and result["backend"] == keras.backend.backend()
        assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
    memory = next(r["result"] for r in records if r["config"] == "linear-beta-gate")
    assert set(memory["accuracy"]) == {"1", "2"}  # both evaluation distances
    printed = capsys.readouterr().out
    assert "| ceiling" in printed and "| linear-beta-gate" in printed


def test_make_batch_layout(bench):
    import numpy as np

    rng = np.random.default_rng(0)
    x, y, w = bench.make_batch(rng, 4, 3, keys=8, values=5, fillers=2, segment_len=8,
                               filler_segments=2, layout="cross")
    assert x.shape == (4, 32, 2) and y.shape == w.shape == (4, 32)
    assert (w.sum(axis=1) == 3).all()
    assert (w[:, :24] == 0).all()  # queries only in the last segment
    query = x[..., 1] == 5  # QUERY value slot
    assert (query == (w > 0)).all()
    for i in range(4):  # every asked key was stored in the first segment with its answer
        stored = {int(k): int(v) for k, v in x[i, :8] if v < 5}
        for t in np.flatnonzero(w[i]):
            assert stored[int(x[i, t, 0])] == y[i, t]


def test_split_gate_init(bench):
    import argparse

    assert bench.split_gate_init(4) == [-2.0, -2.0, 2.0, 2.0]
    assert bench.split_gate_init(3) == [-2.0, 2.0, 2.0]
    args = argparse.Namespace(keys=8, values=5, fillers=2, width=16, heads=4, dim_key=0,
                              segment_len=8, layers=1)
    model = bench.build_model(args, bench.CONFIGS["delta-l2-hard-decay-split"][2])
    gates = bench.gate_values(model.get_layer("block0"))
    assert [round(float(g), 4) for g in gates] == [0.1192, 0.1192, 0.8808, 0.8808]


def test_every_memory_config_reaches_the_layer(bench):
    """Each `CONFIGS` entry's options are the built block's memory options."""
    import argparse

    args = argparse.Namespace(keys=8, values=5, fillers=2, width=16, heads=2, dim_key=0,
                              segment_len=8, layers=1)
    for name, (_, _, options) in bench.CONFIGS.items():
        memory = bench.build_model(args, options).get_layer("block0").attention
        for option, value in options.items():
            if option == "gate_init":
                continue  # "split" is expanded per head; see test_split_gate_init
            assert getattr(memory, option) == value, (name, option)
