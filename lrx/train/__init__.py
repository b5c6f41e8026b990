"""Level 8, training: the one epoch loop, baseline training, and the fine-tuning stages."""

__all__: list[str] = []
