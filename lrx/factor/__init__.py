"""Level 1, the math: factorisations of weight tensors (the seed's filter reconstruction, scheme 2's SVD)
and fits to a layer's outputs on data. Tensors in, factors out; no modules are built here."""

__all__: list[str] = []
