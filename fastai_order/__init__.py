"""Swap, measure and optimize the order of conv, BatchNorm, activation, pooling and dropout in fastai models

Modules:

- `fastai_order.all`: The names a fastai user calls: `from fastai_order.all import *` (written by hand, not exported from a notebook)."""

__version__ = "0.1.0"

import logging as _logging, warnings as _warnings
# fastai's own modules call `torch.jit.script` at import, which torch deprecates: nothing a user of this package can act on
_warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
# torch logs that a CUDA toolkit was found but no GPU when it loads its compiler (torch.compile, torch.utils.benchmark):
# on a CPU-only machine nothing to act on
_logging.getLogger('torch.utils.cpp_extension').addFilter(lambda r: not r.getMessage().startswith('No CUDA runtime is found'))
