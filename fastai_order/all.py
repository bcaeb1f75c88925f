"The public API: `from fastai_order.all import *` (not exported from a notebook; edit by hand)."
from .order import *
from .layers import *
from .swap import *
from .bench import *
