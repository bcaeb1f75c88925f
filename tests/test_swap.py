import re, pytest, torch
from torch import nn
import fastai.vision.models.xresnet as fxr
from fastai.layers import ConvLayer
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.schedule import *  # fit_one_cycle
import torchvision
from torchvision.ops.misc import Conv2dNormActivation
from fastai_order.model.order import LayerOrder
from fastai_order.model.layers import OrderedConvLayer, ordered_xresnet, ordered_cnn, block_roles
from fastai_order.rewrite.swap import swap_order, SwapReport


def tensors(m): return {id(t) for t in [*m.parameters(), *m.buffers()]}

def orders(m): return [str(LayerOrder([r for r in block_roles(b) if r != 'xtra']))
                       for b in m.modules() if isinstance(b, (ConvLayer, Conv2dNormActivation))]


@pytest.mark.parametrize('make', [lambda: fxr.xresnet18(n_out=4), lambda: ordered_xresnet('xresnet34', n_out=4),
                                  lambda: ordered_cnn(n_out=4, p=0.1)])
@pytest.mark.parametrize('order', ['bn_after', 'pool_before_act', 'keras_question', 'lesson7'])
def test_swap_keeps_tensors_keys_dtype_and_mode(make, order):
    m = make().double().eval()
    before, keys = tensors(m), list(m.state_dict())
    report = swap_order(m, order)
    assert tensors(m) == before
    assert list(m.state_dict()) == keys
    assert not any(x.training for x in m.modules()) and all(p.dtype == torch.float64 for p in m.parameters())
    assert m(torch.randn(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 4)
    assert report.paths() and all(LayerOrder(r['new']) == LayerOrder(order).fit(LayerOrder(r['new'])) for r in report.rows
                                  if r['status'] != 'skipped')


def test_swap_back_and_forth_is_the_same_function():
    m = fxr.xresnet18(n_out=4).eval()
    x = torch.randn(2, 3, 64, 64)
    y = m(x)
    for o in ['bn_after', 'lesson7', 'pool_before_bn', 'resnet']: swap_order(m, o)
    assert torch.allclose(m(x), y, atol=1e-5)


def test_swapped_model_equals_model_built_in_that_order():
    torch.manual_seed(0); a = ordered_xresnet('xresnet18', 'resnet', n_out=4)
    torch.manual_seed(0); b = ordered_xresnet('xresnet18', 'bn_after', n_out=4)
    swap_order(a, 'bn_after')
    x = torch.randn(2, 3, 64, 64)
    assert orders(a) == orders(b) and torch.equal(a(x), b(x))


def test_report_lists_rewritten_unchanged_and_skipped():
    m = fxr.xresnet18(n_out=4)
    r = swap_order(m, 'bn_after')
    df = r.df
    assert list(df.columns) == SwapReport.cols
    assert (df.status == 'rewritten').sum() == 11 and (df.status == 'unchanged').sum() == 11
    assert set(df[df.status == 'unchanged'].reason) == {'has no act'}
    assert df.loc[df.path == '0', ['old', 'new']].values.tolist() == [['conv-bn-act', 'conv-act-bn']]
    assert '11 rewritten' in repr(r) and '4.0.convpath.0' in repr(r) and '<table' in r._repr_html_()
    assert swap_order(m, 'bn_after').paths() == []  # already in that order


def test_nothing_to_swap_is_a_report_not_an_error():
    r = swap_order(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), 'resnet')
    assert r.paths() == [] and not r.complete and 'Nothing to swap' in repr(r)


def test_torchvision_conv_norm_activation():
    m = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    y = m(x)
    r = swap_order(m, 'bn_after')
    blocks = [b for b in m.modules() if isinstance(b, Conv2dNormActivation)]
    assert len(r.paths()) == sum('act' in block_roles(b) for b in blocks) > 10
    swap_order(m, 'resnet')
    assert torch.allclose(m(x), y, atol=1e-5)


