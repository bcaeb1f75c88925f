"`RunConfig` and `train_run`: every choice checked, the order recorded as the model realises it, backends by what they change, W&B and the warm-up changing no result, peak memory a run's own."
import random, re
import numpy as np, pytest, torch, wandb
from fastai.callback.core import Callback
from fastai.callback.wandb import WandbCallback
from fastai.torch_core import find_bs
from fastai_order.experiment.run import RunConfig, train_run, run_learner, build_model, warm_up, learner_id, learner_function, check_builds
from fastai_order.rewrite.swap import realised_orders
from fastai_order.timing.batch_timer import BatchTimer

TINY = dict(epochs=1, bs=4, size=16, workers=0)


@pytest.mark.parametrize('bad, msg', [
    (dict(arch='xresnet81'), "Unknown arch 'xresnet81': did you mean 'xresnet18'?"),
    (dict(backend='channel_last'), "did you mean 'channels_last'?"), (dict(precision='bf61'), "did you mean 'bf16'?"),
    (dict(backend='channels_last+compil'), "did you mean 'channels_last+compile'?"), (dict(warmup=-1), '`warmup` must be an integer ≥ 0, got -1'),
    (dict(pool='mx'), "did you mean 'max'?"), (dict(data='minst'), "did you mean 'mnist'?"),
    (dict(epochs=0), '`epochs` must be an integer ≥ 1, got 0'), (dict(workers=-1), '`workers` must be an integer ≥ 0, got -1'),
    (dict(lr=-1.), '`lr` must be a number > 0'), (dict(p=1.), '`p` must be a dropout probability in [0, 1)'),
    (dict(order='resnet_pool_drop'), "places 'drop' but the CNN has no dropout"),
    (dict(arch='xresnet18', order='keras_question'), "xresnet18's conv blocks have none"),
    (dict(precision='bf16'), "precision 'bf16' needs CUDA"), (dict(arch='resnet18'), "or 'timm:NAME' (e.g. 'timm:resnet18')"),
    (dict(arch='timm:resnet1'), "Unknown timm model 'resnet1' in arch 'timm:resnet1': did you mean 'resnet18'?"),
    (dict(arch='torchvison:resnet18'), "did you mean 'torchvision'?"), (dict(arch='timm:resnet18', order='keras_question'), "timm:resnet18's conv blocks have none"),
    (dict(learner=f'{__name__}:no_such'), f"module '{__name__}' has no function 'no_such'"),
    (dict(learner=f'{__name__}:tiny_learner', bs=8), f"bs belongs to your learner '{__name__}:tiny_learner'")])
def test_every_choice_is_checked(bad, msg):
    if 'precision' in bad and torch.cuda.is_available(): pytest.skip('mixed precision is allowed on CUDA')
    with pytest.raises(ValueError, match=re.escape(msg)): RunConfig(**bad)


def test_the_recorded_order_is_the_models(tiny_data):
    assert RunConfig(order='resnet', **TINY).order == 'conv-bn-act-pool' == RunConfig(order='conv-bn-act', **TINY).order
    assert RunConfig(order='resnet_pool_drop', p=0.2, **TINY).order == RunConfig(order='resnet', p=0.2, **TINY).order == 'conv-bn-act-pool-drop'
    cfg = RunConfig(data=str(tiny_data), order='keras_question', p=0.2, **TINY)
    rec = train_run(cfg)
    assert rec['config']['order'] == 'conv-act-pool-drop-bn' and rec['results']['layer_orders'] == {'conv-act-pool-drop-bn': 3}
    x = RunConfig(arch='xresnet18', order='pool_before_bn', **TINY)
    assert realised_orders(build_model(x, 3)) == {'conv-pool-bn-act': 1, 'conv-bn-act': 10, 'conv-bn': 11}


def _fit(cfg):
    learn = run_learner(cfg)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    return learn


