"""memplan: will this fine-tune fit in GPU memory, on which GPU, with which settings, and how sure are we."""

__version__ = "0.1.0"
