"""Level 3, the data: datasets as uint8 images, batches resized and normalised on the device."""

__all__: list[str] = []
