"""distill: turn a pretrained Transformer into a fast SSD (Mamba-2) or hybrid student, MOHAWK-style."""

__version__ = "0.1.0"