def test_pool_following_a_block_moves_in():
    m = nn.Sequential(ConvLayer(3, 8), nn.MaxPool2d(2), nn.Dropout(0.1), ConvLayer(8, 8), nn.MaxPool2d(2))
    pool = m[1]
    r = swap_order(m, 'conv-bn-pool-act')
    assert m[0].pool is pool and isinstance(m[1], nn.Identity) and isinstance(m[2], nn.Dropout)
    assert r.rows[0]['reason'] == 'took the MaxPool2d that followed it'
    assert orders(m) == ['conv-bn-pool-act'] * 2
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 8, 4, 4)
    m2 = nn.Sequential(ConvLayer(3, 8), nn.MaxPool2d(2))
    swap_order(m2, 'conv-bn-pool-act', absorb=False)
    assert isinstance(m2[1], nn.MaxPool2d) and orders(m2) == ['conv-bn-act']


def test_breaking_orders_are_refused_before_anything_changes():
    m = ordered_xresnet('xresnet18', 'resnet', n_out=4)
    snapshot = [str(b) for b in m.modules()]
    with pytest.raises(ValueError, match=r"Cannot put '0'.*norm has 32 channels but would see 3 before the Conv2d.*Nothing was changed"):
        swap_order(m, 'preact')
    assert [str(b) for b in m.modules()] == snapshot
    # moving a pool across a strided conv changes the output size
    s = nn.Sequential(OrderedConvLayer(3, 8, stride=2, order='resnet_pool_drop', pool='max', p=0.1))
    with pytest.raises(ValueError, match='changes the output size'): swap_order(s, 'pool-conv-bn-act-drop')
    assert s[0].order == 'resnet_pool_drop'
    # with a stride-1 'same' conv it is allowed
    s = nn.Sequential(OrderedConvLayer(3, 8, order='resnet_pool_drop', pool='max', p=0.1))
    swap_order(s, 'pool-conv-bn-act-drop')
    assert s[0].order == 'pool-conv-bn-act-drop' and s(torch.randn(1, 3, 8, 8)).shape == (1, 8, 4, 4)


def test_bad_order_is_a_clear_error():
    with pytest.raises(ValueError, match="did you mean 'bn_after'"): swap_order(fxr.xresnet18(), 'bn_afer')


def test_learner_swap_keeps_optimizer_state(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 4, (32,))
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:8], y[:8])), bs=8)
    learn = Learner(dls, ordered_cnn(n_out=4, widths=(8, 16)), CrossEntropyLossFlat(), path=tmp_path)
    learn.fit(1, 1e-2)
    state = {id(p): {k: v.clone() for k, v in learn.opt.state[p].items() if hasattr(v, 'clone')} for p in learn.model.parameters()}
    report = learn.swap_order('bn_after')
    assert len(report.paths()) == 2
    assert all({k: v for k, v in learn.opt.state[p].items() if hasattr(v, 'clone')}.keys() == state[id(p)].keys()
               and all(torch.equal(learn.opt.state[p][k], v) for k, v in state[id(p)].items())
               for p in learn.model.parameters())
    learn.fit(1, 1e-2)
    assert learn.model[0].order == 'conv-act-bn-pool'


from hypothesis import given, settings, strategies as st
from fastai_order.model.ops import OPS

any_order = st.lists(st.sampled_from(OPS[1:]), unique=True).flatmap(
    lambda rest: st.permutations(['conv', *rest])).map(LayerOrder)


@settings(max_examples=40, deadline=None)
@given(any_order, st.sampled_from([4, 6]))
def test_any_swap_keeps_tensors_and_swapping_back_restores_the_function(order, nf):
    torch.manual_seed(0)
    m = nn.Sequential(OrderedConvLayer(4, nf, order='resnet_pool_drop', pool='max', p=0.1), nn.Flatten()).eval()
    x = torch.randn(2, 4, 8, 8)
    y, before = m(x), tensors(m)
    new = order.fit(['conv', 'bn', 'act', 'pool', 'drop'])
    if nf != 4 and new.index('bn') < new.index('conv'):   # the norm would see 4 channels, it has nf
        with pytest.raises(ValueError, match='Nothing was changed'): swap_order(m, order)
        assert m[0].order == 'resnet_pool_drop'
        return
    swap_order(m, order)
    assert m[0].order == new and tensors(m) == before
    assert m(x).shape == y.shape
    swap_order(m, 'resnet_pool_drop')
    assert torch.equal(m(x), y)


def _learner(tmp_path, model):
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    return Learner(DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:8], y[:8])), bs=8), model, CrossEntropyLossFlat(), path=tmp_path)

