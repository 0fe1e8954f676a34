"""JAX fast paths (see `keras_infini.ops.backend`)."""

import jax
import keras


def compile_inference(fn, variables):
    """`jax.jit` of `fn` with the variables' values as arguments (read at every call)."""

    def pure(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    jitted = jax.jit(pure)

    def run(*args):
        return jitted([variable.value for variable in variables], *args)

    return run


def compiled_when_eager(fn, static_argnames):
    """`jax.jit(fn)` for calls outside a trace, `fn` itself inside one (see the package)."""
    jitted = jax.jit(fn, static_argnames=static_argnames)

    def run(*args, **kwargs):
        leaves = jax.tree_util.tree_leaves((args, kwargs))
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return fn(*args, **kwargs)
        return jitted(*args, **kwargs)

    return run


def sequence_shard_map(fn, sharded, replicated, sequence):
    """`fn` per shard of `sequence.seq_dim` through `jax.shard_map`, manual over that
    mesh axis only: the batch and model axes stay automatic (XLA's partitioner keeps
    their shardings). `sharded` tensors are split on axis 1; `replicated` ones and the
    second group of outputs are the same on every shard (`gather` is `all_gather`)."""
    from jax.sharding import PartitionSpec

    # `all_gather_invariant` (Varying -> Invariant; JAX 0.10 keeps it in `jax._src`) lets
    # the composed final state be declared replicated over the axis (out_specs `P()`)
    # with `check_vma` on; its transpose is a slice of the summed cotangents.
    # If a JAX version has neither, the caller falls back to the annotated keras.ops path.
    gather = getattr(jax.lax, "all_gather_invariant", None)
    if gather is None:
        try:
            from jax._src.lax.parallel import all_gather_invariant as gather
        except ImportError:
            raise NotImplementedError from None

    axis = sequence.seq_dim
    mesh = sequence.device_mesh.backend_mesh
    shards = int(mesh.shape[axis])
    split = PartitionSpec(None, axis)
    whole = PartitionSpec()

    def body(local, same):
        index = jax.lax.axis_index(axis)
        return fn(index, shards, lambda t: gather(t, axis), local, same)

    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(split, whole),
        out_specs=(split, whole),
        axis_names=frozenset({axis}),
    )
    return mapped(tuple(sharded), tuple(replicated))


def is_traced(x):
    return isinstance(x, jax.core.Tracer)


def branch_is_free(x):
    return is_traced(x) or all(d.platform == "cpu" for d in x.devices())
