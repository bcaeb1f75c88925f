"LayerTimer on torchvision's and timm's models: in-place activations timed backward, norm+act modules timed by op before and after a swap, the roles adding up to BatchTimer's forward and backward."
import pytest, torch, torchvision, timm
from torch import nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
import fastai.callback.progress  # Learner.no_bar
from fastai_order.tools.synthetic import synthetic_dls
from fastai_order.model.ops import module_role, _NORM_PART_HOOKS
from fastai_order.rewrite.swap import swap_order
from fastai_order.timing.batch_timer import BatchTimer
from fastai_order.timing.layer_timer import LayerTimer


def timed(model, n=8, bs=4, size=32):
    "LayerTimer's and BatchTimer's train summaries of a one-epoch fit of `model` on random images"
    lt, bt = LayerTimer(warmup=1), BatchTimer(warmup=1, wandb_every=None)
    learn = Learner(synthetic_dls(n=n, bs=bs, size=size, valid_pct=0), model, loss_func=CrossEntropyLossFlat(), cbs=[lt, bt])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4)
    return lt, bt


def calls(lt): return lt.summary()[['forward_calls', 'backward_calls']]


def adds_up(lt, bt):
    "The roles add up to the model's forward and backward, as BatchTimer times them in the same fit"
    a = lt.against(bt)
    assert (a.ratio - 1).abs().max() < 0.1 and (a.ops_ms > a.other_ms).all()


def test_inplace_activations_are_timed_backward():
    "torchvision's ResNets use ReLU(inplace=True): each call is timed backward too, as with inplace=False"
    m = torchvision.models.resnet18(num_classes=4)
    assert all(r.inplace for r in m.modules() if isinstance(r, nn.ReLU))
    lt, bt = timed(m)
    c, s = calls(lt), lt.summary()
    assert c.loc['act', 'forward_calls'] == 17 and (c.forward_calls == c.backward_calls).all()   # every op it times forward, it times backward
    assert s.loc['act', 'backward_ms'] > 0 and (lt.df.backward_calls[lt.df.role == 'act'] > 0).all()
    adds_up(lt, bt)
    for r in m.modules():
        if isinstance(r, nn.ReLU): r.inplace = False
    lt2, _ = timed(m)
    assert calls(lt2).equals(c)


def test_timm_norm_act_timed_as_norm_and_act_before_and_after_swap():
    "timm's BatchNormAct2d: its norm part under 'bn', its activation under 'act', whether the module or a swapped forward calls them"
    m = timm.create_model('efficientnet_b0', num_classes=4)
    n_norm = sum(module_role(b) == 'norm_act' for b in m.modules())
    n_act = sum(module_role(b) == 'act' and type(b) is not nn.Identity for b in m.modules())
    lt, bt = timed(m, n=6, bs=2)
    before = calls(lt)
    assert before.loc['bn', 'forward_calls'] == n_norm and before.loc['act', 'forward_calls'] == n_act
    assert (before.forward_calls == before.backward_calls).all() and before.loc['norm_act'].sum() == 0
    adds_up(lt, bt)
    r = swap_order(m, 'bn_after')
    assert r.complete and any('apart' in s for s in r.df.reason)   # norm parts called apart from their activations
    lt2, bt2 = timed(m, n=6, bs=2)
    assert calls(lt2).equals(before)   # the same ops, each under its role: none of them left to 'other'
    s, s2 = lt.summary(), lt2.summary()
    assert (s2.loc[['bn', 'act'], ['forward_ms', 'backward_ms']] > 0).all().all()
    assert s2.loc['other', 'pct'] < max(2 * s.loc['other', 'pct'], 20)
    adds_up(lt2, bt2)
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in m.modules()) and not _NORM_PART_HOOKS   # hooks gone after the fit


def test_inplace_activations_on_a_device_clock():
    "On a device clock (fake CUDA events) the same ops are timed, and nothing waits for the device during the fit"
    from test_timing import FakeGPU, fake_events
    gpu = FakeGPU(lag=300)
    lt = LayerTimer(clock=fake_events(gpu), every=1, warmup=1)
    learn = Learner(synthetic_dls(n=12, bs=4, size=32, valid_pct=0), torchvision.models.resnet18(num_classes=4),
                    loss_func=CrossEntropyLossFlat(), cbs=[lt])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4)
    assert gpu.waits == 0
    c = calls(lt)
    assert gpu.waits == 1 and c.loc['act', 'backward_calls'] == 17 and (c.forward_calls == c.backward_calls).all()


@pytest.mark.cuda
def test_inplace_and_norm_act_on_cuda():
    "On a GPU: torchvision's in-place ReLUs and a swapped timm model's norm parts are timed backward, the roles adding up to BatchTimer's phases"
    for m, swap in ((torchvision.models.resnet18(num_classes=4), None), (timm.create_model('efficientnet_b0', num_classes=4), 'bn_after')):
        if swap: swap_order(m, swap)
        lt, bt = LayerTimer(every=1, warmup=2), BatchTimer(warmup=2, wandb_every=None)
        learn = Learner(synthetic_dls(n=64, bs=8, size=64, valid_pct=0), m.cuda(), loss_func=CrossEntropyLossFlat(), cbs=[lt, bt])
        learn.dls.to('cuda')
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4)
        c = calls(lt)
        assert (c.forward_calls == c.backward_calls).all() and c.loc['act', 'backward_calls'] > 0 and c.loc['norm_act'].sum() == 0
        assert (lt.against(bt).ratio - 1).abs().max() < 0.1
