"""Runs every Python code block of README.md and docs/ (one test per block, every backend).

A block is a fenced block tagged `python` (the fence at the start of a line). HTML comments
just before it (invisible on GitHub and in the built site) adjust how it is run; they are
the only mechanism, the shown code is never edited for the test:

- `<!-- test: substitute "OLD" "NEW" -->` (each marker at the start of a line): replace OLD by NEW before running (tiny sizes;
  OLD must occur in the block). Repeatable.
- `<!-- test: prelude` ... `-->`: hidden setup code run first, in the block's namespace
  (the objects a fragment refers to).
- `<!-- test: backends jax -->`: run only on these backends (skipped elsewhere).
- `<!-- test: subprocess -->`: run in a fresh Python process (blocks that must set
  `XLA_FLAGS` or the backend before JAX starts).
- `<!-- test: skip REASON -->`: never run; the page must also show the reason in a visible
  line starting with `*Not run by the tests:` between the marker and the block.

A block shown twice (same code and markers: the README's causal LM is also in the
generation guide) runs once. Each block runs alone (own namespace) in a temporary working directory; environment
variables, the Keras distribution and dtype policy are restored afterwards.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
MARKER = re.compile(r"^<!-- test: (\w+)(.*?)-->", re.S | re.M)  # at a line start
FENCE = re.compile(r"^```(\S*)\s*$")


def parse(path):
    """[(line, code, markers)] of the file's python blocks; markers {kind: [args]}."""
    text = path.read_text()
    lines = text.splitlines()
    blocks, pending, i = [], [], 0
    # marker comments by starting line
    markers = {}
    for m in MARKER.finditer(text):
        markers[text.count("\n", 0, m.start())] = (m.group(1), m.group(2),
                                                   text.count("\n", 0, m.end()))
    while i < len(lines):
        if i in markers:
            kind, arg, end = markers[i]
            pending.append((i + 1, kind, arg))
            i = end + 1
            continue
        m = FENCE.match(lines[i])
        if m:
            lang, start = m.group(1), i
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            if lang.startswith("py"):
                assert lang == "python", f"{path.name}:{start + 1}: tag blocks `python`"
                blocks.append((start + 1, "\n".join(lines[start + 1:i]) + "\n",
                               _markers(path, pending, lines, start)))
            else:
                assert not pending, f"{path.name}:{pending[0][0]}: marker before a " \
                                    f"non-python block"
            pending = []
        i += 1
    assert not pending, f"{path.name}:{pending[0][0]}: marker without a following block"
    return blocks


def _markers(path, pending, lines, fence_line):
    out = {"substitute": [], "prelude": [], "backends": [], "subprocess": [], "skip": []}
    for line, kind, arg in pending:
        where = f"{path.name}:{line}"
        assert kind in out, f"{where}: unknown marker {kind!r}"
        if kind == "substitute":
            pair = shlex.split(arg)
            assert len(pair) == 2, f"{where}: substitute takes \"OLD\" \"NEW\""
            out[kind].append(tuple(pair))
        elif kind == "prelude":
            out[kind].append(arg.strip("\n") + "\n")
        elif kind == "backends":
            out[kind].extend(arg.split())
        elif kind == "skip":
            reason = arg.strip()
            assert reason, f"{where}: skip needs a reason"
            shown = "\n".join(lines[line:fence_line])
            assert "*Not run by the tests:" in shown, \
                f"{where}: show the reason (`*Not run by the tests: ...*`) above the block"
            out[kind].append(reason)
        else:
            out[kind].append(True)
    return out


ALL_BLOCKS = [(path, line, code, marks) for path in DOC_FILES
              for line, code, marks in parse(path)]


def _unique(blocks):
    """A block shown on several pages with the same code and markers runs once (under its
    first location); the others are listed in `test_blocks_found`."""
    seen, out = set(), []
    for block in blocks:
        key = (block[2], repr(block[3]))
        if key not in seen:
            seen.add(key)
            out.append(block)
    return out


BLOCKS = _unique(ALL_BLOCKS)


def _id(block):
    path, line = block[0], block[1]
    return f"{path.relative_to(ROOT)}:{line}"


def _source(code, marks, where):
    for old, new in marks["substitute"]:
        assert old in code, f"{where}: substitute {old!r} not found in the block"
        code = code.replace(old, new)
    return "".join(marks["prelude"]) + code


@pytest.fixture
def clean_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    environ = dict(os.environ)
    policy = keras.config.dtype_policy()
    yield tmp_path
    os.environ.clear()
    os.environ.update(environ)
    keras.config.set_dtype_policy(policy)
    keras.distribution.set_distribution(None)
    keras.backend.clear_session()


def test_blocks_found():
    """Every page parses (markers well formed) and the known blocks are all there."""
    assert (len(ALL_BLOCKS), len(BLOCKS)) == (12, 11), "update the counts in docs/testing.md"
    assert sum(1 for b in BLOCKS if b[0].name == "README.md") == 3


@pytest.mark.parametrize("block", BLOCKS, ids=_id)
def test_doc_block(block, clean_state):
    path, line, code, marks = block
    where = _id(block)
    if marks["skip"]:
        pytest.skip(f"{where}: {marks['skip'][0]}")
    backend = keras.backend.backend()
    if marks["backends"] and backend not in marks["backends"]:
        pytest.skip(f"{where}: runs on {', '.join(marks['backends'])} only")
    source = _source(code, marks, where)
    if marks["subprocess"]:
        script = clean_state / "block.py"
        script.write_text(source)
        env = dict(os.environ, KERAS_BACKEND=backend,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                            os.environ.get("PYTHONPATH")])))
        run = subprocess.run([sys.executable, str(script)], cwd=clean_state, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{where} failed:\n{run.stdout[-3000:]}\n" \
                                    f"{run.stderr[-5000:]}"
        return
    exec(compile(source, where, "exec"), {"__name__": "__docs__"})


def test_readme_is_a_front_page():
    """The README stays short (the details live in docs/) and its relative links resolve."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert local, "expected links into docs/"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
