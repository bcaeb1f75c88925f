"Timers under fastai's data-parallel training: 2 CPU processes on gloo launched by torchrun, each rank's own batches, one gather per epoch, per-rank and cross-rank figures on every rank, W&B from rank 0 only; a rank that dies stops the job; models wrapped for data parallelism refused with what to do; SyncBatchNorm conversion."
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pandas as pd, pytest, torch
from torch import nn
from fastai_order.tools.overhead import ddp_launch
from fastai_order.experiment.run import RunConfig

TINY = dict(epochs=2, bs=4, size=16, workers=0)
SCRIPT = textwrap.dedent('''
    import json, sys, torch.distributed as dist, wandb
    import fastai_order.timing.wandb as fw
    from fastai_order.tools.overhead import ddp_fit
    from fastai_order.experiment.run import RunConfig
    out, cfg = sys.argv[1], RunConfig(**json.loads(sys.argv[2]))
    calls = dict(gathers=0, timing_logs=0)
    real_gather, real_log = dist.all_gather_object, fw.TimingLog.__init__
    def gather(*a, **k): calls['gathers'] += 1; return real_gather(*a, **k)
    def log(self, *a, **k): calls['timing_logs'] += 1; real_log(self, *a, **k)
    dist.all_gather_object, fw.TimingLog.__init__ = gather, log
    run = wandb.init(project='fastai_order', mode='offline', dir=out)   # on every rank, as a script may do
    res = ddp_fit(cfg, out)
    run.finish()
    json.dump(dict(calls, rank=res['rank']), open(f"{out}/calls{res['rank']}.json", 'w'))
''')


def _torchrun(script, *args, procs=2):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}', str(script), *map(str, args)]
    return subprocess.run(cmd, env={**os.environ, 'ACCELERATE_USE_CPU': '1'}, capture_output=True, text=True, timeout=600)


