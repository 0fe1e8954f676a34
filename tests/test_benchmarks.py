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
