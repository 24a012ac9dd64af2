"""Names of selection methods (``select.method``) shared by the config schema and d2c.select,
in a module that imports nothing (so d2c.select stays importable without pydantic)."""

#: The methods that choose by per-image visual features (docs/method.md, Baselines).
FEATURE_METHODS = ("kcenter", "herding")
