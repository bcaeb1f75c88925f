"""Swap, measure and optimize the order of conv, BatchNorm, activation, pooling and dropout in fastai models

Modules:

- `fastai_order.all`: The names a fastai user calls: `from fastai_order.all import *` (written by hand, not exported from a notebook)."""

__version__ = "0.1.0"
