"""Level 5, measurement: the clock behind every time (interleaved repeats, spread, noise), a run's
profile (ptflops counts, whole-model and per-layer times), and how sure an accuracy is (intervals)."""

__all__: list[str] = []
