"""Smoke test of benchmarks/bench_attention.py: one tiny configuration end to end (parent
process + child subprocess, on the backend under test), so the script the README's tables
come from keeps working."""

import argparse
import importlib.util
import json
import os
import subprocess
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
            "bench_attention", os.path.join(BENCHMARKS, "bench_attention.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(BENCHMARKS)
    return module


def test_bench_attention_runs_one_grouped_configuration(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    # 512 tokens in groups of 256 (one segment each): the grouped path of the layer.
    rc = bench.main(
        ["--lengths", "512", "--layers", "cm-delta", "--repeats", "1",
         "--group-tokens", "256", "--json", str(out)]
    )
    assert rc in (0, None)
    data = json.loads(out.read_text())
    assert data["settings"]["group_tokens"] == 256
    (record,) = data["records"]
    assert record["status"] == "ok", record
    result = record["result"]
    assert result["env"]["backend"] == keras.backend.backend()
    assert result["forward_finite"] and result["losses_finite"]
    assert result["train_s"] > 0 and result["forward_s"] > 0
    printed = capsys.readouterr().out
    assert "group_tokens: 256" in printed
    assert "| cm-delta" in printed
    # the JSON records its run, and scripts/docs_tables.py turns it into a docs table
    assert "bench_attention.py --lengths 512" in data["run"]["command"]
    assert data["run"]["date"] and data["run"]["machine"]
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "scripts", "docs_tables.py")
    table = subprocess.run([sys.executable, script, "attention", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "| cm-delta" in table.stdout and "Command: `KERAS_BACKEND=" in table.stdout


@pytest.mark.parametrize(
    "text,want", [("auto", "auto"), ("none", None), ("2048", 2048)]
)
def test_group_tokens_option(bench, text, want):
    assert bench.parse_args(["--group-tokens", text]).group_tokens == want


@pytest.mark.parametrize("text", ["0", "-5", "big"])
def test_group_tokens_option_rejects_bad_values(bench, text):
    with pytest.raises(argparse.ArgumentTypeError, match="--group-tokens"):
        bench.group_tokens_arg(text)


def _profile_ops(*args):
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    return subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "profile_ops.py"), *args],
        capture_output=True, text=True, env=env, timeout=600,
    )


def test_profile_ops_reports_kernels_and_dots():
    """benchmarks/profile_ops.py (the tables of docs/benchmarks/attention.md on JAX against
    TensorFlow-XLA): a kernel profile of a tiny train step and the dots report, or a clear
    refusal on PyTorch (no XLA)."""
    kernels = _profile_ops("--report", "kernels", "--length", "512", "--steps", "1",
                           "--top", "5")
    dots = _profile_ops("--report", "dots", "--length", "512")
    if keras.backend.backend() == "torch":
        assert kernels.returncode != 0 and "needs KERAS_BACKEND=jax or tensorflow" in (
            kernels.stderr)
        assert dots.returncode != 0 and "needs KERAS_BACKEND=jax or tensorflow" in dots.stderr
        return
    assert kernels.returncode == 0, kernels.stderr[-2000:]
    rows = [line for line in kernels.stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| kernel", "| ---"))]
    assert 1 <= len(rows) <= 5, kernels.stdout
    for row in rows:  # XLA kernels (fusions, dots, copies), not host frames
        name, ms = [cell.strip() for cell in row.strip("|").split("|")]
        assert " " not in name and "::" not in name and float(ms) >= 0.0
    assert dots.returncode == 0, dots.stderr[-2000:]
    products = {line.split("|")[1].strip(): line.split("|")[3].strip()
                for line in dots.stdout.splitlines() if line.startswith("| ")
                and not line.startswith(("| product", "| ---"))}
    assert set(products) == {"scores q k^T", "probs v", "projection"}
    assert set(products.values()) <= {"ynn", "eigen"}
