"""Level 10, what a user reads or takes away: the table, the Pareto plot, profile printing, the dry-run
preview, and export to formats that load without lrx."""

__all__: list[str] = []
