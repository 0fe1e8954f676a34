"""Root pytest configuration: `pytest --doctest-modules keras_infini` without keras-hub
skips the optional keras-hub models package instead of failing to import it."""

try:
    import keras_hub  # noqa: F401
except ImportError:
    collect_ignore_glob = ["keras_infini/models/*"]
