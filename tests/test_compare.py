"`compare_orders` and `fastai-order-compare` on a tiny Imagenette-shaped folder: resume, refusals before anything is created, single runs, W&B offline, Ctrl-C, bf16 on CUDA."
import json, os
import pandas as pd, pytest, torch, wandb

import fastai_order.experiment.engines as engines
import fastai_order.experiment.data as data
from fastai_order.experiment.compare import compare_orders, compare_cli
from fastai_order.experiment.run import RunConfig
from fastai_order.experiment.results import RunsFolder
from wandb_history import config as run_config, summary as run_summary

TINY = dict(epochs=1, bs=4, size=16, workers=0)


@pytest.fixture
def cfg(tiny_data): return RunConfig(data=str(tiny_data), **TINY)


def test_an_interrupted_comparison_resumes_with_only_what_is_missing(cfg, tmp_path, monkeypatch):
    real, calls = engines.train_run, []
    def crash_on_third(c, *args):
        calls.append((c.order, c.seed))
        if len(calls) == 3: raise KeyboardInterrupt
        return real(c, *args)
    monkeypatch.setattr(engines, 'train_run', crash_on_third)
    with pytest.raises(KeyboardInterrupt): compare_orders(['resnet', 'bn_after'], cfg, seeds=2, out=tmp_path)
    timed = (tmp_path/'speed.csv').stat().st_mtime_ns
    assert len(list((tmp_path/'runs').glob('*.json'))) == 2 and not list((tmp_path/'runs').glob('*.tmp'))
    calls.clear()
    res = compare_orders(['resnet', 'bn_after'], cfg, seeds=2, out=tmp_path)
    assert calls == [('conv-bn-act-pool', 1), ('conv-act-bn-pool', 1)]   # seed 0 of both was done
    assert (tmp_path/'speed.csv').stat().st_mtime_ns == timed
    runs = pd.read_csv(tmp_path/'results.csv')
    assert len(runs) == 4 and set(zip(runs.order, runs.seed)) == {(o, s) for o in ('conv-bn-act-pool', 'conv-act-bn-pool') for s in (0, 1)}
    assert {'accuracy', 'train_ms', 'train_forward_ms', 'params', 'device', 'threads', 'clock', 'other_load'} <= set(runs.columns)
    assert list(res.stats.order) == ['conv-bn-act-pool', 'conv-act-bn-pool'] and res.stats.verdict[0] == 'baseline'
    report = (tmp_path/'report.md').read_text()
    assert '| conv-act-bn-pool | 2 |' in report and '## Where the times come from' in report
    assert all((tmp_path/f'{n}.png').stat().st_size > 1000 for n in ('accuracy', 'phases', 'tradeoff', 'speed', 'seeds', 'curves'))
    speed = pd.read_csv(tmp_path/'speed.csv')   # timed once, before the first run, and kept: the resumed call did not time again
    assert list(speed.columns) == ['step', 'repeat', 'conv-bn-act-pool', 'conv-act-bn-pool'] and set(speed.step) == {'train', 'valid'}
    assert (speed.iloc[:, 2:] > 0).all().all() and res.speed.equals(speed)


def test_another_configuration_is_refused_while_the_folder_holds_runs(cfg, tmp_path):
    compare_orders(['resnet'], cfg, seeds=1, out=tmp_path)
    before = (tmp_path/'results.csv').read_text()
    with pytest.raises(ValueError, match=r"holds runs of another configuration \(lr: 0.003 there, 0.01 now\): use another out folder"):
        compare_orders(['resnet'], cfg, seeds=1, out=tmp_path, lr=1e-2)
    assert (tmp_path/'results.csv').read_text() == before
    for f in (tmp_path/'runs').glob('*.json'): f.unlink()
    compare_orders(['resnet'], cfg.replace(lr=1e-2), seeds=1, out=tmp_path)   # a config.json without runs binds nothing
    assert json.loads((tmp_path/'config.json').read_text())['lr'] == 1e-2


