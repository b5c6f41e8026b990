"""Level 7, model in, expanded model out: :func:`lrx.expansion.model.expand` plans the ranks and fits the
factors (to the filters, or to calibration data)."""

__all__: list[str] = []
