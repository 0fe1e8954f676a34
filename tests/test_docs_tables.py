"""scripts/docs_tables.py on synthetic benchmark results (no benchmark is run)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "docs_tables.py")
RUN = {"command": "KERAS_BACKEND=jax python benchmarks/bench_x.py", "date": "2026-12-07",
       "machine": "Linux 2 x AMD EPYC", "backend": "jax"}


def _run(*args):
    out = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _page(tmp_path, name):
    page = tmp_path / "page.md"
    page.write_text(f"# Page\n\ntext\n\n<!-- docs_tables: {name} -->\nold table\n"
                    "<!-- /docs_tables -->\n\nafter\n")
    return page


def test_attention_table(tmp_path):
    result = dict(train_first_s=1.5, forward_s=0.25, forward_tok_s=8192.0, forward_mfu=0.5,
                  train_s=0.75, train_tok_s=2730.0, train_mfu=0.4, peak_rss_mib=900.0)
    payload = {"settings": {"rope": False},
               "records": [{"layer": "cm-linear", "length": 1024, "status": "ok",
                            "result": result},
                           {"layer": "mha", "length": 65536, "status": "skipped",
                            "message": "skipped: quadratic"}],
               "run": RUN}
    path = tmp_path / "attention.json"
    path.write_text(json.dumps(payload))
    page = _page(tmp_path, "attention-jax")
    _run("attention", str(path), "--page", str(page), "--name", "attention-jax")
    text = page.read_text()
    assert "old table" not in text and text.endswith("<!-- /docs_tables -->\n\nafter\n")
    assert f"`{RUN['command']}`" in text and "2026-12-07" in text and "AMD EPYC" in text
    assert "| cm-linear" in text and "skipped: quadratic" in text


def test_generate_table(tmp_path):
    path = tmp_path / "generate.jsonl"
    with open(path, "w") as f:
        for prompt in (1024, 32768):
            f.write(json.dumps(dict(model="infini", batch=1, prompt=prompt, new=256,
                                    prefill=0.02, total=0.09, per_token=0.00027,
                                    step=None, run=RUN)) + "\n")
    text = _run("generate", str(path))
    assert text.count("| jax") == 2 and "| 32768 " in text and "3,704" in text
    assert "Command: `KERAS_BACKEND=jax" in text and "Date: 2026-12-07" in text
