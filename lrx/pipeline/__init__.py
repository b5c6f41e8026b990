"""Level 9, runs: the run directory, what each stage does, and the runner (dependencies, stage hashes,
skip and redo)."""

__all__: list[str] = []