def test_one_seed_says_one_run(cfg, tmp_path):
    res = compare_orders(['resnet', 'pool_before_bn'], cfg, seeds=1, out=tmp_path)
    assert res.stats.verdict[0] == 'baseline'   # speed is paired step times, decisive whatever the seeds; accuracy needs seeds
    assert res.stats.verdict[1].startswith('train step ') and res.stats.verdict[1].endswith('; no test with a single run (n=1 vs 1)')
    assert '(one run)' in res.table() and '± 0.00' not in res.table()


def test_single_runs_fan_out_and_a_last_call_reports(tiny_data, tmp_path, capsys):
    args = dict(orders='resnet,bn_after', data=str(tiny_data), seeds=2, epochs=1, bs=4, size=16, out=str(tmp_path), workers=0)
    for run in ('bn_after:1', 'resnet:0'): compare_cli(**args, run=run)
    assert sorted(f.name for f in (tmp_path/'runs').iterdir()) == ['conv_act_bn_pool__seed1.json', 'conv_bn_act_pool__seed0.json']
    assert not (tmp_path/'report.md').exists()
    compare_cli(**args, dry_run=True)
    assert '2 of 4 runs done' in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"Single run resnet:5 is not in the grid"): compare_cli(**args, run='resnet:5')


def test_a_damaged_or_copied_run_file_is_named_and_never_counted(tiny_data, cfg, tmp_path, capsys):
    compare_orders(['resnet'], cfg, seeds=1, out=tmp_path)
    f = next((tmp_path/'runs').glob('*.json'))
    (tmp_path/'runs'/f.name.replace('seed0', 'seed1')).write_text(f.read_text())   # a copy under seed 1's name
    f.write_text(f.read_text()[:300])                                             # a write cut off midway
    args = dict(orders='resnet', data=str(tiny_data), seeds=2, epochs=1, bs=4, size=16, out=str(tmp_path), workers=0)
    compare_cli(**args, dry_run=True)
    out = capsys.readouterr().out
    assert '0 of 2 runs done' in out and out.count('bad file') == 2 and 'seed: 0 in the file, 1 here' in out
    with pytest.raises(SystemExit, match=r"conv_bn_act_pool__seed0.json' cannot be counted: .*delete it to train that run again"):
        compare_cli(**args)


@pytest.mark.parametrize('bad, msg', [
    (dict(orders='resnet,sideways'), "Unknown op 'sideways'"), (dict(data='imagenet'), "Unknown data 'imagenet': did you mean 'imagenette'?"),
    (dict(seeds=0), '`seeds` must be an integer ≥ 1, got 0'), (dict(backend='jit'), "Unknown backend 'jit'"),
    (dict(arch='vgg'), "Unknown arch 'vgg'"), (dict(epochs=0), '`epochs` must be an integer ≥ 1'),
    (dict(orders='resnet,conv-bn-act'), "build the same model (conv-bn-act-pool): give each order once"),
    (dict(orders='resnet,resnet_pool_drop'), "places 'drop' but the CNN has no dropout"),
    (dict(workers=-1), '`workers` must be an integer ≥ 0, got -1'), (dict(size=4), "size=4 is too small for cnn"),
    (dict(warmup=-1), '`warmup` must be an integer ≥ 0, got -1'), (dict(backend='channels_last+compil'), "did you mean 'channels_last+compile'?"),
    (dict(data='imagenette-160'), "Could not download 'imagenette-160'"),
    (dict(wandb=True), "W&B logging needs an API key: run `wandb login` or set WANDB_API_KEY, or log offline with WANDB_MODE=offline")])
def test_bad_input_stops_before_anything_is_created(tiny_data, tmp_path, monkeypatch, bad, msg):
    monkeypatch.setattr(engines, 'train_run', lambda *a, **k: pytest.fail('trained'))
    monkeypatch.setattr(data, 'untar_data', lambda url: (_ for _ in ()).throw(ConnectionError('network unreachable')))
    monkeypatch.delenv('WANDB_MODE', raising=False); monkeypatch.delenv('WANDB_API_KEY', raising=False)
    monkeypatch.setattr(wandb, 'login', lambda **k: False)
    args = dict(data=str(tiny_data), epochs=1, bs=4, size=16, workers=0, out=str(tmp_path/'out'))
    with pytest.raises(SystemExit) as e: compare_cli(**{**args, **bad})
    assert str(e.value).startswith('fastai-order-compare: ') and msg in str(e.value) and '\n' not in str(e.value)
    assert not (tmp_path/'out').exists()


