"Property tests of the commutation rules: an exact verdict means equal outputs and input gradients in float64, a never verdict means inputs where they differ."
import torch, torch.nn as nn
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from fastai_order.model.ops import ACTIVATIONS, _resolve
from fastai_order.model.ops import op_names
from fastai_order.model.ops import NAMES
from fastai_order.rewrite.commute import MODES, commutes, equivalent_orders
from fastai_order.model.order import LayerOrder

def _names(order, pool, drop): return op_names(LayerOrder(order), pool, drop)

ACTS = [a for a in map(_resolve, ACTIVATIONS) if a is not nn.Identity]


class Bias(nn.Module):
    "A per-channel bias, as a conv's bias"
    def __init__(self, c, g): super().__init__(); self.b = nn.Parameter(torch.randn(c, generator=g))
    def forward(self, x): return x + self.b.view(1, -1, 1, 1)


class MaskDrop(nn.Module):
    "Inverted dropout whose mask depends only on this op and the input's shape, so both orders draw the same mask"
    def __init__(self, p, channel, seed): super().__init__(); self.p,self.channel,self.seed = p,channel,seed
    def forward(self, x):
        if not self.training: return x
        shape = (*x.shape[:2], 1, 1) if self.channel else x.shape
        g = torch.Generator().manual_seed(hash((self.seed, tuple(shape))) % 2**31)
        return x * (torch.rand(shape, generator=g) >= self.p) / (1 - self.p)


def build(name, c, mode, act, g, d=None):
    "A float64 module for op `name` on `c` channels, with parameters drawn from `g` and hyper-parameters from hypothesis' `d` (else defaults)"
    pick = (lambda strat, default: d.draw(strat)) if d else (lambda strat, default: default)
    if name == 'conv': m = nn.Conv2d(c, c, 3, padding=1)
    elif name == 'conv1x1': m = nn.Conv2d(c, c, 1)
    elif name == 'conv_bias': m = Bias(c, g)
    elif name == 'bn':
        m = nn.BatchNorm2d(c)
        sign = pick(st.sampled_from(['pos', 'mixed']), 'mixed')
        with torch.no_grad():
            w = torch.rand(c, generator=g) + 0.1
            m.weight.copy_(w if sign == 'pos' else w * torch.where(torch.arange(c) % 2 == 0, 1., -1.))
            m.bias.copy_(torch.randn(c, generator=g)); m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    elif name == 'act': m = act(init=pick(st.sampled_from([0.25, -0.25]), 0.25)) if act is nn.PReLU else act()
    elif name in ('maxpool', 'avgpool'):
        k = pick(st.integers(2, 3), 2); s = pick(st.integers(1, k), 2); p = pick(st.integers(0, k // 2), 0)
        ceil = pick(st.booleans(), False)
        m = (nn.MaxPool2d(k, s, p, ceil_mode=ceil) if name == 'maxpool' else
             nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=pick(st.booleans(), True)))
    else: m = MaskDrop(pick(st.floats(0.2, 0.7), 0.5), name == 'drop2d', pick(st.integers(0, 1000), 0))
    return m.double().train(mode == 'train')


def conditions(mods):
    "The facts the rules may ask for, read from the built modules"
    out = {}
    for m in mods:
        if isinstance(m, nn.BatchNorm2d):
            a = m.weight / torch.sqrt(m.running_var + m.eps)
            out.update(bn_scale_nonneg=bool((m.weight >= 0).all()), bn_shift_zero=bool(((m.bias - a * m.running_mean).abs() < 1e-12).all()))
        if isinstance(m, nn.AvgPool2d): out['avg_pad_free'] = m.padding == 0 or not m.count_include_pad
        if isinstance(m, nn.PReLU): out['act_non_decreasing'] = bool((m.weight >= 0).all())
    return out


def _bias(values):
    m = Bias(len(values), torch.Generator()).double()
    with torch.no_grad(): m.b.copy_(values)
    return m


def _bn_affine(bn): s = bn.weight / torch.sqrt(bn.running_var + bn.eps); return s, bn.bias - s * bn.running_mean


def swapped(a, b, ma, mb):
    "The modules computing `a` then `b` in the other order: the same modules, or with a bias or BN moved across as the rule says"
    if {a, b} == {'conv_bias', 'bn'}:  # eval: BN(x + c) = BN(x) + s·c
        if a == 'conv_bias': return [mb, _bias(ma.b * _bn_affine(mb)[0])]
        return [_bias(mb.b / _bn_affine(ma)[0]), ma]
    if {a, b} == {'conv_bias', 'conv1x1'}:  # W·(x + c) = W·x + W·c
        if a == 'conv_bias': return [mb, _bias(mb.weight[:, :, 0, 0] @ ma.b)]
        return [_bias(torch.linalg.solve(ma.weight[:, :, 0, 0], mb.b)), ma]
    if {a, b} == {'bn', 'conv1x1'}:  # eval: the BN folds into the 1x1 conv, on the side it is on
        bn, conv = (ma, mb) if a == 'bn' else (mb, ma)
        s, t = _bn_affine(bn)
        W, beta = conv.weight[:, :, 0, 0], conv.bias
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, 1).double().eval()
        with torch.no_grad():
            if a == 'bn': folded.weight.copy_((W * s)[..., None, None]); folded.bias.copy_(beta + W @ t)
            else: folded.weight.copy_((s[:, None] * W)[..., None, None]); folded.bias.copy_(s * beta + t)
        return [nn.Identity(), folded]
    return [mb, ma]


