"Several processes writing into one results folder: every run trained once, nothing lost or corrupted, the same report."
import re, subprocess, sys, textwrap
from fastai_order.experiment.run import RunConfig
from fastai_order.experiment.results import RunsFolder
from fastai_order.experiment.compare import comparison_plan

WORKER = textwrap.dedent('''
    import sys, json
    import fastai_order.experiment.engines as engines
    import fastai_order.experiment.compare as compare
    from fastai_order.experiment.run import RunConfig
    real = engines.train_run
    def logged(cfg, *a):
        print('TRAINED', cfg.order, cfg.seed, flush=True)
        return real(cfg, *a)
    engines.train_run = logged
    res = compare.compare_orders(['resnet', 'bn_after'], RunConfig(data=sys.argv[1], epochs=1, bs=4, size=16, workers=0), seeds=2, out=sys.argv[2])
    print('\\nTABLE', json.dumps(res.table()))
''')


def test_processes_sharing_a_folder_train_each_run_once(tiny_data, tmp_path):
    procs = [subprocess.Popen([sys.executable, '-c', WORKER, str(tiny_data), str(tmp_path/'c')], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    trained = [t for o in outs for t in re.findall(r'TRAINED (\S+) (\d)', o)]   # fastai's progress bars share the lines
    assert sorted(trained) == sorted((o, str(s)) for o in ('conv-bn-act-pool', 'conv-act-bn-pool') for s in (0, 1))   # each once
    tables = {t for o in outs for t in re.findall(r'TABLE (.*)', o)}
    assert len(tables) == 1   # every process waited for all runs and printed the same report
    folder = RunsFolder(tmp_path/'c')
    grid = comparison_plan(['resnet', 'bn_after'], RunConfig(data=str(tiny_data), epochs=1, bs=4, size=16, workers=0), seeds=2)
    assert all(folder.read(c) is not None for c in grid) and not list((tmp_path/'c'/'runs').glob('*.tmp'))