NEEDS_MODULE = "swap_order needs an nn.Module (for a fastai Learner call `learn.swap_order(...)`), got "

@pytest.mark.parametrize('call, exc, msg', [
    (lambda m, l: swap_order(None, 'bn_after'), TypeError, NEEDS_MODULE + "None (NoneType)"),
    (lambda m, l: swap_order(l, 'bn_after'), TypeError, "(for a fastai Learner call `learn.swap_order(...)`), got <fastai.learn"),
    (lambda m, l: swap_order(m.state_dict(), 'bn_after'), TypeError, NEEDS_MODULE + "OrderedDict("),
    (lambda m, l: swap_order(m, 'bn_afer'), ValueError, "Unknown op 'bn_afer' in order 'bn_afer': did you mean 'bn_after'?"),
    (lambda m, l: swap_order(m, None), TypeError, "Cannot make a LayerOrder from None (NoneType); give a string such as 'conv-bn-act'"),
    (lambda m, l: swap_order(m, 3), TypeError, "Cannot make a LayerOrder from 3 (int)"),
    (lambda m, l: swap_order(m, 'bn_after', absorb='no'), TypeError, "`absorb` must be True or False, got 'no'"),
    (lambda m, l: swap_order(m, 'bn_after', absorb=None), TypeError, "`absorb` must be True or False, got None"),
    (lambda m, l: l.swap_order('bn_afer'), ValueError, "did you mean 'bn_after'?"),
    (lambda m, l: l.swap_order('bn_after', absorb='no'), TypeError, "`absorb` must be True or False, got 'no'"),
    (lambda m, l: swap_order(m, 'resnet').paths('done'), ValueError, "`status` must be 'rewritten', 'unchanged' or 'skipped', got 'done'"),
])
def test_bad_arguments_are_named_and_nothing_changes(tmp_path, call, exc, msg):
    m = ordered_cnn(n_out=4, widths=(8, 16), p=0.1)
    learn = _learner(tmp_path, m)
    state, structure = {k: v.clone() for k, v in m.state_dict().items()}, str(m)
    with pytest.raises(exc) as e: call(m, learn)
    assert msg in str(e.value)
    assert str(m) == structure and learn.model is m
    assert m.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_learner_without_a_model_is_named(tmp_path):
    learn = _learner(tmp_path, ordered_cnn(n_out=4, widths=(8,)))
    learn.model = None
    with pytest.raises(TypeError, match=re.escape(NEEDS_MODULE + "None (NoneType)")): learn.swap_order('bn_after')


# torchvision and timm models, as vision_learner builds them
import pickle, timm
from fastai.vision.learner import vision_learner, create_head
from fastai_order.rewrite.graph import TracedForward
from fastai_order.tools.synthetic import synthetic_dls
from fastai_order.timing.layer_timer import LayerTimer


def randomized(m):
    "`m` in eval mode with BN statistics and γ far from their defaults, so a wrong order shows"
    g = torch.Generator().manual_seed(0)
    for b in m.modules():
        if isinstance(b, nn.modules.batchnorm._BatchNorm):
            b.running_mean.copy_(torch.randn(b.num_features, generator=g)); b.running_var.uniform_(0.5, 2, generator=g)
            b.weight.data.uniform_(0.5, 1.5, generator=g); b.bias.data.normal_(generator=g)
    return m.eval()


def traced(m): return [n for n,b in m.named_modules() if any(isinstance(v, TracedForward) for v in vars(b).values())]


def test_torchvision_resnet34_every_block_and_the_stem():
    m = randomized(torchvision.models.resnet34())
    keys, x = list(m.state_dict()), torch.randn(2, 3, 64, 64)
    y = m(x)
    r = swap_order(m, 'bn_after')
    assert r.complete and list(m.state_dict()) == keys
    rewritten = r.paths()
    assert 'conv1' in rewritten and all(f'layer{i}.{j}.conv1' in rewritten for i,n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n))
    assert len(rewritten) == 1 + 16 and set(r.df.route) == {'traced', 'sequential'}
    blk = m.layer1[0]
    calls = [n.target for n in blk.forward.graph(False).nodes if n.op == 'call_module']
    assert calls[:3] == ['conv1', 'relu', 'bn1']     # ReLU before BN now
    assert not torch.allclose(m(x), y)
    from torch.fx.experimental.optimization import fuse
    torch.testing.assert_close(torch.fx.symbolic_trace(m)(x), m(x)); torch.testing.assert_close(fuse(m)(x), m(x), rtol=1e-4, atol=1e-4)   # torch.fx traces what the root runs
    assert type(m).__name__ == 'ResNet' and isinstance(m, torchvision.models.ResNet)
    swap_order(m, 'resnet')
    assert torch.equal(m(x), y) and traced(m) == []   # back to the class's own forward


