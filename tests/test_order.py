import pytest
from hypothesis import given, strategies as st
from fastai_order.model.ops import OPS
from fastai_order.model.order import LayerOrder, PRESETS, list_presets

orders = st.lists(st.sampled_from(OPS[1:]), unique=True).flatmap(
    lambda rest: st.permutations(['conv', *rest])).map(LayerOrder)


@pytest.mark.parametrize('spec', ['conv-bn-act', 'conv>bn>act', ' conv - norm - relu ', ['conv', 'bn', 'act'],
                                  ('conv', 'bn', 'act'), 'resnet', 'RESNET', LayerOrder('conv-bn-act')])
def test_spec_forms(spec):
    assert LayerOrder(spec) == LayerOrder('conv-bn-act')
    assert str(LayerOrder(spec)) == 'conv-bn-act'


@given(orders)
def test_str_round_trip_and_hash(o):
    assert LayerOrder(str(o)) == o and hash(LayerOrder(list(o))) == hash(o)
    assert LayerOrder('>'.join(o)) == o


@given(orders, st.sets(st.sampled_from(OPS[1:])))
def test_restrict_keeps_relative_order(o, keep):
    r = LayerOrder(o).restrict({'conv', *keep})
    assert set(r) == {'conv', *keep} & set(o)
    assert sorted(r, key=o.index) == list(r)


@given(orders, st.lists(st.sampled_from(OPS[1:]), unique=True))
def test_fit_has_exactly_the_layer_ops(o, ops):
    f = o.fit(['conv', *ops])
    assert set(f) == {'conv', *ops}
    named = [op for op in f if op in o]
    assert named == [op for op in o if op in f]  # ops the order names keep its order, the rest follow
    assert all(f.index(a) < f.index(b) for a in named for b in f if b not in o)


@pytest.mark.parametrize('bad,msg', [
    ('conv-bnn-act', "Unknown op 'bnn'"), ('conv-bnn-act', "did you mean 'bn'?"),
    ('conv-bn-act-bn', "'bn' appears twice"), ('conv-norm-bn', "'bn' appears twice"),
    ('bn-act', "has no 'conv'"), ('', 'Empty order'), ('-', 'Empty order'),
    ('resnett', "did you mean 'resnet'?"), ('conv-pol', "did you mean 'pool'?")])
def test_bad_specs_name_the_bad_part_and_what_is_allowed(bad, msg):
    with pytest.raises(ValueError) as e: LayerOrder(bad)
    assert msg in str(e.value)
    if 'twice' not in msg: assert 'allowed ops: conv, bn' in str(e.value) and 'resnet' in str(e.value)


@pytest.mark.parametrize('bad', [3, None, ['conv', 3]])
def test_bad_types(bad):
    with pytest.raises(TypeError, match='LayerOrder|tokens'): LayerOrder(bad)


def test_presets():
    expected = dict(resnet='conv-bn-act', bn_after='conv-act-bn', preact='bn-act-conv',
                    keras_question='conv-act-pool-drop-bn', resnet_pool_drop='conv-bn-act-pool-drop',
                    lesson7='conv-act-bn-pool', pool_before_act='conv-bn-pool-act', pool_before_bn='conv-pool-bn-act')
    assert {n: str(LayerOrder(n)) for n in PRESETS} == expected
    assert all(LayerOrder(s).name == n for n, s in expected.items())
    df = list_presets()
    assert list(df.columns) == ['name', 'order', 'source'] and df.source.str.len().min() > 10


def test_bn_1st_matches_fastai():
    assert LayerOrder.from_bn_1st(True) == 'resnet' and LayerOrder.from_bn_1st(False) == 'bn_after'
    assert LayerOrder('preact').bn_1st is True and LayerOrder('keras_question').bn_1st is False
    assert LayerOrder('conv-bn').bn_1st is None
    assert 'norm' in LayerOrder('resnet') and 'relu' in LayerOrder('resnet') and 'pool' not in LayerOrder('resnet')
