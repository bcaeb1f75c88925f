"The order travels with the model: checkpoints record it, loading across orders warns once, repr and summary show it."
import copy, io, warnings
import pytest, torch, torchvision
from torch import nn
from fastai.learner import Learner, load_learner
from fastai_order.model.layers import ordered_xresnet, ordered_cnn
from fastai_order.model.record import OrderWarning, saved_orders, stamped_order
from fastai_order.rewrite.swap import swap_order, chain_orders
from fastai_order.tools.synthetic import synthetic_dls


def resnet18(): return torchvision.models.resnet18(num_classes=4)

def trained_like(model):
    "`model` with weights and norm statistics moved off their initial values, as after training"
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point(): t.add_(0.05 * torch.randn_like(t))
    return model

def learner(model, path): return Learner(synthetic_dls(n=16, bs=8, size=32), model, loss_func=nn.CrossEntropyLoss(), path=path)

def order_warnings(f):
    "The OrderWarnings `f()` raises"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        f()
    return [str(x.message) for x in w if x.category is OrderWarning]

x = torch.randn(2, 3, 32, 32)


def test_learn_load_into_a_fresh_learner_in_another_order_warns_once_naming_both_orders_and_the_call(tmp_path):
    learn = learner(trained_like(resnet18()), tmp_path)
    learn.swap_order('bn_after')
    learn.save('swapped', with_opt=False)
    fresh = learner(resnet18(), tmp_path)   # a stock model: never stamped
    w = order_warnings(lambda: fresh.load('swapped', with_opt=False))
    assert len(w) == 1, w
    assert "saved in order conv-act-bn" in w[0] and "run conv-bn-act" in w[0] and "learn.swap_order('conv-act-bn')" in w[0]
    fresh.swap_order('conv-act-bn')   # the call the warning names: the weights loaded stay
    assert torch.equal(fresh.model.eval()(x), learn.model.eval()(x))
    assert order_warnings(lambda: fresh.load('swapped', with_opt=False)) == []


def test_a_checkpoint_without_orders_loads_silently_into_any_order(tmp_path):
    "Stock fastai/torchvision checkpoints, and those saved before orders were kept: fine-tuning pretrained weights in another order"
    stock = trained_like(resnet18())
    (tmp_path/'models').mkdir()
    torch.save(stock.state_dict(), tmp_path/'models'/'stock.pth')
    learn = learner(resnet18(), tmp_path)
    learn.swap_order('bn_after')
    assert order_warnings(lambda: learn.load('stock', with_opt=False)) == []
    assert torch.equal(learn.model.conv1.weight, stock.conv1.weight)
    model = ordered_xresnet('xresnet18', 'bn_after', n_out=4)
    from fastai.vision.models.xresnet import xresnet18
    assert order_warnings(lambda: model.load_state_dict(xresnet18(n_out=4).state_dict())) == []


def test_state_dict_records_the_orders_and_keeps_the_keys():
    model = resnet18()
    keys = list(model.state_dict())
    swap_order(model, 'bn_after')
    sd = model.state_dict()
    assert list(sd) == keys
    assert saved_orders(sd) == chain_orders(model) and saved_orders(sd)['layer1.0.conv1'] == 'conv-act-bn'
    buf = io.BytesIO(); torch.save(sd, buf); buf.seek(0)
    assert saved_orders(torch.load(buf, weights_only=True)) == saved_orders(sd)
    resnet18().load_state_dict(sd)   # a model without stamps takes the keys as they are (strict)


def test_load_state_dict_into_a_swapped_model_in_another_order_warns_once_per_load():
    saved = trained_like(resnet18()); swap_order(saved, 'bn_after')
    target = resnet18(); swap_order(target, 'resnet')
    for _ in range(2):   # every load says it, once
        w = order_warnings(lambda: target.load_state_dict(saved.state_dict()))
        assert len(w) == 1 and 'saved in order conv-act-bn' in w[0] and 'runs conv-bn-act' in w[0], w
    with warnings.catch_warnings():   # on purpose: the weights load all the same
        warnings.simplefilter('error')
        warnings.simplefilter('ignore', OrderWarning)
        target.load_state_dict(saved.state_dict())
    assert torch.equal(target.layer1[0].conv1.weight, saved.layer1[0].conv1.weight)
    assert order_warnings(lambda: target.load_state_dict(target.state_dict())) == []


def test_ordered_models_record_their_order_and_warn_across_orders():
    a, b = ordered_cnn(order='bn_after'), ordered_cnn(order='resnet')
    assert set(saved_orders(a.state_dict()).values()) == {'conv-act-bn-pool'}
    assert 'order=conv-act-bn-pool' in repr(a[0])
    w = order_warnings(lambda: b.load_state_dict(a.state_dict()))
    assert len(w) == 1 and "swap_order(model, 'conv-act-bn-pool')" in w[0]
    swap_order(b, 'bn_after')
    assert order_warnings(lambda: b.load_state_dict(a.state_dict())) == []
    xs = torch.randn(2, 3, 16, 16)
    assert torch.equal(b.eval()(xs), a.eval()(xs))


def test_the_order_survives_torch_save_deepcopy_and_export(tmp_path):
    learn = learner(trained_like(resnet18()), tmp_path)
    learn.swap_order('bn_after')
    y = learn.model.eval()(x)
    buf = io.BytesIO(); torch.save(learn.model, buf); buf.seek(0)
    learn.export(tmp_path/'swapped.pkl')
    for m in (torch.load(buf, weights_only=False), copy.deepcopy(learn.model), load_learner(tmp_path/'swapped.pkl').model):
        assert torch.equal(m.eval()(x), y)
        assert stamped_order(m.layer1[0].conv1) == 'conv-act-bn' and 'order=conv-act-bn)' in repr(m.layer1[0])
        assert saved_orders(m.state_dict()) == saved_orders(learn.model.state_dict())
        w = order_warnings(lambda: m.load_state_dict(resnet18().state_dict()))   # stock weights: silent
        assert w == []


def test_repr_shows_each_rewritten_chain_and_summary_lists_layers_as_they_run(tmp_path):
    learn = learner(resnet18(), tmp_path)
    learn.swap_order('bn_after')
    assert 'bias=False, order=conv-act-bn)' in repr(learn.model.layer1[0].conv1)
    lines = [l.split()[0] for l in str(learn.summary()).splitlines() if l[:1].isalpha()]
    i = lines.index('Conv2d', 1)   # the first block's first conv
    assert lines[i:i+3] == ['Conv2d', 'ReLU', 'BatchNorm2d'], lines[:12]
    assert '(conv-act-bn)' in str(learn.summary())
    stock = learner(resnet18(), tmp_path)
    lines = [l.split()[0] for l in str(stock.summary()).splitlines() if l[:1].isalpha()]
    i = lines.index('Conv2d', 1)
    assert lines[i:i+3] == ['Conv2d', 'BatchNorm2d', 'ReLU']
