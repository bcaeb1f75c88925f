"`optimize_order` on random conv stacks and on the models users have: the result computes what the original does, in place keeps what a Learner trains, bad cases are refused."
import copy, contextlib
from types import SimpleNamespace
import pytest, torch, torch.nn as nn, torchvision
from hypothesis import given, settings, strategies as st, HealthCheck
from fastai.layers import ConvLayer
from fastai.learner import Learner
from fastai.vision.models.xresnet import xresnet18
from torch.nn.utils.fusion import fuse_conv_bn_eval
import fastai_order.optimize as opt
from fastai_order.ops import ACTIVATIONS
from fastai_order.commute import conditions_of
from fastai_order.layers import ordered_cnn
from fastai_order.optimize import optimize_order, plan_rewrites
from fastai_order.bench import synthetic_dls, optimize_models

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
    assert r.error <= 1e-9 and (r.grad_error is None) == (mode == 'eval') and (r.grad_error or 0) <= 1e-9
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
        with pytest.raises(ValueError, match=r"refused \(equivalence\): in float64 the rewrite of 0 conv-bn-act-maxpool → conv-bn-maxpool-act "
                                             r"changes the group's output by .* more than tol=1e-09: it computes another function\. Nothing was changed\."):
            optimize_order(model, inplace=True, reps=0)
    finally: del ACTIVATIONS[Bump]
    assert [type(m).__name__ for m in model] == ['Conv2d', 'BatchNorm2d', 'Bump', 'MaxPool2d']


def _negative_gamma(model):
    "`model` with a negative BN γ in every other channel, so that max pooling does not commute with its BNs"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d): m.weight[::2] *= -1; m.running_mean.normal_(); m.running_var.uniform_(0.5, 2)
    return model

WRONG = {   # a wrong fact for the rules, the model and mode it leads astray, and the group whose rewrite must be refused
    'GELU declared monotone': (lambda mp: mp.setitem(ACTIVATIONS, nn.GELU, (True, False, True)),
                               lambda: ordered_cnn(3, 4, (8, 8), order='conv-bn-act-pool', act_cls=nn.GELU), 'train', '0.conv conv-bn-act-maxpool'),
    'SiLU declared monotone': (lambda mp: mp.setitem(ACTIVATIONS, nn.SiLU, (True, False, True)),
                               lambda: ordered_cnn(3, 4, (8, 8), order='conv-bn-act-pool', act_cls=nn.SiLU).eval(), 'eval', '0.conv conv-bn-act-maxpool'),
    'negative BN γ declared ≥ 0': (lambda mp: mp.setattr(opt, 'conditions_of', lambda mods, mode: {**conditions_of(mods, mode), 'bn_scale_nonneg': True}),
                                   lambda: _negative_gamma(ordered_cnn(3, 4, (8, 8), order='conv-act-bn-pool')).eval(), 'eval', '0.conv conv-act-bn-maxpool'),
}

@pytest.mark.parametrize('precision', ['float32', 'bfloat16', 'autocast bfloat16', 'channels_last'])
@pytest.mark.parametrize('wrong', list(WRONG))
def test_a_wrong_rewrite_is_refused_at_every_precision(monkeypatch, wrong, precision):
    lie, make, mode, group = WRONG[wrong]
    torch.manual_seed(0)
    model = make()
    if precision == 'bfloat16': model = model.to(torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lie(monkeypatch)
    assert plan_rewrites(model, mode), 'the wrong fact leads to a rewrite'
    ctx = torch.autocast('cpu', dtype=torch.bfloat16) if precision == 'autocast bfloat16' else contextlib.nullcontext()
    with ctx, pytest.raises(ValueError, match=rf"refused \(equivalence\): in float64 the rewrite of {group}"):
        optimize_order(model, mode, inplace=True, channels_last=precision == 'channels_last', reps=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and model.state_dict().keys() == state.keys()


def test_the_refusal_names_the_wrong_group_not_the_first():
    class Bump(nn.Module):
        def forward(self, x): return -x.abs()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), Bump(), nn.MaxPool2d(2))
    ACTIVATIONS[Bump] = (True, True, True)
    try:
        with pytest.raises(ValueError, match="the rewrite of 4 conv-bn-act-maxpool"): optimize_order(model, reps=0)
    finally: del ACTIVATIONS[Bump]


def _bench_cnn(dtype=torch.float32):
    return optimize_models('cnn')['cnn'].to(dtype)

@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_a_bfloat16_model_is_accepted_at_the_defaults(mode):
    "Before the two checks, the folded bfloat16 model (like TF32 on a GPU) differed from the original by ~4e-3 > tol and was refused"
    model = _bench_cnn(torch.bfloat16)
    r = optimize_order(model, mode, reps=0)
    assert len(r.rows) == 3 and r.error <= 1e-9 and r.precision == 'bfloat16'
    assert next(r.model.parameters()).dtype == torch.bfloat16
    d, u = r.drift, 2.**-8
    assert 1e-4 < d['original'] < 3e-2 and d['rewritten'] <= 4 * d['original'] + u   # bfloat16's own rounding, and no worse
    assert (r.grad_drift is None) == (mode == 'eval')
    if mode == 'eval':   # folded in float64 and rounded once
        m0 = copy.deepcopy(model)
        expect = fuse_conv_bn_eval(m0[0].conv.double().eval(), m0[0].bn.double().eval()).weight.to(torch.bfloat16)
        assert torch.equal(r.model[0].conv.weight, expect)


