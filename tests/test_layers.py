import inspect, pytest, torch
from torch import nn
import fastai.layers as fl
import fastai.vision.models.xresnet as fxr
import fastai.vision.gan as fgan
from fastai.layers import ConvLayer, NormType
from fastai_order.model.order import LayerOrder, PRESETS
from fastai_order.model.layers import (OrderedConvLayer, ordered_xresnet, ordered_cnn, fastai_state_dict, block_roles,
                                 XRESNET_ARCHS)

SHAPES = {1: (2, 4, 9), 2: (2, 4, 9, 9), 3: (2, 4, 5, 5, 5)}
NORMS = [NormType.Batch, NormType.BatchZero, NormType.Instance, NormType.InstanceZero, NormType.Weight,
         NormType.Spectral, None]

def nparams(m): return sum(p.numel() for p in m.parameters())

def pair(bn_1st, seed=0, **kw):
    "fastai's ConvLayer and ours in the same order, built from the same seed"
    torch.manual_seed(seed); fa = ConvLayer(4, 6, bn_1st=bn_1st, **kw)
    torch.manual_seed(seed); ours = OrderedConvLayer(4, 6, order=LayerOrder.from_bn_1st(bn_1st), **kw)
    return fa, ours


@pytest.mark.parametrize('ndim', [1, 2, 3])
@pytest.mark.parametrize('transpose', [False, True])
@pytest.mark.parametrize('bn_1st', [True, False])
@pytest.mark.parametrize('norm_type', NORMS)
@pytest.mark.parametrize('act_cls', [nn.ReLU, nn.PReLU, None])
def test_identical_to_fastai(ndim, transpose, bn_1st, norm_type, act_cls):
    fa, ours = pair(bn_1st, ndim=ndim, transpose=transpose, norm_type=norm_type, act_cls=act_cls, ks=3, stride=2)
    sd_fa, sd_ours = fa.state_dict(), fastai_state_dict(ours)
    assert list(sd_fa) == list(sd_ours)                          # same keys, same layout
    assert all(torch.equal(sd_fa[k], sd_ours[k]) for k in sd_fa)  # same initial weights from the same seed
    x = torch.randn(SHAPES[ndim])
    ya, yo = fa(x), ours(x)   # once each: a spectral norm's forward advances its power iteration
    g = torch.randn_like(ya)
    assert torch.equal(ya, yo)
    (ya * g).sum().backward(); (yo * g).sum().backward()
    grads_fa = {n: p.grad for n, p in fa.named_parameters()}
    renames = dict(zip(ours.state_dict(), fastai_state_dict(ours)))   # role key → fastai key
    for n, p in ours.named_parameters(): assert torch.equal(p.grad, grads_fa[renames[n]]), n


def test_accepts_every_convlayer_argument():
    l = OrderedConvLayer(4, 8, ks=5, stride=2, padding=1, bias=True, ndim=1, norm_type=NormType.Instance, bn_1st=False,
                         act_cls=nn.GELU, transpose=True, init=nn.init.kaiming_normal_, xtra=nn.Identity(), bias_std=0.,
                         groups=2, dilation=2, padding_mode='zeros')
    assert [type(m) for m in l] == [nn.ConvTranspose1d, nn.GELU, nn.InstanceNorm1d, nn.Identity]
    assert list(l._modules) == ['conv', 'act', 'bn', 'xtra'] and l.order == 'conv-act-bn'
    assert l.conv.bias is not None and float(l.conv.bias.detach().abs().sum()) == 0 and l.conv.groups == 2


def test_fastais_parameters_first_in_fastais_order():
    "fastai's parameters, in its order and with its defaults; then ours, keyword-only"
    fa = list(inspect.signature(ConvLayer.__init__).parameters.values())
    ours = list(inspect.signature(OrderedConvLayer.__init__).parameters.values())
    n = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in fa)
    assert [(p.name, p.kind, p.default) for p in ours[:n]] == [(p.name, p.kind, p.default) for p in fa[:n]]
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in ours[n:])
    assert {(p.name, p.default) for p in ours[n:]} >= {(p.name, p.default) for p in fa[n:]}  # and the conv's keywords
    assert {'order', 'pool', 'pool_ks', 'p', 'drop_cls'} <= {p.name for p in ours[n:]}
    with pytest.raises(TypeError): OrderedConvLayer(4, 8, 3, 1, None, None, 2, NormType.Batch, True, nn.ReLU, False, 'auto', None, 0.01, 'resnet')


