"""CompressiveMemory on torch against a vectorised pure-PyTorch Infini-attention layer.

The reference (`TorchInfiniAttention` below) is what a PyTorch user would write by hand:
`nn.Linear` projections, segments folded into the batch, PyTorch's fused
`scaled_dot_product_attention` (causal) inside each segment, and the `linear` memory as an
exclusive cumulative sum over segments (ELU + 1 feature map, the paper's retrieval and
per-head sigmoid gate). It copies the Keras layer's weights, so both compute the same
function (the script checks the outputs agree before timing). The two are called alternately,
so both see the same machine load.

Measured per sequence length, in this one process (so both sides see the same machine
state), on the torch backend only: the median wall time of a forward + backward pass
(`loss = mean(out ** 2)`, gradients for inputs and weights) over `--repeats` calls after
one warm-up call. Model: width 256, 4 heads of 64, segment 256, batch 2, float32.

Usage:

    KERAS_BACKEND=torch .venv/bin/python benchmarks/bench_torch_reference.py \\
        --lengths 4096,16384 --repeats 7
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from keras_infini.layers.compressive_memory import CompressiveMemory  # noqa: E402

BATCH, DIM, HEADS, HEAD_DIM, SEGMENT = 2, 256, 4, 64, 256


class TorchInfiniAttention(torch.nn.Module):
    """Causal Infini-attention with the `linear` memory, vectorised over segments."""

    def __init__(self, dim, heads, head_dim, segment):
        super().__init__()
        self.h, self.d, self.s = heads, head_dim, segment
        self.q = torch.nn.Linear(dim, heads * head_dim, bias=False)
        self.k = torch.nn.Linear(dim, heads * head_dim, bias=False)
        self.v = torch.nn.Linear(dim, heads * head_dim, bias=False)
        self.o = torch.nn.Linear(heads * head_dim, dim, bias=False)
        self.gate = torch.nn.Parameter(torch.zeros(heads))

    def forward(self, x):
        b, length, _ = x.shape
        n = length // self.s

        def heads(t):  # (b, L, h*d) -> (b*n, h, S, d)
            return t.view(b * n, self.s, self.h, self.d).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        local = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        sq, sk = F.elu(q) + 1.0, F.elu(k) + 1.0
        sq, sk, v5 = (t.view(b, n, self.h, self.s, self.d) for t in (sq, sk, v))
        updates = torch.einsum("bnhsk,bnhsv->bnhkv", sk, v5)
        memory = torch.cumsum(updates, 1) - updates  # state before each segment
        norm_updates = sk.sum(3)
        norm = torch.cumsum(norm_updates, 1) - norm_updates
        num = torch.einsum("bnhsk,bnhkv->bnhsv", sq, memory)
        den = torch.einsum("bnhsk,bnhk->bnhs", sq, norm)[..., None] + 1e-6
        gate = torch.sigmoid(self.gate)[:, None, None]
        mixed = gate * (num / den) + (1 - gate) * local.view(b, n, self.h, self.s, self.d)
        out = mixed.permute(0, 1, 3, 2, 4).reshape(b, length, self.h * self.d)
        return self.o(out)


def copy_weights(layer, module):
    """Keras EinsumDense kernels `(D, h, d)` / `(h, d, D)` -> `nn.Linear` weights."""
    with torch.no_grad():
        for name, dense in (("q", layer.query_dense), ("k", layer.key_dense),
                            ("v", layer.value_dense)):
            kernel = keras.ops.convert_to_numpy(dense.kernel).reshape(DIM, -1)
            getattr(module, name).weight.copy_(torch.from_numpy(kernel.T.copy()))
        kernel = keras.ops.convert_to_numpy(layer.output_dense.kernel).reshape(-1, DIM)
        module.o.weight.copy_(torch.from_numpy(kernel.T.copy()))
        module.gate.copy_(torch.from_numpy(keras.ops.convert_to_numpy(layer.gate)))


def time_steps(fns, x, repeats):
    """Median forward + backward time of each of `fns`, calls interleaved so that both see
    the same machine load."""

    def step(fn):
        x.grad = None
        start = time.perf_counter()
        out = fn(x)
        (out ** 2).mean().backward()
        return time.perf_counter() - start

    times = [[] for _ in fns]
    for fn in fns:
        step(fn)  # warm-up
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            bucket.append(step(fn))
    return [statistics.median(bucket) for bucket in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if keras.backend.backend() != "torch":
        raise SystemExit("Run with KERAS_BACKEND=torch.")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, keras "
          f"{keras.__version__}; width {DIM}, {HEADS} heads of {HEAD_DIM}, segment "
          f"{SEGMENT}, batch {BATCH}, causal linear; forward + backward, median of "
          f"{args.repeats}")
    print("| tokens | keras_infini (s) | pure torch + SDPA (s) | ratio (torch / ours) |")
    print("|---:|---:|---:|---:|")
    for length in (int(v) for v in args.lengths.split(",")):
        keras.utils.set_random_seed(0)
        layer = CompressiveMemory(DIM, HEAD_DIM, HEAD_DIM, HEADS, SEGMENT, update="linear",
                                  causal=True)
        layer.build((BATCH, length, DIM))
        # A gate away from 0.5 so both halves of the output count in the check.
        layer.gate.assign(np.linspace(-1.0, 1.0, HEADS).astype("float32"))
        module = TorchInfiniAttention(DIM, HEADS, HEAD_DIM, SEGMENT)
        copy_weights(layer, module)
        x = torch.randn(BATCH, length, DIM, requires_grad=True)
        with torch.no_grad():
            diff = (layer(x) - module(x)).abs().max().item()
        if diff > 1e-3:
            raise SystemExit(f"outputs differ by {diff:.2e} at {length} tokens")
        ours, reference = time_steps((layer, module), x, args.repeats)
        print(f"| {length} | {ours:.3f} | {reference:.3f} | {reference / ours:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
