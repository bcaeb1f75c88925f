"`compare_orders` and `fastai-order-compare` on a tiny Imagenette-shaped folder: results on disk run by run, resume, refusals, single runs, W&B offline."
import json
import pandas as pd, pytest, wandb
import fastai_order.compare as compare
from fastai_order.compare import compare_orders, compare_cli, load_runs, order_stats
from test_data import imagenette_like
from wandb_history import config as run_config

TINY = dict(arch='cnn', epochs=1, bs=4, size=16, num_workers=0)


@pytest.fixture(scope='module')
def data(tmp_path_factory): return imagenette_like(tmp_path_factory.mktemp('data')/'tiny', n_train=8, n_val=4)


def test_an_interrupted_comparison_resumes_with_only_what_is_missing(data, tmp_path, monkeypatch):
    real, calls = compare.train_run, []
    def crash_on_third(order, seed, *args, **kwargs):
        calls.append((order, seed))
        if len(calls) == 3: raise KeyboardInterrupt
        return real(order, seed, *args, **kwargs)
    monkeypatch.setattr(compare, 'train_run', crash_on_third)
    with pytest.raises(KeyboardInterrupt): compare_orders(['resnet', 'bn_after'], data, seeds=2, out=tmp_path, **TINY)
    assert len(load_runs(tmp_path)) == 2 and not list((tmp_path/'runs').glob('*.tmp'))   # finished runs are kept, nothing half-written
    calls.clear()
    res = compare_orders(['resnet', 'bn_after'], data, seeds=2, out=tmp_path, **TINY)
    assert calls == [('conv-bn-act', 1), ('conv-act-bn', 1)]   # seed 0 of both was done
    runs = pd.read_csv(tmp_path/'results.csv')
    assert len(runs) == 4 and set(zip(runs.order, runs.seed)) == {(o, s) for o in ('conv-bn-act', 'conv-act-bn') for s in (0, 1)}
    assert {'accuracy', 'valid_loss', 'train_ms', 'valid_ms', 'train_forward_ms', 'train_backward_ms', 'samples_per_s',
            'params', 'peak_memory_mb'} <= set(runs.columns)
    assert (runs.params > 0).all() and runs.accuracy.between(0, 1).all()
    assert list(res.stats.order) == ['conv-bn-act', 'conv-act-bn'] and res.stats.verdict[0] == 'baseline'
    assert 'accuracy not distinguishable at n=2' in res.stats.verdict[1] or 'accurate by' in res.stats.verdict[1]
    assert '| conv-act-bn | 2 |' in (tmp_path/'report.md').read_text()
    assert all((tmp_path/f'{n}.png').stat().st_size > 1000 for n in ('accuracy', 'phases', 'tradeoff'))


def test_another_configuration_in_the_same_folder_is_refused(data, tmp_path):
    compare_orders(['resnet'], data, seeds=1, out=tmp_path, **TINY)
    before = (tmp_path/'results.csv').read_text()
    with pytest.raises(ValueError, match=r"holds runs of another configuration \(lr: 0.003 there, 0.01 now\): use another out folder"):
        compare_orders(['resnet'], data, seeds=1, out=tmp_path, lr=1e-2, **TINY)
    assert (tmp_path/'results.csv').read_text() == before


def test_one_seed_claims_no_test(data, tmp_path):
    res = compare_orders(['resnet', 'pool_before_bn'], data, seeds=1, out=tmp_path, **TINY)
    assert res.stats.verdict.tolist() == ['baseline', 'no test with a single run (n=1 vs 1)'] and res.stats.p_ms.isna().all()


def test_single_runs_fan_out_and_a_last_call_reports(data, tmp_path, capsys):
    args = dict(orders='resnet,bn_after', data=str(data), seeds=2, epochs=1, bs=4, size=16, out=str(tmp_path), workers=0)
    for run in ('bn_after:1', 'resnet:0'): compare_cli(**args, run=run)
    assert sorted(f.name for f in (tmp_path/'runs').iterdir()) == ['conv_act_bn__seed1.json', 'conv_bn_act__seed0.json']
    assert not (tmp_path/'report.md').exists()
    compare_cli(**args, dry_run=True)
    assert '2 of 4 runs done' in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"Single run \('conv-bn-act', 5\) is not in the grid"): compare_cli(**args, run='resnet:5')


@pytest.mark.parametrize('bad, msg', [
    (dict(orders='resnet,sideways'), "Unknown op 'sideways'"), (dict(data='imagenet'), "Unknown data 'imagenet'"),
    (dict(seeds=0), '`seeds` must be an integer ≥ 1, got 0'), (dict(backend='jit'), "Unknown backend 'jit': allowed: eager, channels_last, compile"),
    (dict(arch='vgg'), "Unknown arch 'vgg'"), (dict(epochs=0), '`epochs` must be an integer ≥ 1')])
def test_bad_input_stops_before_training(tmp_path, monkeypatch, bad, msg):
    monkeypatch.setattr(compare, 'train_run', lambda *a, **k: pytest.fail('trained'))
    with pytest.raises(SystemExit, match=msg): compare_cli(**{'out': str(tmp_path/'out'), **bad})
    assert not (tmp_path/'out').exists()


def test_an_out_folder_that_cannot_be_written(tmp_path):
    (tmp_path/'file').write_text('')
    with pytest.raises(ValueError, match="Cannot write results to"): compare_orders(['resnet'], 'mnist', out=tmp_path/'file'/'out')


def test_wandb_runs_grouped_by_experiment_with_the_configuration(data, tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline'); monkeypatch.setenv('WANDB_SILENT', 'true')
    compare_orders(['resnet', 'pool_before_bn'], data, seeds=1, out=tmp_path/'exp1', wandb=True, **TINY)
    dirs = sorted((tmp_path/'exp1'/'wandb').glob('offline-run-*'))
    assert len(dirs) == 3   # one per (order, seed), and the summary
    cfgs = [run_config(d) for d in dirs]
    runs = [c for c in cfgs if 'order' in c]
    assert sorted(c['order'] for c in runs) == ['conv-bn-act', 'conv-pool-bn-act']
    assert all(c['seed'] == 0 and c['arch'] == 'cnn' and c['data'] == str(data) and c['backend'] == 'eager' for c in runs)
    if wandb.run is not None: wandb.finish()


def test_welch_verdicts_on_known_data():
    rows = [dict(order='a', seed=s, accuracy=0.90 + 0.001*s, train_ms=100. + s) for s in range(4)]
    rows += [dict(order='b', seed=s, accuracy=0.95 + 0.001*s, train_ms=130. + s) for s in range(4)]
    st = order_stats(pd.DataFrame(rows))
    assert st.verdict[1].startswith('slower by 30% ± ') and 'more accurate by 5.0 ± ' in st.verdict[1]
    assert st.p_acc[1] < 1e-6 and st.n.tolist() == [4, 4]


def test_channels_last_backend(data, tmp_path):
    res = compare_orders(['resnet'], data, seeds=1, out=tmp_path, backend='channels_last', **TINY)
    assert json.loads((tmp_path/'config.json').read_text())['backend'] == 'channels_last' and len(res.runs) == 1