B, I, W, S = NormType.Batch, NormType.Instance, NormType.Weight, NormType.Spectral
POSITIONAL = {  # fastai's ConvLayer(ni, nf, ks, stride, padding, bias, ndim, norm_type, bn_1st, act_cls, transpose, init, xtra, bias_std, **conv)
    'defaults':  ((4, 8), {}),
    'ks':        ((4, 8, 5), {}),
    'stride':    ((4, 8, 3, 2), {}),
    'padding':   ((4, 8, 3, 1, 0), {}),
    'bias':      ((4, 8, 5, 2, 2, True), {}),
    'ndim1':     ((4, 8, 3, 1, None, None, 1), {}),
    'ndim3':     ((4, 8, 3, 2, None, None, 3), {}),
    'norm_type': ((4, 8, 3, 2, None, None, 3, I), {}),
    'bn_1st':    ((4, 8, 3, 1, None, None, 2, NormType.BatchZero, False), {}),
    'act_cls':   ((4, 8, 3, 1, None, None, 2, B, True, nn.GELU), {}),
    'no_norm_no_act': ((4, 8, 3, 1, 1, False, 1, None, True, None), {}),
    'transpose': ((4, 8, 4, 2, 1, None, 2, B, True, nn.ReLU, True), {}),
    'transpose1d_after': ((4, 8, 3, 2, None, None, 1, I, False, nn.PReLU, True), {}),
    'init':      ((4, 8, 3, 1, None, None, 2, W, True, nn.ReLU, False, nn.init.kaiming_normal_), {}),
    'xtra':      ((4, 8, 3, 1, None, None, 2, S, False, nn.LeakyReLU, False, 'auto', nn.Identity()), {}),
    'bias_std':  ((4, 8, 3, 1, None, True, 2, None, True, nn.ReLU, False, 'auto', None, 0.), {}),
    'dilation':  ((4, 8, 3, 1, 2), dict(dilation=2)),
    'groups':    ((4, 8, 3), dict(groups=2)),
    'padding_mode': ((4, 8, 3, 1, 1, None, 1), dict(padding_mode='reflect')),
    'all':       ((4, 8, 3, 2, 2, True, 2, I, False, nn.SiLU, False, 'auto', nn.Dropout(0.), 0.5),
                  dict(dilation=2, groups=4, padding_mode='circular')),
}

@pytest.mark.parametrize('case', POSITIONAL)
def test_positional_calls_build_fastais_layer(case):
    args, kw = POSITIONAL[case]
    torch.manual_seed(0); fa = ConvLayer(*args, **kw)
    torch.manual_seed(0); ours = OrderedConvLayer(*args, **kw)
    assert [repr(m) for m in ours.children()] == [repr(m) for m in fa.children()]   # same modules, same order
    sd = fastai_state_dict(ours)
    assert list(sd) == list(fa.state_dict()) and all(torch.equal(v, fa.state_dict()[k]) for k, v in sd.items())
    x = torch.randn(SHAPES[int(type(fa[0]).__name__[-2])])
    assert torch.equal(ours(x), fa(x))


def _leaves(m): return [repr(x) for x in m.modules() if not list(x.children())]
def _kinds(m): return [ConvLayer if isinstance(x, OrderedConvLayer) else type(x) for x in m.modules()]

FASTAI_BUILDERS = {
    'basic_critic':    (lambda: fgan.basic_critic(32, 3, 8, n_extra_layers=1), (2, 3, 32, 32)),
    'basic_generator': (lambda: fgan.basic_generator(32, 3, in_sz=16, n_features=8, n_extra_layers=1), (2, 16)),
    'gan_critic':      (lambda: fgan.gan_critic(n_channels=3, nf=8, n_blocks=1), (2, 3, 32, 32)),
    'SimpleCNN':       (lambda: fl.SimpleCNN([3, 8, 16, 4]), (2, 3, 32, 32)),
    'ResBlock':        (lambda: fl.ResBlock(1, 8, 16, stride=2), (2, 8, 16, 16)),
    'ResBlock_se_sa':  (lambda: fl.ResBlock(4, 8, 4, stride=2, reduction=4, sa=True, act_cls=nn.Mish), (2, 32, 8, 8)),
    'PixelShuffle_ICNR': (lambda: fl.PixelShuffle_ICNR(8, 4), (2, 8, 6, 6)),
    'PixelShuffle_ICNR_bn_blur': (lambda: fl.PixelShuffle_ICNR(8, 4, blur=True, norm_type=NormType.Batch), (2, 8, 6, 6)),
}