def test_a_folder_from_before_the_warm_up_is_refused_before_anything_is_trained(cfg, tiny_data, tmp_path, monkeypatch):
    "Its runs were timed without warm-up, with the process's lifetime peak memory: they do not compare with new ones"
    monkeypatch.setattr(engines, 'train_run', lambda *a, **k: pytest.fail('trained'))
    (tmp_path/'runs').mkdir(parents=True)
    (tmp_path/'config.json').write_text(json.dumps({k: v for k, v in cfg.key.items() if k != 'warmup'}))
    (tmp_path/'runs'/'conv_bn_act_pool__seed0.json').write_text('{}')
    with pytest.raises(SystemExit, match=r"holds runs of another configuration \(warmup: None there, 2 now\): use another out folder"):
        compare_cli(orders='resnet', data=str(tiny_data), seeds=1, epochs=1, bs=4, size=16, workers=0, out=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'runs']


@pytest.mark.cuda
def test_a_bf16_comparison_on_cuda_times_the_device_and_compares_memory(cfg, tmp_path):
    bf16 = cfg.replace(precision='bf16', backend='channels_last')
    runs = compare_orders(['resnet', 'bn_after'], bf16, seeds=1, out=tmp_path/'a').runs
    assert json.loads((tmp_path/'a'/'config.json').read_text())['precision'] == 'bf16'
    assert (runs.clock == 'device').all() and (runs.device == torch.cuda.get_device_name()).all()
    assert (runs.train_forward_ms > 0).all() and (runs.train_backward_ms > 0).all() and (runs.valid_forward_ms > 0).all()
    again = compare_orders(['resnet'], bf16, seeds=1, out=tmp_path/'b').runs.peak_memory_mb[0]   # the same run, later in the process
    first = runs.set_index('order').peak_memory_mb['conv-bn-act-pool']
    assert 0 < first and abs(again - first) <= 0.1 * first, (first, again)
    with pytest.raises(ValueError, match=r"\(precision: 'bf16' there, 'fp32' now\)"):
        compare_orders(['resnet', 'bn_after'], cfg.replace(backend='channels_last'), seeds=1, out=tmp_path/'a')


def test_ctrl_c_says_how_to_resume(cfg, tiny_data, tmp_path, monkeypatch):
    def interrupted(*a): raise KeyboardInterrupt
    monkeypatch.setattr(engines, 'train_run', interrupted)
    with pytest.raises(SystemExit, match=r"interrupted; the finished runs are kept in .*: run the same command again to resume"):
        compare_cli(orders='resnet', data=str(tiny_data), seeds=1, epochs=1, bs=4, size=16, workers=0, out=str(tmp_path))


