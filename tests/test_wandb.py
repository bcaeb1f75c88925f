"BatchTimer on W&B, through the real wandb client in offline mode, with and without fastai's WandbCallback."
from pathlib import Path
import pytest, torch, torchvision, wandb
import fastai.callback.wandb as fastai_wandb
from fastai.callback.wandb import WandbCallback
from fastai_order.timing import wandb as fo_wandb
from fastai_order.timing.batch_timer import BatchTimer, PHASES
from fastai_order.rewrite.swap import swap_order
from fastai_order.experiment.run import RunConfig, train_run
from wandb_history import history, config, summary
from test_timing import learner, FakeGPU, fake_events


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline'); monkeypatch.setenv('WANDB_SILENT', 'true')
    r = wandb.init(project='fastai-order-tests', dir=tmp_path)
    yield r
    if wandb.run is not None: wandb.finish()


def fit(learn, n, cbs=None):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, cbs=cbs)


def test_with_wandb_callback(run):
    learn = learner(BatchTimer(wandb_every=0.001), n=160)
    fit(learn, 2, cbs=WandbCallback(log_preds=False))
    fit(learn, 1, cbs=WandbCallback(log_preds=False))
    run_dir = Path(run.dir).parent
    run.finish()
    h = history(run_dir)
    steps = [r['_step'] for r in h]
    assert steps == list(range(len(steps)))  # one row per step, none dropped or out of order
    assert len(steps) >= 3 * len(learn.dls.train)
    # WandbCallback's own metrics, for every epoch of both fits
    ends = [r for r in h if 'valid_loss' in r]
    assert [r['epoch'] for r in ends] == [1, 2, 3] and all('accuracy' in r for r in ends)
    assert sum('train_loss' in r for r in h) == 3 * len(learn.dls.train)
    # and the timing keys, in the same rows
    for split in ('train', 'valid'):
        assert any(f'timing/{split}/total_ms' in r for r in h)
        assert all(f'timing/{split}/{p}_ms' in r for r in h if f'timing/{split}/total_ms' in r for p in PHASES)
    assert any('timing/train/total_ms' in r and 'train_loss' in r for r in h)
    assert sum('timing/summary.nrows' in r for r in h) == 2  # one table per fit
    assert summary(run_dir)['timing/clock'] == 'host'
    # the fixed config logging recorded the Learner's arguments
    c = config(run_dir)
    assert c['batch size'] == 16 and c['Learner']['_name'].startswith('<fastai.learner.Learner')
    assert c['BatchTimer'] == {'warmup': 2, 'max_rows': 100_000, 'clock': 'auto', 'wandb_every': 0.001}


def test_own_step_axis(run):
    learn = learner(BatchTimer(wandb_every=0.001))
    fit(learn, 2)
    summary = dict(run.summary)
    run_dir = Path(run.dir).parent
    run.finish()
    h = history(run_dir)
    timed = [r for r in h if 'timing/train/total_ms' in r]
    assert timed and all('timing/batch' in r for r in timed)
    assert [r['timing/batch'] for r in timed] == sorted(r['timing/batch'] for r in timed)
    assert summary['timing/train/samples_per_s'] > 0 and 'timing/train/forward_pct' in summary


def test_window_aggregates(run):
    "Window means, not a point per batch: a long window logs once per epoch"
    learn = learner(BatchTimer(wandb_every=3600), n=320)
    fit(learn, 2)
    run_dir = Path(run.dir).parent
    run.finish()
    h = history(run_dir)
    timed = [r for r in h if 'timing/train/total_ms' in r]
    assert len(timed) == 2, [sorted(r) for r in h]


def test_no_run_logs_nothing(monkeypatch):
    assert wandb.run is None
    t = BatchTimer()
    learn = learner(t)
    fit(learn, 1)
    assert t.rows.n > 0 and t._log is None


def test_fix_only_when_needed(monkeypatch):
    assert not fo_wandb.wandb_config_bug()  # importing the package fixed fastai 2.8.12
    assert fastai_wandb._format_config({'a': True, 'n': 8, 'd': 'cuda'}) == {'a': True, 'n': 8, 'd': 'cuda'}
    monkeypatch.setattr(fastai_wandb, '_format_config', fo_wandb._fastai_format_config)   # fastai's own, which calls the value formatter
    working = lambda v: v
    monkeypatch.setattr(fastai_wandb, '_format_config_value', working)
    assert fo_wandb.fix_wandb_callback() is False and fastai_wandb._format_config_value is working
    def broken(v): return vars(v)  # what fastai 2.8.12 does with a plain value
    monkeypatch.setattr(fastai_wandb, '_format_config_value', broken)
    assert fo_wandb.wandb_config_bug() and fo_wandb.fix_wandb_callback() is True
    assert fastai_wandb._format_config_value is fo_wandb._config_value and fastai_wandb._format_config is fo_wandb._format_config


