"""Every public layer through the shared harness (`tests/harness.py`)."""

import keras
import pytest

from harness import run_layer_test
from keras_infini import CompressiveMemory
from keras_infini import InfiniTransformer
from keras_infini import MoDInfiniTransformer
from keras_infini import RoPEEmbeddings
from keras_infini import YaRNEmbeddings
from keras_infini.layers.activations import ACTIVATION_CLASSES
from keras_infini.layers.activations import ActivationFunction

SHAPE = (2, 10, 8)  # (batch, seq, dim): two segments of 4 and a partial one


@pytest.mark.parametrize("update, causal", [("linear", False), ("delta", True)])
def test_compressive_memory(update, causal, tmp_path):
    run_layer_test(
        CompressiveMemory,
        dict(dim_input=8, dim_key=4, dim_value=4, num_heads=2, segment_len=4, update=update,
             causal=causal, positional_embedder="rope", return_state=True),
        SHAPE, tmp_path, returns_state=True,
    )


def test_infini_transformer(tmp_path):
    run_layer_test(
        InfiniTransformer,
        dict(dim_input=8, dim_hidden=12, dim_key=4, dim_value=4, num_heads=2,
             activation="swiglu", segment_len=4, causal=True, positional_embedder="rope",
             dropout=0.1, return_state=True),
        SHAPE, tmp_path, returns_state=True,
    )


def test_mod_infini_transformer(tmp_path):
    run_layer_test(
        MoDInfiniTransformer,
        dict(dim_input=8, dim_hidden=12, dim_key=4, dim_value=4, num_heads=2,
             activation="gelu", segment_len=4, sampling_factor=2, causal=True,
             positional_embedder="rope", return_state=True, return_router_outputs=True),
        SHAPE, tmp_path, returns_state=True,
    )


def test_rope(tmp_path):
    run_layer_test(RoPEEmbeddings, dict(dim=8), SHAPE, tmp_path)


def test_rope_batch_seq_heads_dim(tmp_path):
    run_layer_test(RoPEEmbeddings, dict(dim=4, dim_embeddings_pct=1.0), (2, 5, 2, 4), tmp_path)


def test_yarn(tmp_path):
    run_layer_test(YaRNEmbeddings, dict(dim=8, context_len=8, context_len_ext=32), SHAPE,
                   tmp_path)


@pytest.mark.parametrize("name", sorted(ACTIVATION_CLASSES))
def test_activation(name, tmp_path):
    run_layer_test(ACTIVATION_CLASSES[name], dict(dim=8), SHAPE, tmp_path)


def test_activation_function(tmp_path):
    run_layer_test(ActivationFunction, dict(function=keras.activations.tanh, dim=8), SHAPE,
                   tmp_path)
