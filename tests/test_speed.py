"Paired step timing of a comparison: one train step and one inference call per order, interleaved; the learners are left as they were."
import pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.torch_core import set_seed
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam
from fastai.metrics import accuracy
import fastai.callback.schedule  # noqa: F401
import fastai_order.experiment.speed as fs
from fastai_order.experiment.speed import step_times, train_step, eval_call, kept_as_is
from fastai_order.experiment.setting import Setting
from fastai_order.model.layers import ordered_cnn
from fastai_order.timing.paired import paired_times, paired_ratios
from fastai_order.tools.synthetic import synthetic_dls

ORDERS = ['conv-bn-act-pool', 'conv-pool-bn-act', 'conv-act-bn-pool']


def learner(order='conv-bn-act-pool', dls=None, seed=0, **kw):
    set_seed(seed)   # the weights and the data loaders' shuffles
    dls = dls or synthetic_dls(n=96, bs=16, size=16, n_out=4)
    return Learner(dls, ordered_cnn(3, 4, (8, 16), order=order), **{'loss_func': CrossEntropyLossFlat(), 'metrics': accuracy, **kw})


def fit(learn, n=1):
    with learn.no_bar(), learn.no_logging(): learn.fit(n)


def snapshot(learn):
    "Everything of `learn` a timing could change: weights and buffers, modes, gradients, optimizer state, the data's shuffle, the random generators"
    m = learn.model
    return dict(state={k: v.clone() for k, v in m.state_dict().items()}, modes=[x.training for x in m.modules()],
                grads=[None if p.grad is None else p.grad.clone() for p in m.parameters()], opt=learn.opt,
                opt_state=None if learn.opt is None else [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                                                          for s in (learn.opt.state[p] for p in m.parameters())],
                shuffles=[dl.rng.getstate() for dl in learn.dls.loaders], torch_rng=torch.get_rng_state())


def same(a, b):
    eq = lambda x, y: (x is None and y is None) or (isinstance(x, torch.Tensor) and torch.equal(x, y)) or x == y
    assert a['state'].keys() == b['state'].keys() and all(torch.equal(a['state'][k], b['state'][k]) for k in a['state'])
    assert a['modes'] == b['modes'] and all(eq(x, y) for x, y in zip(a['grads'], b['grads'])) and a['opt'] is b['opt']
    assert (a['opt_state'] is None) == (b['opt_state'] is None)
    for s, t in zip(a['opt_state'] or [], b['opt_state'] or []): assert s.keys() == t.keys() and all(eq(s[k], t[k]) for k in s)
    assert a['shuffles'] == b['shuffles'] and torch.equal(a['torch_rng'], b['torch_rng'])


def test_the_frame_is_long_by_step_and_wide_by_order():
    dls = synthetic_dls(n=96, bs=16, size=16, n_out=4)
    t = step_times({o: learner(o, dls) for o in ORDERS}, Setting('cpu'), repeats=3)
    assert t.columns.tolist() == ['step', 'repeat', *ORDERS]
    assert t.step.tolist() == ['train'] * 3 + ['valid'] * 3 and t.repeat.tolist() == [0, 1, 2] * 2
    assert (t[ORDERS] > 0).all().all()
    r = paired_ratios(t[t.step == 'train'][ORDERS])
    assert r.arm.tolist() == ORDERS and r.ratio[0] == 1.0


@pytest.mark.parametrize('trained', [False, True])
def test_the_learners_are_left_as_they_were(trained):
    learns = {o: learner(o, lr=1e-2) for o in ORDERS[:2]}
    for l in learns.values():
        if trained: fit(l)   # an optimizer with state; a model in eval mode after validation
        else: l.model[1].eval()   # a module in its own mode
    before = {o: snapshot(l) for o, l in learns.items()}
    step_times(learns, repeats=2)
    for o, l in learns.items(): same(before[o], snapshot(l))