def test_wandb_runs_grouped_by_experiment_with_the_configuration(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline'); monkeypatch.setenv('WANDB_SILENT', 'true')
    plain = compare_orders(['resnet', 'pool_before_bn'], cfg, seeds=1, out=tmp_path/'plain')
    logged = compare_orders(['resnet', 'pool_before_bn'], cfg.replace(wandb=True), seeds=1, out=tmp_path/'exp1')
    assert plain.runs.accuracy.tolist() == logged.runs.accuracy.tolist()   # W&B changes no result
    dirs = sorted((tmp_path/'exp1'/'wandb').glob('offline-run-*'))
    assert len(dirs) == 3   # one per (order, seed), and the summary
    cfgs = [c for c in map(run_config, dirs) if 'order' in c]
    assert sorted(c['order'] for c in cfgs) == ['conv-bn-act-pool', 'conv-pool-bn-act']
    assert all(c['seed'] == 0 and c['arch'] == 'cnn' and c['data'] == cfg.data and c['backend'] == 'eager' for c in cfgs)
    verdicts = next(s for s in map(run_summary, dirs) if 'answer' in s)   # the summary run carries the report's answer and verdicts
    assert verdicts['answer'] == ' '.join(logged.headline()) and verdicts['conv-pool-bn-act/verdict'] == logged.stats.verdict[1]
    if wandb.run is not None: wandb.finish()


def fastai_layout_learner(seed):
    "Your own Learner: a folder in fastai's train/valid layout, timm's resnet18 through vision_learner, not pretrained"
    from fastai.vision.all import ImageDataLoaders, vision_learner, Resize
    return vision_learner(ImageDataLoaders.from_folder(FOLDER[0], valid='valid', bs=4, item_tfms=Resize(32), num_workers=0),
                          'resnet18', pretrained=False)

FOLDER = []


def test_orders_of_your_own_learner_are_compared_and_a_changed_function_is_refused(tiny_data, tmp_path):
    import shutil
    FOLDER[:] = [shutil.copytree(tiny_data, tmp_path/'photos')]
    (FOLDER[0]/'val').rename(FOLDER[0]/'valid')   # fastai's layout
    res = compare_orders(['resnet', 'bn_after'], seeds=2, epochs=1, out=tmp_path/'c', learner=fastai_layout_learner)
    assert list(res.stats.order) == ['conv-bn-act', 'conv-act-bn'] and len(res.runs) == 4 and res.speed is not None
    key = json.loads((tmp_path/'c'/'config.json').read_text())
    assert key['learner'].startswith(f'{__name__}:fastai_layout_learner#') and 'arch' not in key and 'bs' not in key
    assert json.loads(res.runs.layer_orders[res.runs.order == 'conv-act-bn'].iloc[0])['conv-act-bn'] == 8
    with pytest.raises(ValueError, match=r"holds runs of another configuration \(learner: "):
        compare_orders(['resnet', 'bn_after'], seeds=2, epochs=1, out=tmp_path/'c', learner=lambda seed: None)


def test_a_folder_in_fastais_layout_with_a_one_batch_validation_set_is_compared(tiny_data, tmp_path):
    import shutil
    folder = shutil.copytree(tiny_data, tmp_path/'photos')
    (folder/'val').rename(folder/'valid')
    for f in sorted((folder/'valid').rglob('*.*'))[3:]: f.unlink()   # 3 images: one batch of 4
    res = compare_orders(['resnet', 'bn_after'], seeds=1, data=str(folder), out=tmp_path/'c', **TINY)
    assert (res.runs.valid_ms > 0).all() and len(res.runs) == 2


def test_an_unreadable_image_is_named_in_one_line_before_anything_trains(tiny_data, tmp_path, monkeypatch):
    import shutil
    monkeypatch.setattr(engines, 'train_run', lambda *a, **k: pytest.fail('trained'))
    folder = shutil.copytree(tiny_data, tmp_path/'photos')
    bad = sorted((folder/'train').rglob('*.*'))[0]
    bad.write_bytes(b'not an image')
    with pytest.raises(SystemExit) as e:
        compare_cli(orders='resnet', data=str(folder), seeds=1, out=str(tmp_path/'c'), **TINY)
    assert str(e.value).count('\n') == 0 and f"'{bad}' cannot be read" in str(e.value)
    assert not (tmp_path/'c').exists()


def test_the_command_starts_without_a_warning_the_user_cannot_act_on():
    "fastai calls `torch.jit.script` at import, which torch deprecates: the command's first lines are its own"
    import subprocess, sys
    from pathlib import Path
    r = subprocess.run([str(Path(sys.executable).parent/'fastai-order-compare'), '--help'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith('usage: fastai-order-compare') and 'torch.jit.script' not in r.stderr, r.stderr


def test_a_cpu_only_machine_with_a_cuda_toolkit_is_not_told_so():
    "torch logs 'No CUDA runtime is found, using CUDA_HOME=…' when it loads its compiler (torch.compile does) without a GPU"
    import subprocess, sys, torch
    if torch.cuda.is_available(): pytest.skip('the message is only logged without a GPU')
    code = 'import fastai_order, torch.utils.cpp_extension; import logging; logging.getLogger("torch.utils.cpp_extension").warning("kept")'
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env={**os.environ, 'CUDA_HOME': sys.prefix})
    assert r.returncode == 0 and 'No CUDA runtime' not in r.stderr and 'kept' in r.stderr, r.stderr