def test_channels_last_trains_a_channels_last_model(tiny_data):
    cfg = RunConfig(data=str(tiny_data), **TINY)
    conv = lambda learn: next(m for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert not conv(_fit(cfg)).weight.is_contiguous(memory_format=torch.channels_last)
    assert conv(_fit(cfg.replace(backend='channels_last'))).weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_with_channels_last_trains_a_compiled_channels_last_model_compiled_in_the_warm_up(tiny_data):
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters
    cfg = RunConfig(data=str(tiny_data), backend='channels_last+compile', **TINY)
    assert RunConfig(data=str(tiny_data), backend='compile+channels_last', **TINY) == cfg   # one configuration, one label
    before = build_model(cfg, 3).state_dict()
    counters.clear()
    learn = warm_up(run_learner(cfg), cfg.warmup)
    graphs = counters['stats']['unique_graphs']
    assert isinstance(learn.model, OptimizedModule) and graphs > 0
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert counters['stats']['unique_graphs'] == graphs   # nothing left to compile in the timed fit
    after = learn.model._orig_mod.state_dict()
    assert not torch.equal(before['0.conv.weight'], after['0.conv.weight'])   # the compiled model is the one that trained
    assert learn.model._orig_mod[0].conv.weight.is_contiguous(memory_format=torch.channels_last)


class _Batches(Callback):
    "Records each batch's split and size"
    def __init__(self): self.seen = []
    def after_batch(self): self.seen.append(('train' if self.training else 'valid', find_bs(self.yb)))


def _random_states(learn):
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist(), [dl.rng.getstate() for dl in learn.dls.loaders]


def test_warm_up_runs_batches_unseen_by_the_timer_then_puts_everything_back(tiny_data):
    cfg = RunConfig(data=str(tiny_data), order='resnet_pool_drop', p=0.5, **{**TINY, 'bs': 5})   # 12 valid images: the last batch has 2
    timer, batches = BatchTimer(), _Batches()
    learn = run_learner(cfg, cbs=[timer, batches])
    weights, states = {k: v.clone() for k, v in learn.model.state_dict().items()}, _random_states(learn)
    warm_up(learn, 3, cbs=[timer])
    assert batches.seen == [('train', 5)]*3 + [('valid', 5)]*3 + [('valid', 2)] and timer.rows.n == 0
    after = learn.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in weights.items())   # weights and BN statistics
    assert _random_states(learn) == states and learn.opt is None and all(p.grad is None for p in learn.model.parameters())


def test_the_warm_up_changes_no_result(tiny_data):
    "Dropout, BN statistics, shuffling and augmentation all draw on state the warm-up must put back"
    cfg = RunConfig(data=str(tiny_data), order='resnet_pool_drop', p=0.5, **TINY)
    keys = ('accuracy', 'valid_loss', 'train_loss')
    cold, warm = (train_run(cfg.replace(warmup=w))['results'] for w in (0, 3))
    assert [cold[k] for k in keys] == [warm[k] for k in keys]


def test_two_runs_in_one_process_report_comparable_peak_memory(tiny_data):
    cfg = RunConfig(data=str(tiny_data), **TINY)
    first = train_run(cfg)['results']['peak_memory_mb']
    x = torch.ones(2**27); del x   # 512 MiB made and freed between the runs: not the next run's memory
    second = train_run(cfg)['results']['peak_memory_mb']
    assert 0 < first < 100 and 0 < second < 100 and abs(first - second) <= 0.5 * max(first, second), (first, second)


@pytest.mark.cuda
@pytest.mark.parametrize('backend', ['eager', 'channels_last+compile'])
def test_mixed_precision_trains_with_every_backend_on_cuda(tiny_data, backend):
    learn = run_learner(RunConfig(data=str(tiny_data), precision='bf16', backend=backend, **TINY))
    dtypes = []
    conv = next(m for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d))
    if backend == 'eager': conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert next(learn.model.parameters()).is_cuda and all(np.isfinite(learn.recorder.values[-1]))
    if backend == 'eager': assert set(dtypes) == {torch.bfloat16}   # fastai's autocast ran the convs in bf16
    else: assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_wandb_changes_no_result(tiny_data, tmp_path, monkeypatch):
    "fastai's WandbCallback reads a batch in before_fit, drawing from torch's generator; ours leaves it alone (dropout shows it)"
    monkeypatch.setenv('WANDB_MODE', 'offline'); monkeypatch.setenv('WANDB_SILENT', 'true')
    cfg = RunConfig(data=str(tiny_data), order='resnet_pool_drop', p=0.5, **TINY)
    plain = train_run(cfg)['results']
    logged = train_run(cfg.replace(wandb=True), 'test', tmp_path)['results']
    keys = ('accuracy', 'valid_loss', 'train_loss')
    assert [plain[k] for k in keys] == [logged[k] for k in keys]
    monkeypatch.setattr(WandbCallback, 'before_fit', WandbCallback.before_fit.__wrapped__)   # fastai's own
    unfixed = train_run(cfg.replace(wandb=True), 'test', tmp_path)['results']
    assert [plain[k] for k in keys] != [unfixed[k] for k in keys]   # so the test above can fail
    if wandb.run is not None: wandb.finish()


