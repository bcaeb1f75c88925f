"`RunConfig` and `train_run`: every choice checked, the order recorded as the model realises it, backends by what they change, W&B changing no result."
import pytest, torch, wandb
from fastai.callback.wandb import WandbCallback
from fastai_order.run import RunConfig, train_run, run_learner, build_model, layer_orders

TINY = dict(epochs=1, bs=4, size=16, workers=0)


@pytest.mark.parametrize('bad, msg', [
    (dict(arch='xresnet81'), "Unknown arch 'xresnet81': did you mean 'xresnet18'?"),
    (dict(backend='channel_last'), "did you mean 'channels_last'?"), (dict(precision='bf61'), "did you mean 'bf16'?"),
    (dict(pool='mx'), "did you mean 'max'?"), (dict(data='minst'), "did you mean 'mnist'?"),
    (dict(epochs=0), '`epochs` must be an integer ≥ 1, got 0'), (dict(workers=-1), '`workers` must be an integer ≥ 0, got -1'),
    (dict(lr=-1.), '`lr` must be a number > 0'), (dict(p=1.), '`p` must be a dropout probability in [0, 1)'),
    (dict(order='resnet_pool_drop'), "places 'drop' but the CNN has no dropout"),
    (dict(arch='xresnet18', order='keras_question'), "xresnet18's conv blocks have none"),
    (dict(precision='bf16'), "precision 'bf16' needs CUDA")])
def test_every_choice_is_checked(bad, msg):
    if 'precision' in bad and torch.cuda.is_available(): pytest.skip('mixed precision is allowed on CUDA')
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[').replace('?', r'\?')): RunConfig(**bad)


def test_the_recorded_order_is_the_models(tiny_data):
    assert RunConfig(order='resnet', **TINY).order == 'conv-bn-act-pool' == RunConfig(order='conv-bn-act', **TINY).order
    assert RunConfig(order='resnet_pool_drop', p=0.2, **TINY).order == RunConfig(order='resnet', p=0.2, **TINY).order == 'conv-bn-act-pool-drop'
    cfg = RunConfig(data=str(tiny_data), order='keras_question', p=0.2, **TINY)
    rec = train_run(cfg)
    assert rec['config']['order'] == 'conv-act-pool-drop-bn' and rec['results']['layer_orders'] == {'conv-act-pool-drop-bn': 3}
    x = RunConfig(arch='xresnet18', order='pool_before_bn', **TINY)
    assert layer_orders(build_model(x, 3)) == {'conv-pool-bn-act': 1, 'conv-bn-act': 10, 'conv-bn': 11}


def _fit(cfg):
    learn = run_learner(cfg)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    return learn


def test_channels_last_trains_a_channels_last_model(tiny_data):
    cfg = RunConfig(data=str(tiny_data), **TINY)
    conv = lambda learn: next(m for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert not conv(_fit(cfg)).weight.is_contiguous(memory_format=torch.channels_last)
    assert conv(_fit(cfg.replace(backend='channels_last'))).weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_trains_a_compiled_model(tiny_data):
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters
    cfg = RunConfig(data=str(tiny_data), backend='compile', **TINY)
    before = build_model(cfg, 3).state_dict()
    counters.clear()
    learn = _fit(cfg)
    assert isinstance(learn.model, OptimizedModule) and counters['stats']['unique_graphs'] > 0
    after = learn.model._orig_mod.state_dict()
    assert not torch.equal(before['0.conv.weight'], after['0.conv.weight'])   # the compiled model is the one that trained


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
    assert ctx['threads'] == torch.get_num_threads() and ctx['torch_version'] == torch.__version__ and ctx['clock'] in ('host', 'device')
    assert 0 <= ctx['other_load'] <= 1 and ctx['cores'] >= 1 and ctx['cpu']