def test_timers_on_two_gloo_ranks_gather_once_per_epoch(tiny_data, tmp_path):
    (tmp_path/'fit.py').write_text(SCRIPT)
    cfg = dict(data=str(tiny_data), **TINY)
    done = _torchrun(tmp_path/'fit.py', tmp_path, json.dumps(cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    rank = [json.loads((tmp_path/f'rank{r}.json').read_text()) for r in (0, 1)]
    calls = [json.loads((tmp_path/f'calls{r}.json').read_text()) for r in (0, 1)]
    assert [r['world'] for r in rank] == [2, 2]
    assert [c['gathers'] for c in calls] == [2 * TINY['epochs']] * 2   # per epoch, per timer: never per batch
    assert [c['timing_logs'] for c in calls] == [1, 0]   # only rank 0 logs timing to W&B
    own = [pd.DataFrame(r['batch']).set_index(['split', 'phase']) for r in rank]
    b = own[0]
    for r in (0, 1):   # what rank 0 shows of each rank is that rank's own figure
        pd.testing.assert_series_equal(b[f'rank{r}_ms'], own[r].mean_ms, check_names=False, rtol=1e-9)
    assert (b.n == own[1].n).all() and (b.n > 0).all()   # each rank timed its own share of the batches
    assert (b.slowest_ms == b[['rank0_ms', 'rank1_ms']].max(axis=1)).all()
    assert (b.slowest_rank == b[['rank0_ms', 'rank1_ms']].values.argmax(axis=1)).all()
    assert ((b.ranks_mean_ms - b[['rank0_ms', 'rank1_ms']].mean(axis=1)).abs() < 1e-9).all()
    assert (own[1][['rank0_ms', 'rank1_ms']] == b[['rank0_ms', 'rank1_ms']]).all().all()   # every rank has every rank's figures
    layers = [pd.DataFrame(r['layer']).set_index('role') for r in rank]
    for r in (0, 1): pd.testing.assert_series_equal(layers[0][f'rank{r}_ms'], layers[r].total_ms, check_names=False, rtol=1e-9)
    assert layers[0].loc['conv', 'total_ms'] > 0


DIES = textwrap.dedent('''
    import os, sys, torch.distributed as dist
    from fastai.callback.core import Callback
    import fastai_order.tools.overhead as bench
    from fastai_order.experiment.run import RunConfig, run_learner
    class Die(Callback):
        def after_batch(self):
            if dist.get_rank() == 1 and self.epoch == 1: os._exit(3)   # rank 1 dies in the second epoch
    real = bench.run_learner
    bench.run_learner = lambda cfg, cbs: real(cfg, cbs=[*cbs, Die()])
    bench.ddp_fit(RunConfig(data=sys.argv[2], epochs=3, bs=4, size=16, workers=0), sys.argv[1])
''')


def test_a_rank_that_dies_stops_the_job(tiny_data, tmp_path):
    (tmp_path/'dies.py').write_text(DIES)
    done = _torchrun(tmp_path/'dies.py', tmp_path, tiny_data)   # rank 0 does not wait forever at the next all-reduce
    assert done.returncode != 0 and 'exitcode  : 3' in done.stderr
    assert not list(tmp_path.glob('rank*.json'))


def test_one_process_ddp_fit_has_no_rank_columns(tiny_data, tmp_path):
    done = ddp_launch(RunConfig(data=str(tiny_data), **TINY), tmp_path, procs=1)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((tmp_path/'rank0.json').read_text())
    assert res['world'] == 1 and 'slowest_rank' not in res['batch'][0]


def test_swap_and_optimize_say_what_to_do_with_a_wrapped_model():
    from fastai_order.rewrite.swap import swap_order
    from fastai_order.rewrite.optimize import optimize_order
    from fastai_order.model.layers import ordered_cnn
    model = ordered_cnn(3, 4, (8,))
    for fn in (swap_order, optimize_order):
        with pytest.raises(TypeError, match=rf"{fn.__name__} got a model wrapped in DataParallel.*call {fn.__name__} on the model inside \(`model.module`\) before wrapping it"):
            fn(nn.DataParallel(model), 'bn_after') if fn is swap_order else fn(nn.DataParallel(model), torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize('build', ['xresnet', 'cnn', 'torchvision', 'timm', 'timm_norm_act'])
def test_ordered_and_swapped_models_survive_the_sync_batchnorm_conversion(build):
    "fastai's distrib_ctx(sync_bn=True) converts every BatchNorm with torch's convert_sync_batchnorm: the model computes the same, and swaps again"
    from fastai_order.model.layers import ordered_xresnet, ordered_cnn
    from fastai_order.rewrite.swap import swap_order
    from fastai_order.model.ops import module_role, op_name
    from fastai_order.timing.layer_timer import _timed_modules
    torch.manual_seed(0)
    if build == 'xresnet': model = ordered_xresnet('xresnet18', 'bn_after', n_out=4)
    elif build == 'cnn': model = ordered_cnn(3, 4, (8, 16), order='pool_before_bn')
    elif build == 'torchvision':
        import torchvision
        model = torchvision.models.resnet18(num_classes=4); swap_order(model, 'bn_after')
    else:
        timm = pytest.importorskip('timm')
        model = timm.create_model('resnet18' if build == 'timm' else 'efficientnet_b0', num_classes=4); swap_order(model, 'bn_after')
    x = torch.randn(2, 3, 32, 32)
    model.eval(); ref = model(x)
    if build == 'timm_norm_act':   # torch's conversion would drop BatchNormAct2d's activation: timm's keeps it
        from timm.layers import convert_sync_batchnorm
        synced = convert_sync_batchnorm(model).eval()
        assert {module_role(m) for m in synced.modules() if 'Sync' in type(m).__name__} == {'norm_act'}
    else: synced = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    bns = [m for m in synced.modules() if type(m) is nn.SyncBatchNorm]
    assert (bns or build == 'timm_norm_act') and all(module_role(m) == 'bn' and op_name(m) == 'bn' for m in bns)   # the registry knows SyncBatchNorm
    torch.testing.assert_close(synced(x), ref)
    assert any(r in ('bn', 'norm_act') for _, _, r in _timed_modules(synced))
    report = swap_order(synced, 'resnet')   # and its order can still be swapped
    assert report.paths('rewritten') and report.complete and synced(x).shape == ref.shape


GRID = textwrap.dedent('''
    import os, sys
    import fastai_order.experiment.engines as engines
    from fastai_order.experiment.compare import compare_cli
    if os.environ.get('DIE_AT') and os.environ['RANK'] == '1':   # rank 1 dies when the run DIE_AT starts
        real, n = engines.train_run, [0]
        def dies(*a, **k):
            n[0] += 1
            if n[0] == int(os.environ['DIE_AT']): os._exit(3)
            return real(*a, **k)
        engines.train_run = dies
    sys.argv = ['fastai-order-compare', *sys.argv[1:]]
    compare_cli()
''')


def test_a_data_parallel_comparison_survives_a_dead_rank_and_resumes(tiny_data, tmp_path):
    (tmp_path/'grid.py').write_text(GRID)
    out = tmp_path/'ddp'
    args = ['--orders', 'resnet,bn_after', '--seeds', '2', '--data', tiny_data, '--epochs', '1', '--bs', '2', '--size', '16',
            '--workers', '0', '--out', out]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(tmp_path/'grid.py'), *map(str, args)]
    dead = subprocess.run(cmd, env={**os.environ, 'DIE_AT': '3'}, capture_output=True, text=True, timeout=600)
    assert dead.returncode != 0 and 'exitcode  : 3' in dead.stderr
    runs = sorted((out/'runs').glob('*.json'))
    assert len(runs) == 2 and not list((out/'runs').glob('*.tmp*'))   # the two finished runs, whole
    stamps = {f: f.stat().st_mtime_ns for f in runs}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {f: f.stat().st_mtime_ns for f in runs} == stamps and len(list((out/'runs').glob('*.json'))) == 4   # only the missing ones
    assert json.loads((out/'config.json').read_text())['ranks'] == 2
    rec = json.loads(runs[0].read_text())
    assert rec['config']['ranks'] == 2 and rec['results']['samples_per_s'] > 0 and (out/'report.md').exists()
    assert done.stdout.count('report and figures') == 1   # rank 0 reports, once
    alone = subprocess.run([str(Path(sys.executable).parent/'fastai-order-compare'), *map(str, args)], capture_output=True, text=True)
    assert alone.returncode != 0 and 'ranks: 2 there, 1 now' in alone.stderr   # a single process cannot join a 2-rank comparison
