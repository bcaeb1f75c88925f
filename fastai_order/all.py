"The public API: `from fastai_order.all import *` (not exported from a notebook; edit by hand)."
from .cli import *
from .clock import *
from .order import *
from .layers import *
from .swap import *
from .commute import *
from .optimize import *
from .data import *
from .run import *
from .results import *
from .report import *
from .compare import *
from .timing import *
from .layer_timer import *
from .wandb import *
from .bench import *