@pytest.mark.parametrize('name', FASTAI_BUILDERS)
def test_fastais_builders_work_unchanged_with_it(name, monkeypatch):
    "fastai's own builders, with OrderedConvLayer in place of ConvLayer, build fastai's model: same modules, weights, outputs"
    build, shape = FASTAI_BUILDERS[name]
    torch.manual_seed(0); fa = build()
    for mod in (fl, fgan): monkeypatch.setattr(mod, 'ConvLayer', OrderedConvLayer)
    torch.manual_seed(0); ours = build()
    monkeypatch.undo()
    assert any(isinstance(m, OrderedConvLayer) for m in ours.modules())
    assert _kinds(ours) == _kinds(fa) and _leaves(ours) == _leaves(fa)
    sd = fastai_state_dict(ours)
    assert list(sd) == list(fa.state_dict()) and all(torch.equal(v, fa.state_dict()[k]) for k, v in sd.items())
    assert list(sd._metadata) == list(fa.state_dict()._metadata)   # the modules' versions travel along
    ours.load_state_dict(fa.state_dict()); fa.load_state_dict(sd)   # fastai's checkpoint loads into ours, and back
    torch.manual_seed(1); x = torch.randn(shape)
    torch.manual_seed(2); y = ours(x)   # the same draws for dropout (gan_critic's)
    torch.manual_seed(2); assert torch.equal(y, fa(x))


def test_drop_in_for_every_fastai_call(monkeypatch):
    "ResBlock, XResNet's stem and SEModule all build with OrderedConvLayer in place of ConvLayer"
    for mod in (fl, fxr): monkeypatch.setattr(mod, 'ConvLayer', OrderedConvLayer)
    m = fxr.xse_resnext18(n_out=3, sa=True, act_cls=nn.Mish)
    monkeypatch.undo()
    assert sum(isinstance(x, OrderedConvLayer) for x in m.modules()) > 20
    assert nparams(m) == nparams(fxr.xse_resnext18(n_out=3, sa=True, act_cls=nn.Mish))
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_pool_drop_and_order_must_agree():
    l = OrderedConvLayer(4, 8, order='keras_question', pool='max', p=0.2)
    assert list(l._modules) == ['conv', 'act', 'pool', 'drop', 'bn'] and l.drop.p == 0.2
    assert OrderedConvLayer(4, 8, pool='avg', p=0.1).order == 'resnet_pool_drop'  # order=None: fastai's, then pool, drop
    with pytest.raises(ValueError, match="places 'pool' but this layer has none"): OrderedConvLayer(4, 8, order='lesson7')
    with pytest.raises(ValueError, match="places 'drop' but this layer has none"): OrderedConvLayer(4, 8, order='resnet_pool_drop', pool='max')
    with pytest.raises(ValueError, match="has a 'pool' but order 'conv-bn-act' does not place it"): OrderedConvLayer(4, 8, order='resnet', pool='max')
    with pytest.raises(ValueError, match="has a 'bn' but order 'conv-act' does not place it.*norm_type=None"): OrderedConvLayer(4, 8, order='conv-act')
    with pytest.raises(ValueError, match="pool='maxx'"): OrderedConvLayer(4, 8, order='lesson7', pool='maxx')
    assert OrderedConvLayer(4, 8, order='conv-act', norm_type=None).order == 'conv-act'


def test_preact_norm_sees_the_input_channels():
    l = OrderedConvLayer(4, 8, order='preact')
    assert l.bn.num_features == 4 and l.order == 'bn-act-conv'
    assert l(torch.randn(2, 4, 6, 6)).shape == (2, 8, 6, 6)


def test_fastai_checkpoints_load_both_ways():
    for bn_1st in (True, False):
        fa, ours = pair(bn_1st, seed=1, act_cls=nn.PReLU, norm_type=NormType.Instance)
        fa.train(); fa(torch.randn(2, 4, 8, 8)).sum().backward()
        with torch.no_grad():
            for p in fa.parameters(): p.add_(torch.randn_like(p))
        ours.load_state_dict(fa.state_dict())                  # fastai keys → role keys
        x = torch.randn(2, 4, 8, 8)
        assert torch.equal(ours(x), fa(x))
        fa2 = ConvLayer(4, 6, bn_1st=bn_1st, act_cls=nn.PReLU, norm_type=NormType.Instance)
        fa2.load_state_dict(fastai_state_dict(ours))           # and back
        assert torch.equal(fa2(x), fa(x))


