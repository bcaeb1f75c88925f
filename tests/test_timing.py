"BatchTimer and LayerTimer: phases that add up, no device waits, and a Learner that stays sound whatever happens."
import time
import numpy as np, pytest, torch
from torch import nn
from fastai.learner import Learner, load_learner
from fastai.callback.core import Callback, CancelBatchException, CancelStepException
from fastai.callback.training import GradientAccumulation
import fastai.callback.schedule  # Learner.lr_find
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.vision.models.xresnet import xresnet18
from fastai_order.tools.synthetic import synthetic_dls
from fastai_order.model.layers import ordered_cnn
from fastai_order.timing.batch_timer import BatchTimer, PHASES, _Stats
from fastai_order.timing.clock import CudaClock
from fastai_order.timing.layer_timer import LayerTimer
from fastai_order.model.ops import ROLES

PH = [f'{p}_ms' for p in PHASES]


def learner(*cbs, order='resnet', n=96, **kw):
    return Learner(synthetic_dls(n=n, **kw), ordered_cnn(3, 4, [8, 16], order=order), loss_func=CrossEntropyLossFlat(),
                   metrics=accuracy, cbs=list(cbs))


def fit(learn, n=1, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, **kw)


def exact_sums(timer, prefix=''):
    "Phases add up to the total to the nanosecond"
    a = timer.rows.array()
    cols = slice(6, 13) if not prefix else slice(13, 20)
    assert np.array_equal(a[:, cols][:, :6].sum(1), a[:, cols][:, 6])


def test_rows_and_exact_sums():
    t = BatchTimer()
    learn = learner(t)
    fit(learn, 2)
    d = t.df
    assert list(d.split.value_counts()[['train', 'valid']]) == [2*len(learn.dls.train), 2*len(learn.dls.valid)]
    exact_sums(t)
    assert (d[PH] >= 0).all().all() and (d.forward_ms > 0).all() and (d.backward_ms[d.split == 'train'] > 0).all()
    assert (d.backward_ms[d.split == 'valid'] == 0).all() and set(d.outcome[d.split == 'valid']) == {'eval'}
    assert list(d.epoch.unique()) == [0, 1] and (d.bs[d.split == 'train'] == 16).all()
    s = t.summary()
    assert s.loc[('train', 'total'), 'n'] == 2*(len(learn.dls.train) - 2)  # 2 warm-up batches per epoch left out
    assert s.loc['train', 'pct'].drop('total').sum() == pytest.approx(100)
    assert t.summary(warmup=0).loc[('train', 'total'), 'n'] == 2*len(learn.dls.train)


def test_phase_attribution():
    "A callback's time goes to `other`; a slow loss goes to `loss`"
    class SlowCallback(Callback):
        def after_pred(self): time.sleep(0.02)
    def slow_loss(pred, y):
        time.sleep(0.03); return nn.functional.cross_entropy(pred, y)
    t = BatchTimer(warmup=0)
    learn = learner(t, SlowCallback())
    learn.loss_func = slow_loss
    fit(learn)
    d = t.df
    assert (d.other_ms >= 20).all() and (d.loss_ms >= 30).all()


def test_cancel_batch_and_step():
    class Cancel(Callback):
        def before_batch(self):
            if self.training and self.iter == 1: raise CancelBatchException()
        def before_step(self):
            if self.iter == 2: raise CancelStepException()
    t = BatchTimer()
    learn = learner(t, Cancel())
    fit(learn)
    d = t.df[t.df.split == 'train']
    assert list(d.outcome[:4]) == ['step', 'cancel', 'skip_step', 'step']
    assert d.backward_ms.iloc[1] == 0 and d.step_ms.iloc[1] == 0
    exact_sums(t)


def test_gradient_accumulation_and_fp16():
    t = BatchTimer()
    learn = learner(t, GradientAccumulation(32)).to_fp16()
    if torch.cuda.is_available(): fit(learn)
    else:
        with pytest.warns(UserWarning): fit(learn)  # GradScaler warns that CUDA is missing; it still runs
    d = t.df[t.df.split == 'train']
    assert list(d.outcome) == ['accumulate', 'step'] * 2
    assert (d.step_ms[d.outcome == 'accumulate'] == 0).all()
    exact_sums(t)


def test_validate_get_preds_lr_find():
    t = BatchTimer()
    learn = learner(t)
    learn.lr_find(num_it=5, show_plot=False)
    assert t.rows.n == 0
    learn.validate(); learn.get_preds()
    assert list(t.df.split.unique()) == ['validate', 'get_preds'] and list(t.df.run.unique()) == [1, 2]
    assert not any(type(c).__name__ == '_BatchTimerHead' for c in learn.cbs)


