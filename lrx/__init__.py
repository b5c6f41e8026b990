"""lrx: low-rank expansions that make convolutional networks faster (Jaderberg et al., BMVC 2014)."""

__version__ = "0.1.0"
