"""pytest configuration at the repository root (outside the package, so the wheel does not
ship it), for `pytest --doctest-modules keras_infini`: without keras-hub the optional
`keras_infini.models` package is skipped instead of failing to import."""

try:
    import keras_hub  # noqa: F401
except ImportError:
    collect_ignore_glob = ["keras_infini/models/*"]