def run(mods, x):
    x = x.clone().requires_grad_()
    y = x
    for m in mods: y = m(y)
    (y * torch.linspace(-1, 2, y.numel()).view_as(y)).sum().backward()  # a non-uniform upstream gradient
    return y.detach(), x.grad


def same(r1, r2): return r1[0].shape == r2[0].shape and all(torch.allclose(u, v, rtol=1e-9, atol=1e-10) for u, v in zip(r1, r2))


pairs = st.tuples(st.sampled_from(NAMES), st.sampled_from(NAMES)).filter(lambda p: p[0] != p[1])


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=pairs, mode=st.sampled_from(MODES), act=st.sampled_from(ACTS), seed=st.integers(0, 2**16), d=st.data(),
       n=st.integers(2, 4), c=st.integers(2, 4), h=st.integers(10, 13), w=st.integers(10, 13))
def test_verdicts_hold(pair, mode, act, seed, d, n, c, h, w):
    a, b = pair
    g = torch.Generator().manual_seed(seed)
    ma, mb = build(a, c, mode, act, g, d), build(b, c, mode, act, g, d)
    v = commutes(a, b, mode, act=act, **conditions([ma, mb]))
    assert v.kind in ('exact', 'never'), v  # every condition was given
    other = swapped(a, b, ma, mb)
    if v.kind == 'exact':
        x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
        assert same(run([ma, mb], x), run(other, x)), (a, b, mode, act, v)
    else:  # an input built to tell the orders apart does
        xs = counterexamples(ma if a == 'act' else mb if b == 'act' else act(), (n, c, h, w), g)
        for m, o in ((ma, mb), (mb, ma)):
            if isinstance(m, MaskDrop): m.seed = mixed_seed(m, [(n, c, h, w), o(torch.zeros(n, c, h, w, dtype=torch.float64)).shape])
        assert any(not same(run([ma, mb], x), run(other, x)) for x in xs), (a, b, mode, act, v)


def mixed_seed(drop, shapes):
    "The first seed from `drop`'s own on which its mask both keeps and drops elements at each of `shapes`: the masks a counterexample needs"
    def mixed(seed):
        for shape in shapes:
            m = MaskDrop(drop.p, drop.channel, seed)(torch.ones(shape, dtype=torch.float64))
            if not (m == 0).any() or (m == 0).all(): return False
        return True
    return next(s for s in range(drop.seed, drop.seed + 10_000) if mixed(s))


