"""keras-hub argument names accepted next to the PyTorch project's (`dim_input`, ...)."""

import functools
import inspect

# keras-hub name -> this library's (and the PyTorch project's) name.
KERAS_HUB_NAMES = {
    "hidden_dim": "dim_input",
    "intermediate_dim": "dim_hidden",
    "key_dim": "dim_key",
    "value_dim": "dim_value",
}


def keras_hub_names(init):
    """Decorates a layer's `__init__` so that keras-hub's names (`hidden_dim`,
    `intermediate_dim`, `key_dim`, `value_dim`; `num_heads` is shared) may be given as
    keywords for the parameters it has (`dim_input`, `dim_hidden`, `dim_key`,
    `dim_value`). The layer and its config keep the original names; giving both names of
    one parameter is a ValueError naming both."""
    params = list(inspect.signature(init).parameters)[1:]
    aliases = {alias: name for alias, name in KERAS_HUB_NAMES.items() if name in params}

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for alias, name in aliases.items():
            if alias not in kwargs:
                continue
            value = kwargs.pop(alias)
            if name in kwargs or params.index(name) < len(args):
                given = kwargs.get(name, args[params.index(name)] if params.index(name)
                                   < len(args) else None)
                raise ValueError(
                    f"Invalid {alias}={value!r} together with {name}={given!r}: {alias} is "
                    f"keras-hub's name for {name}; pass one of them."
                )
            kwargs[name] = value
        return init(self, *args, **kwargs)

    # The original signature for every reader (Keras' `Operation.__new__` reads it both
    # with and without following `__wrapped__`; MoDInfiniTransformer reads the block's).
    del __init__.__wrapped__
    __init__.__signature__ = inspect.signature(init)
    return __init__