def test_vision_learner_resnet34_swaps_trains_and_checkpoints_load_both_ways(tmp_path):
    dls = synthetic_dls(n=32, bs=8, size=32)
    make = lambda: vision_learner(dls, torchvision.models.resnet34, pretrained=False, n_out=4, loss_func=CrossEntropyLossFlat())
    learn, plain = make(), make()
    r = learn.swap_order('bn_after')
    assert r.complete and r.df.loc[r.df.path == '0.0', 'route'].item() == 'sequential'   # the stem, in the body's Sequential
    assert [k for k,_ in learn.model[0].named_children()][:3] == ['0', '2', '1']      # conv, relu, bn under their own keys
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, 1e-3)
    assert all(torch.isfinite(torch.tensor(v)) for v in learn.recorder.values[-1])
    assert any(not torch.equal(a, b) for a,b in zip(before, learn.model.parameters()))
    plain.model.load_state_dict(learn.model.state_dict())          # swapped → original order
    learn.model.load_state_dict(make().model.state_dict())          # original → swapped order
    path = tmp_path/'m.pkl'; torch.save(learn.model, path)
    m2 = torch.load(path, weights_only=False).eval(); learn.model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m2(x), learn.model(x))


def test_vision_learner_timm_model_swaps_through_forward_features():
    dls = synthetic_dls(n=32, bs=8, size=32)
    learn = vision_learner(dls, 'resnet18', pretrained=False, n_out=4, loss_func=CrossEntropyLossFlat())
    randomized(learn.model)
    x = torch.randn(2, 3, 32, 32)
    y = learn.model(x)
    r = learn.swap_order('bn_after')
    assert r.complete and 'conv1' in ' '.join(r.paths())
    assert not torch.allclose(learn.model(x), y)           # fastai's TimmBody calls forward_features: the stem swapped too
    lt = LayerTimer()
    learn.fit(1, 1e-3, cbs=lt)
    roles = lt.summary()
    assert roles.loc['conv', 'forward_ms'] > 0 and roles.loc['act', 'forward_ms'] > 0   # the hooks still see the moved ops


@pytest.mark.parametrize('name', ['efficientnet_b0', 'mobilenetv3_small_050', 'regnetx_002', 'cspresnet50'])
def test_timm_norm_act_split_and_back(name):
    m = randomized(timm.create_model(name))
    keys, x = list(m.state_dict()), torch.randn(2, 3, 64, 64)
    y = m(x)
    r = swap_order(m, 'bn_after')
    assert r.complete and r.paths() and list(m.state_dict()) == keys
    assert any('apart' in s for s in r.df.reason)
    y1 = m(x)
    assert not torch.allclose(y1, y)
    assert torch.equal(pickle.loads(pickle.dumps(m))(x), y1)    # a pickled (exported) swapped model computes the same
    assert torch.allclose(torch.fx.symbolic_trace(m)(x), y1)     # and torch.fx (fuse, optimize_order) can trace it whole
    swap_order(m, 'resnet')
    assert torch.equal(m(x), y) and traced(m) == []


def test_function_activations_are_ops():
    "torchvision's Inception and GoogLeNet call F.relu in BasicConv2d.forward"
    m = randomized(torchvision.models.googlenet(init_weights=False, aux_logits=False))
    x = torch.randn(1, 3, 64, 64)
    y = m(x)
    r = swap_order(m, 'bn_after')
    assert r.complete and len(r.paths()) == 57
    assert not torch.allclose(m(x), y)
    swap_order(m, 'resnet')
    assert torch.equal(m(x), y)


class Branchy(nn.Module):
    "A block whose forward depends on the training flag and fills a cache while it runs"
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act, self.drop, self.cache = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), {}
    def forward(self, x):
        self.cache['n'] = x.shape[0]
        x = self.act(self.bn(self.conv(x)))
        return self.drop(x) * 2 if self.training else x


