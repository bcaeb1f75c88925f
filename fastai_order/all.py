"""The names a fastai user calls: `from fastai_order.all import *` (written by hand, not exported from a notebook).

Everything else (the op registry's tables, the fx machinery, the clocks, the results store, the engines, the
benchmarks) is reachable by its module path: `fastai_order.<job>.<module>`, where the job is `model`, `rewrite`,
`timing`, `experiment`, `tools` or `core`. Importing this also adds `Learner.swap_order` and `Learner.optimize_order`,
has `learn.load` warn (`OrderWarning`) when weights saved in one order load into another, has `learn.summary()` list
layers in the order they run, and makes fastai's `WandbCallback` work on fastai 2.8.12."""
from .model.order import LayerOrder, list_presets
from .model.ops import register_act, register_norm, register_norm_act
from .model.record import OrderWarning, saved_orders
from .model.layers import OrderedConvLayer, ordered_xresnet, ordered_cnn, fastai_state_dict
from .rewrite.swap import swap_order, SwapReport
from .rewrite.commute import commutes, rules_table, equivalent_orders, cheapest_equivalent, order_cost
from .rewrite.optimize import optimize_order, OptimizeReport
from .timing.batch_timer import BatchTimer
from .timing.layer_timer import LayerTimer
from .timing.paired import paired_times, paired_ratios
from .timing import wandb as _wandb   # fixes fastai's WandbCallback on import
from .experiment.data import get_dls
from .experiment.run import RunConfig, train_run
from .experiment.results import RunsFolder
from .experiment.stats import order_stats
from .experiment.report import Comparison
from .experiment.compare import compare_orders

__all__ = ['LayerOrder', 'list_presets', 'register_act', 'register_norm', 'register_norm_act', 'OrderWarning', 'saved_orders',
           'OrderedConvLayer', 'ordered_xresnet', 'ordered_cnn', 'fastai_state_dict',
           'swap_order', 'SwapReport', 'commutes', 'rules_table', 'equivalent_orders', 'cheapest_equivalent', 'order_cost',
           'optimize_order', 'OptimizeReport', 'BatchTimer', 'LayerTimer', 'paired_times', 'paired_ratios',
           'get_dls', 'RunConfig', 'train_run', 'RunsFolder', 'order_stats', 'Comparison', 'compare_orders']