def test_a_fit_after_the_timing_is_the_fit_without_it():
    "Same seed, same data order, same weights: the timed learner trains exactly as its untimed twin"
    a, b = learner(seed=1), learner(seed=1)
    step_times({'a': a}, repeats=2)
    set_seed(2); fit(a)
    set_seed(2); fit(b)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_it_times_the_learners_own_step_with_the_one_harness(monkeypatch):
    "The learner's loss function and a fresh optimizer of its `opt_func`, forward to step; an inference call in eval mode without gradients; `paired_times` on the setting's device"
    calls, made, seen = [], [], []
    def spy(arms, *args, **kwargs): calls.append((list(arms), kwargs)); return paired_times(arms, *args, **kwargs)
    monkeypatch.setattr(fs, 'paired_times', spy)
    def loss(pred, y): seen.append(('loss', torch.is_grad_enabled())); return CrossEntropyLossFlat()(pred, y)
    def opt_func(params, **kw): o = Adam(params, **kw); made.append(o); return o
    l = learner(loss_func=loss, opt_func=opt_func)
    l.model.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled(), i[0].shape[0])))
    step_times({'a': l, 'b': learner()}, repeats=2, steps=3, warmup=1)
    assert [a for a, _ in calls] == [['a', 'b'], ['a', 'b']]
    assert all(kw == dict(repeats=2, warmup=1, number=3, device=torch.device('cpu'), progress=False) for _, kw in calls)
    assert len(made) == 1 and l.opt is None and made[0].state and all(s['step'] == 3*3 for s in made[0].state.values() if 'step' in s)
    train, valid = seen[:2*3*3], seen[2*3*3:]   # (warm-up + 2 repeats) × 3 steps: a forward and a loss each
    assert set(train) == {(True, True, 16), ('loss', True)} and set(valid) == {(False, False, 16)} and len(valid) == 3*3


def test_the_valid_batch_has_the_runs_batch_size():
    "A validation set smaller than a batch is repeated to the batch size; without one, the train batch is the inference batch"
    shapes = []
    l = learner(dls=synthetic_dls(n=72, bs=16, size=16, n_out=4, valid_pct=5/72))
    assert len(l.dls.valid_ds) == 5
    l.model.register_forward_hook(lambda m, i, o: shapes.append((m.training, i[0].shape[0])))
    step_times({'a': l}, repeats=1, warmup=0)
    assert shapes == [(True, 16), (False, 16)]
    x, y, xv = fs._batches(learner(dls=synthetic_dls(n=64, bs=16, size=16, n_out=4, valid_pct=0)), Setting('cpu'))
    assert torch.equal(x[0], xv[0]) and y[0].shape == (16,)


def test_bf16_autocast_and_channels_last():
    dtypes = []
    l = learner()
    l.model.register_forward_hook(lambda m, i, o: dtypes.append((o.dtype, i[0].is_contiguous(memory_format=torch.channels_last))))
    step_times({'a': l}, Setting('cpu', 'bf16', 'channels_last'), repeats=1, warmup=0)
    assert dtypes == [(torch.bfloat16, True)] * 2


def test_train_step_and_eval_call_defaults_keep_the_benchmarks_behaviour():
    "Without a loss or an optimizer: cross-entropy and SGD; `eval_call` in inference mode by default"
    torch.manual_seed(0)
    m, x, y = ordered_cnn(3, 4, (8,)), torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    m2 = ordered_cnn(3, 4, (8,)); m2.load_state_dict(m.state_dict())
    train_step(m, x, y)()
    opt = torch.optim.SGD(m2.parameters(), lr=1e-3, momentum=0.9)
    nn.functional.cross_entropy(m2(x), y).backward(); opt.step()
    assert all(torch.allclose(p, q) for p, q in zip(m.parameters(), m2.parameters()))
    modes = []
    m.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    eval_call(m, x)(); eval_call(m, x, grad_mode=torch.no_grad)()
    assert modes == [True, False]
    with kept_as_is(m): train_step(m, x, y)()
    assert all(torch.allclose(p, q) for p, q in zip(m.parameters(), m2.parameters()))


def test_bad_input():
    l = learner()
    with pytest.raises(ValueError, match='at least one learner'): step_times({})
    with pytest.raises(ValueError, match="'repeat'"): step_times({'repeat': l})
    with pytest.raises(ValueError, match='`repeats` must be an integer ≥ 1, got 0'): step_times({'a': l}, repeats=0)
    with pytest.raises(TypeError, match='`steps`'): step_times({'a': l}, steps=1.5)
    with pytest.raises(ValueError, match='`warmup`'): step_times({'a': l}, warmup=-1)
