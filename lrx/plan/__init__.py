"""Level 6, rank planners: ranks from a MACs or speedup target, and from a latency target measured on
the device."""

__all__: list[str] = []