def decreasing_pair(f, lo=-8., hi=8., steps=3201):
    "(x1, x2) with x1 < x2 and f(x1) > f(x2) by a clear margin, from a scan of activation `f` in float64; None if `f` is non-decreasing on the scan"
    x = torch.linspace(lo, hi, steps, dtype=torch.float64)
    with torch.no_grad(): y = f.double()(x) if isinstance(f, nn.Module) else f(x)
    best = torch.cummax(y, 0)
    gap = best.values[:-1] - y[1:]   # how far each point lies below the largest value before it
    j = int(gap.argmax())
    return (x[best.indices[j]].item(), x[j+1].item()) if gap[j] > 1e-3 else None


def checkerboard(v1, v2, shape):
    "A batch of `shape` whose every channel alternates `v1` and `v2` along both spatial axes: any pooling window of 2 or more holds both"
    n, c, h, w = shape
    pattern = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0
    x = torch.where(pattern, v1, v2).to(torch.float64).expand(n, c, h, w).clone()
    return x * torch.linspace(1, 1.5, c, dtype=torch.float64).view(1, c, 1, 1)   # channels differ, so channel mixing shows


def counterexamples(act, shape, g):
    "Inputs built to tell apart two orders the rules call 'never': a window where the activation `act` falls (max pooling picks another element), one where the sign changes (a threshold moves, an average of a non-linear f), and a generic one"
    pair = decreasing_pair(act)
    xs = [checkerboard(*pair, shape)] if pair else []
    xs += [checkerboard(-2., 1., shape), checkerboard(0.5, 3., shape)]
    return xs + [torch.randn(shape, generator=g, dtype=torch.float64) * 2 - 0.5]


def test_never_verdict_gets_a_counterexample():
    "The draw that random inputs once missed: GELU and max pooling in training on a batch of 2; the built input separates the orders"
    g = torch.Generator().manual_seed(0)
    ma, mb = build('act', 3, 'train', nn.GELU, g), nn.MaxPool2d(3, 2, 1).double()
    assert commutes('act', 'maxpool', 'train', act=nn.GELU).kind == 'never'
    x1, x2 = decreasing_pair(nn.GELU())
    assert x1 < x2 and nn.GELU()(torch.tensor(x1)) > nn.GELU()(torch.tensor(x2))
    assert not same(run([ma, mb], checkerboard(x1, x2, (2, 3, 10, 10))), run([mb, ma], checkerboard(x1, x2, (2, 3, 10, 10))))
    assert decreasing_pair(nn.ReLU()) is None and decreasing_pair(nn.LeakyReLU(0.1)) is None


@pytest.mark.parametrize('act', [nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish])
def test_non_monotone_acts_change_max_pooling(act):
    "The facts' numbers: on post-BN N(0,1) data with 2x2 pooling a share of outputs differ"
    x = torch.randn(8, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    pool, f = nn.MaxPool2d(2), act()
    assert not commutes('act', 'maxpool', act=act)
    assert (f(pool(x)) != pool(f(x))).double().mean() > 0.001


def test_equivalent_orders_compute_the_same():
    "Every order `equivalent_orders` returns computes what the original does, in float64"
    g = torch.Generator().manual_seed(0)
    for mode in MODES:
        for order in ['conv-bn-act-pool-drop', 'conv-act-bn-pool-drop', 'conv-act-pool-bn-drop']:
            for drop in ('drop', 'drop2d'):
                mods = {n: build(n, 4, mode, nn.ReLU, g) for n in _names(order, 'max', drop)}
                x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
                ref = run([mods[n] for n in _names(order, 'max', drop)], x)
                for eq in equivalent_orders(order, mode, drop=drop):
                    names = _names(eq, 'max', drop)
                    folded = mode == 'eval' and 'bn' not in names
                    seq = [_fold(mods['conv'], mods['bn']) if n == 'conv' and folded else mods[n] for n in names]
                    assert same(ref, run(seq, x)), (mode, order, drop, str(eq))



def _fold(conv, bn):
    "`conv` followed by eval-mode `bn`, as one conv"
    s, t = _bn_affine(bn)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding).double().eval()
    with torch.no_grad(): out.weight.copy_(conv.weight * s.view(-1, 1, 1, 1)); out.bias.copy_(s * conv.bias + t)
    return out
