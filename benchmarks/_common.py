"""Shared helpers for the keras_infini benchmarks.

- FLOP formulas (`compressive_memory_flops`, `mha_flops`, `TRAIN_FLOPS_FACTOR`);
- the float32 matmul ceiling of the machine (`measure_matmul_gflops`), used for MFU;
- peak resident memory of the current process (`peak_rss_mib`);
- running one configuration in its own subprocess (`run_child`, `emit_result`);
- environment description (`environment_info`, `cpu_model`) and formatting helpers
  (`markdown_table`, `fmt_seconds`, ...).

Nothing here imports Keras at module import time: the parent process of a benchmark stays
light, and only the child processes load a backend.

FLOP conventions (model FLOPs, not what a given implementation executes):

- a matmul of `(m, k) @ (k, n)` counts `2 * m * n * k`; elementwise work (softmax, ELU,
  gating, masking, the division by the normaliser) is not counted;
- attention score and value matmuls are counted in full: `S x S` per segment for
  CompressiveMemory and `L x L` for MultiHeadAttention, *not* halved for causal masking;
- a train step (forward + backward + update) counts `TRAIN_FLOPS_FACTOR = 3` times the
  forward FLOPs (the usual approximation: backward ~ 2 x forward).
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# Marker that starts the one JSON line a child prints on stdout.
RESULT_MARKER = "BENCH_RESULT "

# Train step FLOPs = TRAIN_FLOPS_FACTOR x forward FLOPs (backward ~ 2 x forward).
TRAIN_FLOPS_FACTOR = 3


# --------------------------------------------------------------------------- FLOPs
def compressive_memory_flops(batch, length, dim, heads, dim_key, dim_value, segment_len,
                             update="linear"):
    """Forward model FLOPs of `CompressiveMemory` (matmuls only, `2*m*n*k` each).

    With `B, L, D, H, dk, dv, S` = batch, length, dim_input, heads, dim_key, dim_value,
    segment_len (`L` is the number of real tokens; padding to whole segments is not
    counted):

        projections Q, K, V   2*B*L*D*H*(2*dk + dv)
        output projection     2*B*L*H*dv*D
        local attention       2*B*L*S*H*(dk + dv)    full S x S per segment (not halved)
        memory retrieval      2*B*L*H*dk*dv  +  normaliser 2*B*L*H*dk
        memory update         linear: 2*B*L*H*dk*dv  (sigma(K)^T V)
                              delta:  4*B*L*H*dk*dv  (sigma(K) M_{s-1}, then sigma(K)^T (V - .))

    The delta rule's key normaliser (`sigma(K) z`, 2*B*L*H*dk) is not counted (it is
    1/dv of the retrieval term). Implementation-specific extra work (e.g. the log-depth
    associative scan TensorFlow uses for `delta`) is not counted either: MFU measures
    useful work.
    """
    if update not in ("linear", "delta"):
        raise ValueError(f"Unknown update={update!r}")
    tokens = batch * length
    projections = 2 * tokens * dim * heads * (2 * dim_key + dim_value)
    output = 2 * tokens * heads * dim_value * dim
    local = 2 * tokens * segment_len * heads * (dim_key + dim_value)
    retrieval = 2 * tokens * heads * dim_key * dim_value + 2 * tokens * heads * dim_key
    memory_update = (2 if update == "linear" else 4) * tokens * heads * dim_key * dim_value
    return projections + output + local + retrieval + memory_update


def mha_flops(batch, length, dim, heads, key_dim):
    """Forward model FLOPs of `keras.layers.MultiHeadAttention` self-attention over `L` tokens.

    Projections Q, K, V (value_dim = key_dim) and output: `2*B*L*D*H*dk*3 + 2*B*L*H*dk*D`;
    attention scores and weighted values over the full `L x L` (not halved for causal):
    `2*B*L*L*H*2*dk`.
    """
    tokens = batch * length
    projections = 2 * tokens * dim * heads * key_dim * 3 + 2 * tokens * heads * key_dim * dim
    attention = 2 * tokens * length * heads * 2 * key_dim
    return projections + attention


# --------------------------------------------------------------------------- machine
def measure_matmul_gflops(n=2048, runs=5, warmup=2):
    """Float32 matmul throughput of the current Keras backend, in GFLOP/s.

    Times `keras.ops.matmul` of two `(n, n)` float32 matrices (`2*n^3` FLOPs), forcing
    completion by converting the result to NumPy; returns the median over `runs` timed
    calls after `warmup` untimed ones, plus the individual timings.
    """
    import numpy as np
    import keras

    rng = np.random.default_rng(0)
    a = keras.ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32))
    b = keras.ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32))
    for _ in range(warmup):
        keras.ops.convert_to_numpy(keras.ops.matmul(a, b))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        keras.ops.convert_to_numpy(keras.ops.matmul(a, b))
        times.append(time.perf_counter() - start)
    flops = 2.0 * n ** 3
    return flops / statistics.median(times) / 1e9, [flops / t / 1e9 for t in times]


def peak_rss_mib():
    """Peak resident set size of this process so far, in MiB (`getrusage(RUSAGE_SELF)`)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def cpu_model():
    """The CPU model name from /proc/cpuinfo (falls back to `platform.processor()`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores():
    """Cores this process may run on (affinity where available), and `os.cpu_count()`."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return usable, os.cpu_count()