def test_traced_forward_keeps_the_training_branch_and_leaves_no_trace():
    m = Branchy()
    r = swap_order(m, 'bn_after')
    assert r.paths() == ['conv'] and m.cache == {} and m.training
    tf = m.forward
    assert set(tf.graphs) == {True, False}
    x = torch.randn(4, 3, 8, 8)
    m.eval(); ref = Branchy().eval(); ref.load_state_dict(m.state_dict())
    assert torch.allclose(m(x), ref.bn(ref.act(ref.conv(x))))
    m.train(); torch.manual_seed(0); a = m(x)
    torch.manual_seed(0); ref.train(); b = ref.drop(ref.bn(ref.act(ref.conv(x)))) * 2
    assert torch.allclose(a, b)


def test_untraceable_and_multi_input_forwards_are_listed():
    class Gate(nn.Module):
        def __init__(self): super().__init__(); self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        def forward(self, x): return self.act(self.bn(self.conv(x))) if x.mean() > 0 else x
    class TwoInputs(Gate):
        def forward(self, x, scale=1.): return self.act(self.bn(self.conv(x))) * scale
    m = nn.Sequential(Gate())
    r = swap_order(m, 'bn_after')
    assert not r.complete and r.paths('skipped') == ['0.conv'] and 'control flow' in r.df.reason[0]
    assert 'forward' not in vars(m[0])
    m = TwoInputs()   # alone: nothing calls it to say what its other input is
    r = swap_order(m, 'bn_after')
    assert not r.complete and r.paths('skipped') == ['conv'] and 'more than one input' in r.df.reason[0]
    m = randomized(nn.Sequential(TwoInputs()))   # called by a module whose forward traces: the chain is swapped in that trace, where scale is what it is
    x = torch.randn(2, 3, 8, 8)
    r = swap_order(m, 'bn_after')
    assert r.complete and r.paths() == ['0.conv'] and traced(m) == [''] and 'forward' not in vars(m[0])
    torch.testing.assert_close(m(x), m[0].bn(m[0].act(m[0].conv(x))))
    class Head(nn.Module):   # timm's ClassifierHead: a conv classifier, forward(x, pre_logits=False)
        def __init__(self): super().__init__(); self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1)
        def forward(self, x, pre_logits=False): return self.pool(x) if pre_logits else self.fc(self.pool(x))
    r = swap_order(Head(), 'bn_after')   # no norm or activation beside the conv: nothing missed
    assert r.complete and r.paths('unchanged') == ['fc'] and 'no norm or activation beside it' in r.df.reason[0]


def test_preactivation_model_swaps_its_conv_norm_act_chains():
    "DenseNet's layers are BN-ReLU-conv1x1-BN-ReLU-conv3x3: the conv1x1-BN-ReLU chain swaps, the leading BN-ReLU stays"
    m = randomized(torchvision.models.densenet121())
    keys, x = list(m.state_dict()), torch.randn(1, 3, 64, 64)
    y = m(x)
    r = swap_order(m, 'bn_after')
    assert r.complete and list(m.state_dict()) == keys
    assert r.df.loc[r.df.path == 'features.denseblock1.denselayer1.conv1', ['old', 'new']].values.tolist() == [['conv-bn-act', 'conv-act-bn']]
    assert not torch.allclose(m(x), y)
    with pytest.raises(ValueError, match="Cannot put .features.conv0.*norm has 64 channels but would see 3 before the Conv2d.*Nothing was changed"):
        swap_order(m, 'preact')   # a norm cannot move before a conv that changes the channels


def test_fastai_head_takes_its_own_order():
    head = create_head(64, 4)
    keys = list(head.state_dict())
    r = swap_order(head, 'resnet', head='drop-bn-linear')
    assert [(x.old, x.new) for x in r.df.itertuples()] == [('bn-drop-conv-act', 'drop-bn-conv-act'), ('bn-drop-conv', 'drop-bn-conv')]
    assert list(head.state_dict()) == keys
    assert [type(c).__name__ for c in head.children()][2:5] == ['Dropout', 'BatchNorm1d', 'Linear']
    assert swap_order(create_head(64, 4), 'resnet').paths() == []     # without head=, the head is left alone
    with pytest.raises(ValueError, match="its norm has 128 channels but would see 512 after the Linear"):
        swap_order(create_head(64, 4), 'resnet', head='linear-bn')


