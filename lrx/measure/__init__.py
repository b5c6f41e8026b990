"""Level 5, measurement: the clock behind every time (interleaved repeats, spread, noise) and a run's
profile (ptflops counts, whole-model and per-layer times)."""

__all__: list[str] = []