@pytest.mark.parametrize('how', ['context', 'argument'])
def test_autocast_is_the_run_precision(how):
    model = _bench_cnn().eval()
    if how == 'context':
        with torch.autocast('cpu', dtype=torch.bfloat16): r = optimize_order(model, 'eval', reps=0)
    else: r = optimize_order(model, 'eval', autocast=torch.bfloat16, reps=0)
    assert r.precision == 'float32 under autocast(bfloat16)' and r.drift['original'] > 1e-4   # bfloat16 convs, not float32
    assert r.drift['rewritten'] <= 4 * r.drift['original'] + 2.**-8 and 'drift at float32 under autocast(bfloat16)' in r.title
    assert next(r.model.parameters()).dtype == torch.float32
    r = optimize_order(model, 'eval', reps=0)
    assert r.precision == 'float32' and r.drift['original'] < 1e-5


def test_channels_last_of_an_unchanged_bn_after_model_is_accepted():
    "It used to be refused, its gradients ~1e-3 off the contiguous model's although nothing was rewritten: the layout's own rounding"
    torch.manual_seed(0)
    model = ordered_cnn(3, 10, (16, 32), order='bn_after')
    r = optimize_order(model, channels_last=True, reps=0)
    assert r.rows == [] and r.channels_last and r.grad_drift['rewritten'] <= 4 * r.grad_drift['original'] + 2.**-24


def test_a_fold_that_loses_precision_is_refused_as_drift(monkeypatch):
    "Exact in float64, so equivalent, but rounded through bfloat16 in a float32 model: the drift check refuses it"
    fold = opt._fold
    monkeypatch.setattr(opt, '_fold', lambda c, b: fold(c, b) if c.weight.dtype == torch.float64 else fold(c, b).to(torch.bfloat16).to(c.weight.dtype))
    model = _bench_cnn().eval()
    with pytest.raises(ValueError, match=r"refused \(drift\): at float32 the rewritten model's outputs are .* off the float64 result \(relative\), "
                                         r"more than drift=4 × the original's .* \+ one rounding 6.0e-08\. Nothing was changed\."):
        optimize_order(model, 'eval', channels_last=False, reps=0)
    assert optimize_order(model, 'eval', channels_last=False, drift=1e6, reps=0).rows   # a looser `drift` lets it through


def test_dropout_in_training_is_checked_with_the_same_masks_and_left_out_of_the_drift():
    torch.manual_seed(0)
    model = ordered_cnn(3, 10, (16, 32), order='conv-bn-act-pool-drop', p=0.3, drop_cls=nn.Dropout2d).to(torch.bfloat16)
    r = optimize_order(model, reps=0)
    assert r.rows and r.error == 0 and r.grad_error == 0 and r.grad_drift['rewritten'] <= 4 * r.grad_drift['original'] + 2.**-8


def test_learner_with_mixed_precision_or_a_bfloat16_model():
    learn = _learner(ordered_cnn(3, 4, (8, 16), order='conv-bn-act-pool')).to_fp16()
    learn.fit(1)
    r = learn.optimize_order('eval', reps=0)
    assert r.model is learn.model and str(learn.model[0].order) == 'conv-pool-act' and r.precision == 'float32'   # fastai autocasts on CUDA only
    learn.fit(1)
    learn = _learner(ordered_cnn(3, 4, (8, 16), order='conv-bn-act-pool').to(torch.bfloat16))
    r = learn.optimize_order(reps=0)
    assert r.precision == 'bfloat16' and [str(l.order) for l in learn.model[:2]] == ['conv-bn-pool-act'] * 2


@pytest.mark.cuda
def test_cuda_tf32_is_accepted_and_a_wrong_rewrite_refused(monkeypatch):
    "On an H100 at the defaults (TF32 convs) every model used to be refused: the folded model is ~6e-4 off the original in TF32"
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', True); monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', True)
    for name, model in optimize_models().items():
        model = model.cuda().eval()
        x = torch.randn(8, 3, 224, 224, device='cuda')
        r = optimize_order(model, 'eval', example=x)
        assert r.rows and r.error <= 1e-9 and r.precision == 'float32 with TF32 convs', name
        assert next(r.model.parameters()).is_cuda
    monkeypatch.setitem(ACTIVATIONS, nn.GELU, (True, False, True))
    model = ordered_cnn(3, 4, (8, 8), order='conv-bn-act-pool', act_cls=nn.GELU).cuda()
    with pytest.raises(ValueError, match=r"refused \(equivalence\): in float64 the rewrite of 0.conv"): optimize_order(model, reps=0)
    with torch.autocast('cuda', dtype=torch.bfloat16), pytest.raises(ValueError, match=r"refused \(equivalence\)"): optimize_order(model, reps=0)


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
    (lambda m, l: optimize_order(m, drift=0.5), ValueError, "`drift` must be a number ≥ 1, got 0.5"),
    (lambda m, l: optimize_order(m, autocast=torch.float64), TypeError, "`autocast` must be None (as the caller), torch.bfloat16 or torch.float16, got torch.float64"),
    (lambda m, l: l.optimize_order(autocast='bf16'), TypeError, "`autocast` must be None (as the caller), torch.bfloat16 or torch.float16, got 'bf16'"),
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