def test_a_run_records_where_its_times_come_from(tiny_data):
    ctx = train_run(RunConfig(data=str(tiny_data), **TINY))['context']
    assert ctx['device'] == ('cpu' if not torch.cuda.is_available() else torch.cuda.get_device_name())
    assert ctx['threads'] == torch.get_num_threads() and ctx['torch_version'] == torch.__version__
    assert ctx['clock'] == ('device' if torch.cuda.is_available() else 'host')   # the clock BatchTimer's summary used
    assert 0 <= ctx['other_load'] <= 1 and ctx['cores'] >= 1 and ctx['cpu']


@pytest.mark.parametrize('bad, msg', [(dict(lr='1e-3'), '`lr` must be a number > 0'), (dict(p=True), '`p` must be a dropout probability'),
                                      (dict(wandb='yes'), "`wandb` must be True or False, got 'yes'"), (dict(epochs=1.5), '`epochs` must be an integer')])
def test_a_wrong_type_is_a_type_error(bad, msg):
    with pytest.raises(TypeError, match=re.escape(msg)): RunConfig(**bad)


@pytest.mark.parametrize('arch, order, found', [
    ('torchvision:resnet18', 'pool_before_bn', {'conv-pool-bn-act': 1, 'conv-bn-act': 8, 'conv-bn': 11}),
    ('timm:resnet18', 'bn_after', {'conv-act-bn-pool': 1, 'conv-act-bn': 8, 'conv-bn': 11})])
def test_a_torchvision_or_timm_model_is_the_one_vision_learner_builds_in_the_order(arch, order, found):
    cfg = RunConfig(arch=arch, order=order, size=32, workers=0)
    model = build_model(cfg, 3)
    assert realised_orders(model) == found
    assert model[1][-1].out_features == 3   # fastai's head, on the library's body
    check_builds(cfg)


def test_an_order_a_model_cannot_realise_is_refused_before_anything_trains():
    with pytest.raises(ValueError, match="none with all of it"): check_builds(RunConfig(arch='timm:efficientnet_b0', order='pool_before_bn', workers=0))


def tiny_learner(seed):
    "A user's own Learner: the tiny folder's data (made by the test), a torchvision resnet18 through vision_learner"
    from fastai.vision.all import ImageDataLoaders, vision_learner, error_rate, Resize
    from torchvision.models import resnet18
    dls = ImageDataLoaders.from_folder(TINY_FOLDER[0], valid='val', bs=4, item_tfms=Resize(32), num_workers=0)
    return vision_learner(dls, resnet18, pretrained=False, metrics=error_rate)

TINY_FOLDER = []


def test_a_run_of_your_own_learner_records_its_order_and_history(tiny_data):
    TINY_FOLDER[:] = [tiny_data]
    cfg = RunConfig(learner=f'{__name__}:tiny_learner', order='bn_after', epochs=2)
    assert cfg.learner == learner_id(tiny_learner) and cfg.workers is None and 'bs' not in cfg.key and cfg.key['learner'] == cfg.learner
    assert learner_function(cfg.learner) is tiny_learner
    rec = train_run(cfg)
    assert rec['results']['layer_orders']['conv-act-bn'] == 8   # every BasicBlock's first conv chain
    assert [h['epoch'] for h in rec['results']['history']] == [0, 1] and rec['results']['history'][-1]['accuracy'] == rec['results']['accuracy']
    with pytest.raises(ValueError, match="is not the function of this configuration"): train_run(cfg, learner=lambda seed: None)


def test_a_learner_changed_since_its_runs_were_planned_is_refused():
    ident = learner_id(tiny_learner)
    changed = ident[:-8] + ('0' * 8 if not ident.endswith('0' * 8) else '1' * 8)
    with pytest.raises(ValueError, match="has changed since its runs were planned"): learner_function(changed)


def test_the_realised_order_of_any_order_is_read_without_checking_a_swap():
    "Reading a preact model's orders plans nothing: a swap to conv-bn-act would not fit its norms, and must not be asked"
    assert realised_orders(build_model(RunConfig(arch='xresnet18', order='preact', workers=0), 3)) == {'bn-act-conv': 11, 'bn-conv': 11}
