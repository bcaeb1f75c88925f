"`optimize_order` on random conv stacks and on the models users have: the result computes what the original does, in place keeps what a Learner trains, bad cases are refused."
import copy
from types import SimpleNamespace
import pytest, torch, torch.nn as nn, torchvision
from hypothesis import given, settings, strategies as st, HealthCheck
from fastai.layers import ConvLayer
from fastai.learner import Learner
from fastai.vision.models.xresnet import xresnet18
from fastai_order.commute import ACTIVATIONS
from fastai_order.layers import ordered_cnn
from fastai_order.optimize import optimize_order, plan_rewrites
from fastai_order.bench import synthetic_dls

ACTS = [nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.Tanh, nn.SiLU, nn.Hardswish, nn.ReLU6, nn.Softplus]
CONV, BN, POOL, DROP = (nn.Conv1d, nn.Conv2d, nn.Conv3d), (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), \
    (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def op(d, name, c, nd, act):
    "A module for `name` on `c` channels in `nd` dimensions, with random statistics and hyper-parameters drawn with `d`"
    if name == 'conv': return CONV[nd-1](c, c, 3, padding=1, bias=d(st.booleans()))
    if name == 'bn':
        m = BN[nd-1](c)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5).mul_(-1 if d(st.booleans()) else 1)
            m.bias.normal_(); m.running_mean.normal_(); m.running_var.uniform_(0.5, 2)
        return m
    if name == 'act': return act()
    if name == 'pool':
        k = d(st.integers(2, 3)); s = d(st.integers(1, 2)); p = d(st.integers(0, k // 2))
        if d(st.booleans()): return POOL[nd-1](k, s, p)
        return AVG[nd-1](k, s, p, count_include_pad=d(st.booleans()))
    return (nn.Dropout if d(st.booleans()) else DROP[nd-1])(0.3)


@st.composite
def stacks(d):
    "A random conv stack: groups of conv, BN, activation, pooling and dropout in random orders and dimensions"
    nd, c, act = d(st.integers(1, 3)), 4, d(st.sampled_from(ACTS))
    mods = []
    for _ in range(d(st.integers(1, 3))):
        names = d(st.permutations(['conv', 'bn', 'act', 'pool', 'drop']))
        names = [n for n in names if n == 'conv' or d(st.booleans())]
        mods += [op(d, n, c, nd, act) for n in names]
    return nn.Sequential(*mods), nd, c


def run(model, x, mode):
    m = copy.deepcopy(model).train(mode == 'train')
    torch.manual_seed(0)
    return m(x)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(stacks(), st.sampled_from(['train', 'eval']))
def test_random_stacks_compute_the_same(stack, mode):
    model, nd, c = stack
    x = torch.randn(4, c, *[{1: 48, 2: 24, 3: 16}[nd]] * nd)
    before = run(model, x, mode)
    r = optimize_order(model, mode, example=x, reps=0)
    assert r.error <= 1e-4
    y = torch.randn_like(x)   # an input the optimizer did not check on
    torch.testing.assert_close(run(r.model, y, mode), run(model, y, mode), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(model, x, mode), before)   # the original is untouched
    assert plan_rewrites(r.model, mode) == []                 # nothing cheaper is left


def test_inplace_training_keeps_parameters_and_learner_trains_on():
    learn = Learner(synthetic_dls(n=64, bs=16), ordered_cnn(3, 4, (8, 16), order='conv-bn-act-pool'), loss_func=nn.CrossEntropyLoss())
    learn.fit(1)
    params = [id(p) for p in learn.model.parameters()]
    r = learn.optimize_order(reps=0)
    assert [str(l.order) for l in learn.model[:2]] == ['conv-bn-pool-act'] * 2 and r.model is learn.model
    assert [id(p) for p in learn.model.parameters()] == params
    assert {id(p) for g in learn.opt.param_lists for p in g} == set(params)
    learn.fit(1)


def test_learner_eval_folds_and_resets_the_optimizer():
    learn = Learner(synthetic_dls(n=64, bs=16), ordered_cnn(3, 4, (8,), order='conv-bn-act-pool'), loss_func=nn.CrossEntropyLoss())
    learn.fit(1)
    preds = learn.get_preds()[0]
    learn.optimize_order('eval', reps=0)
    assert learn.opt is None and str(learn.model[0].order) == 'conv-pool-act'
    torch.testing.assert_close(learn.get_preds()[0], preds, rtol=1e-4, atol=1e-5)


def test_fastai_convlayer_takes_the_maxpool_that_follows_it():
    model = nn.Sequential(ConvLayer(3, 8), nn.MaxPool2d(2), ConvLayer(8, 8))
    r = optimize_order(model, reps=0)
    assert [type(m).__name__ for m in r.model[0]] == ['Conv2d', 'BatchNorm2d', 'MaxPool2d', 'ReLU']
    assert list(r.model[0]._modules) == ['0', '1', 'pool', '2'] and isinstance(r.model[1], nn.Identity)


def test_torchvision_resnet_eval_matches_torch_fx_fuse():
    from torch.fx.experimental.optimization import fuse
    model = torchvision.models.resnet18(num_classes=10).eval()
    r = optimize_order(model, 'eval', reps=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): torch.testing.assert_close(r.model(x), fuse(model)(x), rtol=1e-4, atol=1e-5)
    assert [type(m).__name__ for m in r.model.maxpool] == ['MaxPool2d', 'ReLU'] and not any(isinstance(m, nn.BatchNorm2d) for m in r.model.modules())


def test_xresnet_train_moves_only_the_stem_relu():
    r = optimize_order(xresnet18(), reps=0)
    assert len(r.rows) == 1 and r.rows[0]['after'] == 'conv-bn-maxpool-act' and r.grad_error == 0


def test_a_wrong_fact_is_refused_and_nothing_changes():
    class Bump(nn.Module):
        def forward(self, x): return -x.abs()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Bump(), nn.MaxPool2d(2))
    ACTIVATIONS[Bump] = (True, True, True)
    try:
        with pytest.raises(ValueError, match=r"refused.*outputs.*more than tol=0.0001\. Nothing was changed.*conv-bn-act-maxpool → conv-bn-maxpool-act"):
            optimize_order(model, inplace=True, reps=0)
    finally: del ACTIVATIONS[Bump]
    assert [type(m).__name__ for m in model] == ['Conv2d', 'BatchNorm2d', 'Bump', 'MaxPool2d']


def test_bad_input_is_named():
    class Branchy(nn.Module):
        def __init__(self): super().__init__(); self.conv = nn.Conv2d(3, 3, 3)
        def forward(self, x): return self.conv(x) if x.sum() > 0 else x
    with pytest.raises(ValueError, match="torch.fx trace .* Branchy failed"): optimize_order(Branchy())
    with pytest.raises(ValueError, match="`mode` must be 'train' or 'eval', got 'test'"): optimize_order(nn.Conv2d(3, 3, 3), 'test')
    with pytest.raises(ValueError, match="Cannot tell the input shape of Linear"): optimize_order(nn.Linear(3, 3))


def test_channels_last_can_be_forced_and_is_reported():
    r = optimize_order(ordered_cnn(3, 4, (8,), order='conv-bn-act-pool'), channels_last=True, reps=1)
    assert r.channels_last and r.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert set(r.speedups) == {'reorder', 'channels_last', 'total'} and 'channels_last' in r.title
    r = optimize_order(nn.Sequential(nn.Conv1d(3, 3, 3), nn.ReLU(), nn.MaxPool1d(2)), channels_last=True, reps=0)
    assert r.channels_last is None and 'does not apply' in r.title


def _learner(model): return Learner(synthetic_dls(n=32, bs=16), model, loss_func=nn.CrossEntropyLoss())

NEEDS_MODULE = "optimize_order needs an nn.Module (for a fastai Learner call `learn.optimize_order(...)`), got "
NEEDS_TENSOR = "`example` must be a tensor batch of inputs for `model` (N×C×L, N×C×H×W or N×C×D×H×W for 1-, 2- or 3-D convs) or None, got a "

@pytest.mark.parametrize('call, exc, msg', [
    (lambda m, l: optimize_order(None), TypeError, NEEDS_MODULE + "None (NoneType)"),
    (lambda m, l: optimize_order(l), TypeError, "(for a fastai Learner call `learn.optimize_order(...)`), got <fastai.learn"),
    (lambda m, l: plan_rewrites(None), TypeError, "plan_rewrites needs an nn.Module, got None (NoneType)"),
    (lambda m, l: optimize_order(m, 'test'), ValueError, "`mode` must be 'train' or 'eval', got 'test'"),
    (lambda m, l: optimize_order(m, example=torch.randn(2, 3, 8, 8).tolist()), TypeError, NEEDS_TENSOR + "list"),
    (lambda m, l: optimize_order(m, example=torch.randn(2, 3, 8, 8).numpy(), inplace=True), TypeError, NEEDS_TENSOR + "ndarray"),
    (lambda m, l: optimize_order(m, reps=-1), ValueError, "`reps` must be an integer ≥ 0, got -1"),
    (lambda m, l: optimize_order(m, reps=1.5), ValueError, "`reps` must be an integer ≥ 0, got 1.5"),
    (lambda m, l: optimize_order(m, reps=True), ValueError, "`reps` must be an integer ≥ 0, got True"),
    (lambda m, l: optimize_order(m, tol=-1, inplace=True), ValueError, "`tol` must be a number ≥ 0, got -1"),
    (lambda m, l: optimize_order(m, tol=float('nan')), ValueError, "`tol` must be a number ≥ 0, got nan"),
    (lambda m, l: optimize_order(m, tol='1e-4'), ValueError, "`tol` must be a number ≥ 0, got '1e-4'"),
    (lambda m, l: optimize_order(m, grad_tol=-1), ValueError, "`grad_tol` must be a number ≥ 0, got -1"),
    (lambda m, l: optimize_order(m, inplace='yes'), TypeError, "`inplace` must be True or False, got 'yes'"),
    (lambda m, l: optimize_order(m, channels_last='yes'), TypeError, "`channels_last` must be None, True or False, got 'yes'"),
    (lambda m, l: l.optimize_order('test'), ValueError, "`mode` must be 'train' or 'eval', got 'test'"),
    (lambda m, l: l.optimize_order(reps=-1), ValueError, "`reps` must be an integer ≥ 0, got -1"),
    (lambda m, l: l.optimize_order(tol=-1), ValueError, "`tol` must be a number ≥ 0, got -1"),
    (lambda m, l: l.optimize_order(channels_last=1.5), TypeError, "`channels_last` must be None, True or False, got 1.5"),
])
def test_bad_arguments_are_named_before_anything_is_copied(monkeypatch, call, exc, msg):
    import fastai_order.optimize as opt
    m = ordered_cnn(3, 4, (8,), order='conv-bn-act-pool')
    learn = _learner(m)
    state, structure, optim = {k: v.clone() for k, v in m.state_dict().items()}, str(m), learn.opt
    def no_copy(_): raise AssertionError('the model was copied before the arguments were checked')
    monkeypatch.setattr(opt, 'copy', SimpleNamespace(deepcopy=no_copy))
    with pytest.raises(exc) as e: call(m, learn)
    assert msg in str(e.value)
    assert str(m) == structure and learn.model is m and learn.opt is optim
    assert m.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_zero_tolerances_ask_for_bit_exact_rewrites():
    r = optimize_order(ordered_cnn(3, 4, (8,), order='conv-bn-act-pool'), example=torch.randn(4, 3, 16, 16),
                       channels_last=False, tol=0, grad_tol=0, reps=0)
    assert len(r.rows) == 1 and r.error == 0 and r.grad_error == 0