def backend_version(backend):
    """Version string of the installed backend package (imports it)."""
    if backend == "jax":
        import jax

        return jax.__version__
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.__version__
    if backend == "torch":
        import torch

        return torch.__version__
    return "unknown"


# Distribution names to try for each backend's version (without importing it).
BACKEND_PACKAGES = {
    "jax": ("jax",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "torch": ("torch",),
}


def installed_version(*distributions):
    """Version of the first installed distribution among `distributions` (no import), or '?'."""
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "?"


def environment_info():
    """Backend, versions, CPU model and core counts of the current process (imports Keras)."""
    import keras

    backend = keras.backend.backend()
    usable, total = usable_cores()
    return {
        "backend": backend,
        "keras_version": keras.__version__,
        "backend_version": backend_version(backend),
        "python_version": platform.python_version(),
        "cpu_model": cpu_model(),
        "cores_usable": usable,
        "cores_total": total,
    }


# --------------------------------------------------------------------------- timing
def time_repeats(fn, repeats, max_total_s=None, long_step_s=20.0):
    """Calls `fn()` up to `repeats` times and returns the list of wall-clock durations.

    Stops early (after at least one call) once a call took longer than `long_step_s`, or
    once the calls so far took more than `max_total_s` in total. `fn` must block until
    its work is complete (e.g. return a NumPy value).
    """
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if times[-1] > long_step_s:
            break
        if max_total_s is not None and sum(times) > max_total_s:
            break
    return times


# --------------------------------------------------------------------------- subprocesses
def emit_result(result):
    """Prints `result` (a JSON-serialisable dict) as the child's one result line."""
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_child(argv, timeout_s, env=None):
    """Runs `argv` in a subprocess and returns `(status, result, info)`.

    `status` is `"ok"` (a result line was found and the child exited with 0), `"timeout"`
    (killed after `timeout_s` seconds) or `"crash"` (non-zero exit, killed by a signal, e.g.
    the OOM killer, or no result line). `result` is the decoded JSON dict or None. `info`
    holds `rc`, `wall_s` and the tail of the child's stderr (for diagnosing failures).
    The child runs in its own process group so that a timeout also ends its helpers.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        return "timeout", None, {
            "rc": proc.returncode,
            "wall_s": time.perf_counter() - start,
            "stderr_tail": (err or "")[-2000:],
        }
    info = {
        "rc": proc.returncode,
        "wall_s": time.perf_counter() - start,
        "stderr_tail": (err or "")[-2000:],
    }
    result = None
    for line in (out or "").splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
    if proc.returncode != 0 or result is None:
        return "crash", result, info
    return "ok", result, info


# --------------------------------------------------------------------------- formatting
def markdown_table(headers, rows):
    """A GitHub markdown table (list of lines) with columns padded for plain-text reading."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    out = [line(headers), "| " + " | ".join("-" * w for w in widths) + " |"]
    out.extend(line(row) for row in cells)
    return out


def fmt_seconds(t):
    """Seconds with 3 significant digits (`0.0123`, `1.23`, `123`)."""
    if t is None:
        return "-"
    if t >= 100:
        return f"{t:.0f}"
    return f"{t:.3g}"


def fmt_rate(x):
    """An integer rate with thousands separators."""
    return "-" if x is None else f"{x:,.0f}"


def fmt_percent(x):
    """A fraction as a percentage (`0.1234` -> `12.3%`; small values keep 2 significant digits)."""
    if x is None:
        return "-"
    pct = 100.0 * x
    return f"{pct:.1f}%" if pct >= 10 else f"{pct:.2g}%"


def fmt_length(n):
    """Sequence length as `1K`, `4K`, `64K` when a multiple of 1024, else the number."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def run_info(script, argv=None):
    """Command, date, machine and backend of this benchmark run (recorded in its JSON);
    `argv`: the arguments the script parsed (default: the command line)."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    args = " ".join(sys.argv[1:] if argv is None else argv)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{len(names)} x {names[0]}"
    except OSError:
        pass
    return {
        "command": f"KERAS_BACKEND={backend} python benchmarks/{script} {args}".rstrip(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.system()} {cpu}",
        "backend": backend,
    }