def test_device_clock_in_summary(run):
    "With device times (a fake device here), the run summary holds device figures and names the clock"
    t = BatchTimer(wandb_every=0.001, clock=fake_events(FakeGPU(lag=3)))
    learn = learner(t)
    fit(learn, 1)
    run_dir = Path(run.dir).parent
    run.finish()
    s, mine = summary(run_dir), t.summary()
    assert s['timing/clock'] == 'device' and mine.attrs['clock'] == 'device'
    assert s['timing/train/total_ms'] == pytest.approx(mine.mean_ms['train', 'total'])
    assert s['timing/train/total_ms'] != pytest.approx(t.summary(clock='host').mean_ms['train', 'total'], rel=1e-9)
    assert any('timing/train/device_total_ms' in r for r in history(run_dir))


def test_wandb_callback_records_the_order_of_each_fit(run):
    "The order the model runs in goes into the run's config at before_fit, and a swap between fits updates it"
    learn = learner()
    fit(learn, 1, cbs=WandbCallback(log_preds=False))
    first = dict(run.config)
    swap_order(learn.model, 'bn_after')
    fit(learn, 1, cbs=WandbCallback(log_preds=False))
    run_dir = Path(run.dir).parent
    run.finish()
    assert (first['layer_order'], first['layer_orders']) == ('conv-bn-act-pool', {'conv-bn-act-pool': 2})
    c = config(run_dir)
    assert (c['layer_order'], c['layer_orders']) == ('conv-act-bn-pool', {'conv-act-bn-pool': 2})
    assert c['batch size'] == 16   # fastai's own config is still there


def test_a_mixed_model_records_its_count_per_order(run):
    learn = learner(BatchTimer(wandb_every=0.001))
    swap_order(learn.model[1], 'bn_after')   # the second conv block only
    fit(learn, 1, cbs=WandbCallback(log_preds=False))
    run_dir = Path(run.dir).parent
    run.finish()
    c = config(run_dir)
    assert c['layer_order'] == 'mixed' and c['layer_orders'] == {'conv-bn-act-pool': 1, 'conv-act-bn-pool': 1}


def test_batch_timer_alone_records_the_order(run):
    learn = learner(BatchTimer(wandb_every=0.001), n=20, size=8)   # 2 batches
    learn.model = torchvision.models.resnet18(num_classes=4)
    swap_order(learn.model, 'bn_after')
    fit(learn, 1)
    run_dir = Path(run.dir).parent
    run.finish()
    c = config(run_dir)
    assert c['layer_order'] == 'conv-act-bn-pool'
    assert c['layer_orders'] == {'conv-act-bn-pool': 1, 'conv-act-bn': 8, 'conv-bn': 11}   # the blocks' second conv-bn, and the downsamples
    assert 'Learner' not in c   # no WandbCallback: only the order


def test_the_order_is_read_once_per_fit(run, monkeypatch):
    "With both WandbCallback and BatchTimer logging, WandbCallback writes the order and the timer does not read it again"
    import fastai_order.rewrite.swap as swap
    calls, real = [], swap.realised_orders
    monkeypatch.setattr(swap, 'realised_orders', lambda m: calls.append(m) or real(m))
    learn = learner(BatchTimer(wandb_every=0.001))
    fit(learn, 1, cbs=WandbCallback(log_preds=False))
    fit(learn, 1)   # the timer alone
    assert calls == [learn.model, learn.model]
    assert run.config['layer_order'] == 'conv-bn-act-pool'


def test_no_order_without_chains_or_when_unreadable(run, monkeypatch):
    assert fo_wandb.layer_order_config(torch.nn.Sequential(torch.nn.Linear(2, 2))) == {}   # no conv chains: nothing to record
    import fastai_order.rewrite.swap as swap
    def broken(m): raise RuntimeError('cannot trace')
    monkeypatch.setattr(swap, 'realised_orders', broken)
    learn = learner(BatchTimer(wandb_every=0.001))
    with pytest.warns(UserWarning, match="W&B: could not read the layer order of Sequential, so the run's config does not record it: cannot trace"):
        fit(learn, 1)   # the fit goes on
    assert 'layer_order' not in run.config and learn.recorder.values
    t = BatchTimer(wandb_every=None)   # W&B logging off: no order either
    fit(learner(t), 1)


def test_a_compare_orders_run_keeps_its_order_and_records_the_realised_one(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline'); monkeypatch.setenv('WANDB_SILENT', 'true')
    cfg = RunConfig(data=str(tiny_data), order='bn_after', epochs=1, bs=4, size=16, workers=0, wandb=True)
    record = train_run(cfg, 'test', tmp_path)
    run_dir, = (tmp_path/'wandb').glob('offline-run-*')
    c = config(run_dir)
    assert c['order'] == record['config']['order'] == 'conv-act-bn-pool'   # the RunConfig's, as before
    assert c['layer_order'] == 'conv-act-bn-pool' and c['layer_orders'] == record['results']['layer_orders']
    if wandb.run is not None: wandb.finish()