def test_interrupted_fit_keeps_rows_and_recovers():
    class Interrupt(Callback):
        def after_pred(self):
            if self.training and self.iter == 3: raise KeyboardInterrupt()
    t = BatchTimer()
    learn = learner(t, Interrupt())
    with pytest.raises(KeyboardInterrupt): fit(learn)
    assert t.rows.n == 3 and list(t.df.iter) == [0, 1, 2]
    learn.remove_cb(learn.interrupt)
    fit(learn)
    assert t.rows.n == 3 + len(learn.dls.train) + len(learn.dls.valid)
    exact_sums(t)
    assert sum(type(c).__name__ == '_BatchTimerHead' for c in learn.cbs) == 0


def test_added_twice_and_two_timers():
    t, u = BatchTimer(), BatchTimer()
    learn = learner(t)
    learn.add_cb(t); learn.add_cb(u)
    fit(learn)
    n = len(learn.dls.train) + len(learn.dls.valid)
    assert t.rows.n == n and u.rows.n == n
    exact_sums(t); exact_sums(u)


def test_removed_mid_fit():
    class Remover(Callback):
        def after_batch(self):
            if self.iter == 2 and hasattr(self.learn, 'batch_timer'): self.learn.remove_cb(self.learn.batch_timer)
    t = BatchTimer()
    learn = learner(t, Remover())
    fit(learn, 2)
    assert t.rows.n == 2  # batch 2 was not finished when the timer left
    assert not any(isinstance(c, BatchTimer) or type(c).__name__ == '_BatchTimerHead' for c in learn.cbs)
    fit(learn)  # the learner still trains


def test_bounded_rows_and_aggregates():
    t, full = BatchTimer(max_rows=5), BatchTimer()
    learn = learner(t, n=200)
    fit(learn, 2)
    n = 2*(len(learn.dls.train) + len(learn.dls.valid))
    assert t.rows.n == n and len(t.df) == 5 and t.rows.dropped == n - 5
    assert list(t.df.split) == ['train'] + ['valid'] * 4  # the newest rows
    s = t.summary()
    assert s.loc[('train', 'total'), 'n'] == 2*(len(learn.dls.train) - 2)
    with pytest.raises(ValueError, match='warmup=0'): t.summary(warmup=0)


@pytest.mark.parametrize('n_valid', [1, 2])
def test_a_short_split_is_never_left_empty(n_valid):
    "A validation set of 1 or 2 batches keeps its last batch of each epoch in summary, plot and the aggregates; longer splits lose `warmup`"
    t, agg = BatchTimer(), BatchTimer(max_rows=3)   # the second summarises from its running aggregates
    learn = learner(t, agg, n=80 + 16*n_valid, valid_pct=16*n_valid/(80 + 16*n_valid))
    assert (len(learn.dls.train), len(learn.dls.valid)) == (5, n_valid)
    fit(learn, 2)
    assert agg.rows.dropped and t.lengths == {(1, e, s): n for e in (0, 1) for s, n in ((0, 5), (1, n_valid))}
    for timer in (t, agg):
        s = timer.summary()
        assert s.loc[('train', 'total'), 'n'] == 2*3 and s.loc[('valid', 'total'), 'n'] == 2*1
    assert t.summary(warmup=0).loc[('valid', 'total'), 'n'] == 2*n_valid
    assert t.summary(warmup=1).loc[('valid', 'total'), 'n'] == 2*(n_valid - 1 or 1)
    kept = t.df.iter[t._kept(t.rows.array(), 2)].groupby(t.df.split, observed=True).agg(list)
    assert kept['valid'] == [n_valid - 1]*2 and kept['train'] == [2, 3, 4]*2
    fig = t.plot(splits=['valid'])
    assert len(fig.axes[0].patches) == 2*(n_valid - 1)   # the shaded warm-up batches
    learn.validate()
    assert t.summary().loc[('validate', 'total'), 'n'] == 1


