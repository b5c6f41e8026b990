"""Level 0, the basics every other package stands on: user errors, the safe YAML reader, atomic files and
safe loading, processes and devices, progress bars. No torch model code."""

__all__: list[str] = []