def test_checkpoint_from_one_order_loads_into_another():
    torch.manual_seed(0); a = ordered_xresnet('xresnet18', 'resnet', n_out=4)
    with torch.no_grad():
        for p in a.parameters(): p.add_(1)
    b = ordered_xresnet('xresnet18', 'keras_question', n_out=4)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert list(a.state_dict()) == list(b.state_dict())


@pytest.mark.parametrize('arch', XRESNET_ARCHS)
def test_every_xresnet_size(arch):
    if arch == 'xsenet154':  # fastai 2.8 cannot build this one itself (XResNet() missing 'layers')
        with pytest.raises(TypeError): fxr.xsenet154(n_out=5)
        with pytest.raises(TypeError): ordered_xresnet(arch, n_out=5)
        return
    fa = getattr(fxr, arch)(n_out=5)
    order = LayerOrder('bn_after')
    ours = ordered_xresnet(arch, order, n_out=5)
    assert nparams(ours) == nparams(fa)
    convs = [m for m in ours.modules() if isinstance(m, ConvLayer)]
    assert all(isinstance(m, OrderedConvLayer) for m in convs)
    assert len(convs) == sum(isinstance(m, ConvLayer) for m in fa.modules())
    assert all(m.order == order.restrict(block_roles(m)) for m in convs)
    assert ours[0].order == order                              # the stem too


@pytest.mark.parametrize('order', ['resnet', 'bn_after'])
def test_xresnet_same_seed_same_weights_and_fastai_checkpoint(order):
    torch.manual_seed(0); fa = fxr.xresnet50(n_out=5)
    torch.manual_seed(0); ours = ordered_xresnet('xresnet50', order, n_out=5)
    sd = fastai_state_dict(ours, bn_1st=True)
    assert list(sd) == list(fa.state_dict())
    assert all(torch.equal(v, fa.state_dict()[k]) for k, v in sd.items())
    ours.load_state_dict(fa.state_dict())
    x = torch.randn(2, 3, 32, 32)
    if order == 'resnet': assert torch.equal(ours.eval()(x), fa.eval()(x))


def test_xresnet_pool_order_takes_the_stem_pool():
    m = ordered_xresnet('xresnet18', 'pool_before_bn', n_out=5)
    assert m[2].order == 'conv-pool-bn-act' and isinstance(m[2].pool, nn.MaxPool2d) and isinstance(m[3], nn.Identity)
    assert m[0].order == 'conv-bn-act' and m[4][0].convpath[0].order == 'conv-bn-act'
    assert nparams(m) == nparams(fxr.xresnet18(n_out=5))
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    # conv-bn-pool-act computes fastai's function exactly (max pooling commutes with ReLU)
    torch.manual_seed(0); fa = fxr.xresnet18(n_out=5)
    torch.manual_seed(0); ours = ordered_xresnet('xresnet18', 'pool_before_act', n_out=5)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(ours(x), fa(x), atol=1e-5)


def test_xresnet_bad_arch():
    with pytest.raises(ValueError, match="Unknown arch 'xresnet19': did you mean 'xresnet18'"): ordered_xresnet('xresnet19')


def test_ordered_cnn_places_pool_and_drop():
    m = ordered_cnn(c_in=1, n_out=2, widths=(64, 64), ks=5, ndim=1, order='keras_question', p=0.2)
    assert all(l.order == 'conv-act-pool-drop-bn' for l in m[:2])
    assert isinstance(m[0].conv, nn.Conv1d) and m[0].conv.kernel_size == (5,) and isinstance(m[0].pool, nn.MaxPool1d)
    assert m(torch.randn(3, 1, 100)).shape == (3, 2)
    assert ordered_cnn(order='preact')[0].order == 'bn-act-conv-pool'
    assert ordered_cnn(order='resnet', pool=None)[0].order == 'resnet'
    assert ordered_cnn(order='pool_before_bn', act_cls=None)[1].order == 'conv-pool-bn'
    m2 = ordered_cnn(c_in=3, n_out=4, order='pool_before_bn', ndim=2, p=0.1)
    assert m2[0].order == 'conv-pool-bn-act-drop' and m2(torch.randn(2, 3, 32, 32)).shape == (2, 4)