def test_streaming_stats():
    rng = np.random.default_rng(0)
    x = rng.lognormal(15, 1, size=(5000, 7))
    st = _Stats()
    for r in x: st.add(r, 16)
    assert np.allclose(np.array(st.s) / st.n, x.mean(0)) and st.bs == 16*5000
    for q in (.5, .9, .99): assert np.allclose(st.quantile(q), np.quantile(x, q, axis=0), rtol=0.025)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match='-1'): BatchTimer(warmup=-1)
    with pytest.raises(ValueError, match="'gpu'"): BatchTimer(clock='gpu')
    with pytest.raises(ValueError, match='0'): BatchTimer(wandb_every=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA'): fit(learner(BatchTimer(clock='cuda')))
    t = BatchTimer(clock='host')
    with pytest.raises(ValueError, match='no batches'): t.plot()
    with pytest.raises(ValueError, match='no host times'): t.summary()
    fit(learner(t))
    with pytest.raises(ValueError, match="'forwards'"): t.summary(phases=['forwards'])
    with pytest.raises(ValueError, match="'gpu'"): t.summary(clock='gpu')
    assert t.summary().attrs['clock'] == 'host'
    with pytest.raises(ValueError, match='no device times'): t.summary(clock='device')
    with pytest.raises(ValueError, match="'test'"): t.plot(splits=['test'])
    with pytest.raises(ValueError, match='device'): t.plot(clock='device')
    assert len(t.summary(warmup=0, phases=['forward', 'total'])) == 4
    p = t.to_csv(tmp_path/'t.csv')
    with pytest.raises(FileExistsError, match='t.csv'): t.to_csv(p)
    t.to_csv(p, overwrite=True)
    fig = t.plot()
    assert len(fig.axes) == 4


def test_export_with_timer(tmp_path):
    t = BatchTimer()
    learn = learner(t)
    learn.path = tmp_path
    fit(learn)
    learn.export('l.pkl')
    back = load_learner(tmp_path/'l.pkl')
    assert back.batch_timer.rows.n == t.rows.n


# --- CUDA path, with events that complete late, like a GPU running behind the host

class FakeGPU:
    "A device that finishes each recorded event `lag` records later; counts waits"
    def __init__(self, lag): self.lag, self.events, self.waits, self.synced = lag, [], 0, -1
    def done(self, e): return e.idx + self.lag < len(self.events) or e.idx <= self.synced


def fake_events(gpu):
    class FakeEvent:
        def record(self, stream=None):
            self.idx, self.t = len(gpu.events), time.perf_counter_ns() + 1000  # the device runs 1 µs behind
            gpu.events.append(self)
        def query(self): return gpu.done(self)
        def synchronize(self): gpu.waits += 1; gpu.synced = max(gpu.synced, self.idx)  # and all before it
        def elapsed_time(self, end):
            if not (self.query() and end.query()): raise RuntimeError('event not complete')  # as CUDA does
            return (end.t - self.t) / 1e6
    return CudaClock(FakeEvent)


def test_cuda_events_no_waits_during_fit():
    gpu = FakeGPU(lag=40)
    t = BatchTimer(clock=fake_events(gpu))
    learn = learner(t)
    fit(learn, 2)
    assert gpu.waits == 0 and len(gpu.events) > 0
    assert t._device.pending > 0  # the last batches were still "running" when the fit ended
    d = t.df  # reading the results may wait, once
    assert gpu.waits == 1 and not t._device.pending
    assert d.device_total_ms.notna().all()
    exact_sums(t, 'device_')
    s = t.summary(clock='device')
    assert s.loc[('train', 'total'), 'n'] == 2*(len(learn.dls.train) - 2)


def test_device_events_pooled_and_only_at_phase_boundaries():
    "On a device whose clock is the count of records, each batch spans exactly its own records: 12 per train batch, 7 per valid"
    gpu = FakeGPU(lag=30)
    clock = fake_events(gpu)
    clock.event_cls.elapsed_time = lambda self, end: (end.idx - self.idx) / 1e3   # 1 µs per record
    t = BatchTimer(clock=clock)
    learn = learner(t)
    fit(learn, 2)
    d = t.df
    assert (d.device_total_ms[d.split == 'train'] == 0.012).all() and (d.device_total_ms[d.split == 'valid'] == 0.007).all()
    assert (d[[f'device_{p}' for p in PH]] >= 0).all().all()
    exact_sums(t, 'device_')
    assert len(set(map(id, gpu.events))) < 60 < len(gpu.events)   # read events are recorded again


def test_layer_timer_roles_and_cleanup():
    lt = LayerTimer(warmup=1)
    learn = Learner(synthetic_dls(n=96), xresnet18(n_out=4, c_in=3), loss_func=CrossEntropyLossFlat(), cbs=[lt])
    fit(learn)
    s = lt.summary()
    assert list(s.index) == [*ROLES, 'other']
    assert (s.loc[['conv', 'bn', 'act', 'pool'], 'forward_ms'] > 0).all() and (s.loc[['conv', 'bn', 'act'], 'backward_ms'] > 0).all()
    assert s.pct.sum() == pytest.approx(100)
    assert lt.batches == {'train': len(learn.dls.train) - 1, 'valid': len(learn.dls.valid) - 1}
    assert set(lt.df.path) >= {'0.0', '0.1', '4.0.convpath.0.0'}
    m = learn.model
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    with pytest.raises(ValueError, match="'tran'"): lt.summary('tran')


def test_layer_timer_cuda_path():
    "On a device clock one batch in 8 is timed, and only those run with hooks; nothing waits for the device during the fit"
    gpu = FakeGPU(lag=500)
    hooked = []
    class Probe(Callback):
        order = 1001   # after LayerTimer.before_batch
        def before_batch(self): hooked.append(any(m._forward_hooks for m in self.learn.model.modules()))
    lt = LayerTimer(clock=fake_events(gpu), warmup=1)
    learn = learner(lt, Probe(), n=400)
    fit(learn)
    assert gpu.waits == 0
    s = lt.summary()
    assert gpu.waits >= 1 and not lt._clock.pending and (s.loc[['conv', 'bn', 'act', 'pool'], 'forward_ms'] > 0).all()
    n_train = len(learn.dls.train)
    assert hooked[:n_train] == [(i - 1) % 8 == 0 and i >= 1 for i in range(n_train)]
    assert lt.batches['train'] == len(range(1, n_train, 8))
    lt2 = LayerTimer(clock=fake_events(FakeGPU(lag=5)), every=1, warmup=0)
    learn2 = learner(lt2)
    fit(learn2)
    assert lt2.batches['train'] == len(learn2.dls.train)


# --- on a real GPU (skipped without one): what the fake device checks above, on CUDA

def _syncs(learn, cbs):
    "Device synchronizations during a fit of `learn` with `cbs`, as counted by torch's CUDA sync debug mode"
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try: fit(learn, cbs=cbs)
        finally: torch.cuda.set_sync_debug_mode(0)
    return sum('synchroniz' in str(w.message) for w in caught)


@pytest.mark.cuda
def test_cuda_timers_add_no_syncs_and_add_up():
    learn = learner(n=400)
    learn.dls.to('cuda'); learn.model.cuda()
    fit(learn)   # warm-up: cuDNN, allocator
    base = _syncs(learn, [])
    assert _syncs(learn, [BatchTimer()]) == base and _syncs(learn, [LayerTimer()]) == base
    t, lt = BatchTimer(), LayerTimer(every=1)
    assert _syncs(learn, [t, lt]) == base
    exact_sums(t, 'device_')
    s = t.summary()
    assert s.attrs['clock'] == 'device'
    roles = lt.summary()
    assert roles.total_ms.sum() == pytest.approx(s.mean_ms['train', 'forward'] + s.mean_ms['train', 'backward'], rel=0.1)


# --- what tools read: the timer's own classes, and the raw nanoseconds on one clock

def test_own_classes_and_phase_ns():
    assert BatchTimer.own_classes() == (BatchTimer, type(BatchTimer()._head))
    gpu = FakeGPU(lag=40)
    t = BatchTimer(clock=fake_events(gpu))
    learn = learner(t)
    fit(learn)
    host, dev = t.phase_ns('host'), t.phase_ns('device')   # reading device times waits, once
    assert gpu.waits == 1 and host.shape == dev.shape == (t.rows.n, len(PHASES) + 1)
    assert np.array_equal(host[:, :-1].sum(1), host[:, -1]) and np.array_equal(dev[:, :-1].sum(1), dev[:, -1])
    assert np.allclose(host / 1e6, t.df[PH + ['total_ms']].to_numpy()) and np.array_equal(t.phase_ns('cuda'), dev)
    host[:] = 0
    assert t.phase_ns('host')[:, -1].min() > 0   # a copy: the timer's rows are its own
    with pytest.raises(ValueError, match="allowed: host, device"): t.phase_ns('auto')
    assert np.isnan(BatchTimer(clock='host').phase_ns('device')).all()


def test_one_clock_vocabulary():
    "The timers' `clock` and `summary(clock=)` take the same names; 'cuda' is the old spelling of 'device'"
    for cls in (BatchTimer, LayerTimer):
        assert cls(clock='device').clock == cls(clock='cuda').clock == 'device'
        with pytest.raises(ValueError, match=r"'gpu'.*allowed: auto, host, device"): cls(clock='gpu')
        with pytest.raises(TypeError, match='clock'): cls(clock=1)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA'): fit(learner(BatchTimer(clock='device')))
    t = BatchTimer(clock=fake_events(FakeGPU(lag=3)))
    fit(learner(t))
    pd_eq = lambda a, b: a.equals(b) and a.attrs == b.attrs
    assert pd_eq(t.summary(clock='cuda'), t.summary(clock='device')) and t.summary().attrs['clock'] == 'device'
    with pytest.raises(TypeError, match='wandb_every'): BatchTimer(wandb_every='1')
    with pytest.raises(TypeError, match='overwrite'): t.to_csv('never_written.csv', overwrite='yes')