class ConvBN(nn.Module):
    "A conv and its BN in a module of their own, as timm's LeViT and RepViT build them (`ConvNorm`)"
    def __init__(self, ni, nf): super().__init__(); self.c, self.bn = nn.Conv2d(ni, nf, 3, padding=1, bias=False), nn.BatchNorm2d(nf)
    def forward(self, x): return self.bn(self.c(x))

class BNActConv(nn.Module):
    "BN, activation, conv in a module of their own, as DPN's `BnActConv2d`"
    def __init__(self, ni, nf): super().__init__(); self.bn, self.act, self.conv = nn.BatchNorm2d(ni), nn.ReLU(), nn.Conv2d(ni, nf, 1)
    def forward(self, x): return self.conv(self.act(self.bn(x)))

class Borders(nn.Module):
    "Chains across module borders: a conv and BN in a child, the activation in the parent; a conv at a child's end, BN and activation at the next child's start"
    def __init__(self):
        super().__init__()
        self.cb, self.act = ConvBN(3, 8), nn.ReLU()
        self.a, self.b = BNActConv(8, 8), BNActConv(8, 8)
    def forward(self, x): return self.b(self.a(self.act(self.cb(x))))


def test_chains_across_module_borders_swap():
    "timm's ResNet-D stem, LeViT's and RepViT's ConvNorm, DPN's BnActConv2d: 1, 14, 27 and 44 chains were missed"
    m = randomized(Borders())
    keys, x = list(m.state_dict()), torch.randn(2, 3, 8, 8)
    y = m(x)
    r = swap_order(m, 'bn_after')
    assert r.paths() == ['cb.c', 'a.conv'] and r.complete and list(m.state_dict()) == keys
    assert set(r.df.layer) == {'Borders'} and traced(m) == ['']   # the children's calls are inlined into the parent's forward
    with torch.no_grad():
        cb, a, b = m.cb, m.a, m.b
        h = a.conv(a.act(a.bn(cb.bn(m.act(cb.c(x))))))   # conv → act → bn across each border
        torch.testing.assert_close(m(x), b.conv(b.bn(b.act(h))))
    swap_order(m, 'resnet')
    assert torch.equal(m(x), y) and traced(m) == []


@pytest.mark.parametrize('name, stem', [('resnet26d', 'conv1.6'), ('levit_conv_128s', 'stem.conv1.linear'), ('repvit_m1', 'stem.conv1.c'),
                                        ('dla34', 'level2.tree1.conv1'),   # DLA's blocks take a shortcut and children: swapped in the model's own trace
                                        ('xception41', 'blocks.0.stack.conv1.conv_pw')])   # an Identity between a child's BN and the parent's ReLU
def test_timm_chains_across_borders(name, stem):
    from fastai_order.tools.zoo_row import chain_convs
    m = randomized(timm.create_model(name))
    chains, x = chain_convs(m), torch.randn(1, 3, 224, 224)
    y = m(x)
    r = swap_order(m, 'bn_after')
    assert stem in r.paths() and set(chains) <= set(r.paths())
    assert not torch.allclose(m(x), y)
    swap_order(m, 'resnet')
    assert torch.equal(m(x), y)


def test_a_child_with_hooks_is_not_inlined():
    m = randomized(Borders())
    m.cb.register_forward_hook(lambda *a: None)
    r = swap_order(m, 'bn_after')
    assert r.paths() == ['a.conv'] and 'cb' not in ' '.join(r.paths())   # the hook still fires: cb's chain is left as it was
    assert r.paths('skipped') == ['cb'] and 'has hooks' in r.df.reason[0] and not r.complete


def test_a_module_with_hooks_under_a_whole_trace_keeps_them_and_is_listed():
    "DLA is traced whole (its blocks take several inputs): a block with a hook stays a call, its chains are listed as skipped"
    m, calls = timm.create_model('dla34'), []
    m.level2.tree1.register_forward_hook(lambda *a: calls.append(1))
    r = swap_order(m, 'bn_after')
    m(torch.randn(1, 3, 64, 64))
    assert calls == [1] and 'level2.tree1.conv1' in r.paths('skipped') and not r.complete
    assert 'level2.tree2.conv1' in r.paths()
