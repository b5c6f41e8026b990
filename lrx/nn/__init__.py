"""Level 4, the modules: the expansion layers, their fast inference paths, models by name, and the
surgery that finds a model's convs and rebuilds an expansion's structure."""

__all__: list[str] = []
