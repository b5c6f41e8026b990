"""Level 2, the settings: typed dataclasses read from YAML, and every check that needs no model."""

__all__: list[str] = []
