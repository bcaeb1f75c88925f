"Schedulers: a W&B sweep's command trains its grid point; a SLURM job array's tasks share one folder (duplicates, a task killed mid-write, a task of another configuration) and nothing is lost or corrupted."
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import yaml
from fastai_order.experiment.compare import comparison_plan
from fastai_order.experiment.run import RunConfig
from fastai_order.experiment.results import RunsFolder
from fastai_order.experiment.schedulers import scheduler_config, cli_args

TINY = dict(epochs=1, bs=4, size=16, workers=0)
BIN = Path(sys.executable).parent
ORDERS = ['resnet', 'bn_after']


def test_a_wandb_sweep_agent_runs_its_grid_point(tiny_data, tmp_path):
    cfg = RunConfig(data=str(tiny_data), **TINY)
    sweep = yaml.safe_load(scheduler_config('wandb', ORDERS, cfg, 2, tmp_path/'s'))
    assert sweep['method'] == 'grid' and sweep['parameters'] == dict(order=dict(values=ORDERS), seed=dict(values=[0, 1]))
    # what `wandb agent` runs for the point (bn_after, 1): ${env} ${program} … ${args}
    expand = {'${env}': [], '${program}': [str(BIN/sweep['program'])], '${args}': ['--order=bn_after', '--seed=1']}
    cmd = [a for w in sweep['command'] for a in expand.get(w, [w])]
    assert '--wandb' in cmd
    out = subprocess.run(cmd + ['--dry-run'], capture_output=True, text=True, env={**os.environ, 'WANDB_MODE': 'offline'})
    assert out.returncode == 0, out.stderr
    assert 'conv-act-bn-pool     1 to train' in out.stdout and '0 of 1 runs done' in out.stdout, out.stdout


SLOW_WRITE = textwrap.dedent('''
    import pathlib, runpy, sys, time
    real = pathlib.Path.write_text
    def write_text(self, text, *a, **k):   # a run's record is written slowly; every other file as usual
        if self.parent.name != 'runs': return real(self, text, *a, **k)
        with open(self, 'w') as f:
            f.write(text[:len(text)//2]); f.flush()
            print('HALF WRITTEN', flush=True); time.sleep(600)
    pathlib.Path.write_text = write_text
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')
''')


def _task(script, k, slow=False):
    "SLURM array task `k`: `script` run with its SLURM_ARRAY_TASK_ID; `slow`: its command run with records written slowly"
    env = {**os.environ, 'SLURM_ARRAY_TASK_ID': str(k), 'PATH': f"{BIN}:{os.environ['PATH']}"}
    cmd = ['bash', str(script)]
    if slow:   # the script's command, as bash expands it, run under SLOW_WRITE
        text = script.read_text().replace('\nexec ', "\nprintf '%s\\n' ")
        args = subprocess.run(['bash', '-c', text], env=env, capture_output=True, text=True, check=True).stdout.splitlines()
        cmd = [sys.executable, '-c', SLOW_WRITE, str(BIN/args[0]), *args[1:]]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_job_array_tasks_share_one_folder_and_a_killed_task_loses_nothing(tiny_data, tmp_path):
    cfg, out = RunConfig(data=str(tiny_data), **TINY), tmp_path/'shared'
    script = tmp_path/'orders.sbatch'
    script.write_text(scheduler_config('slurm', ORDERS, cfg, 2, out))
    grid, folder = comparison_plan(ORDERS, cfg, seeds=2), RunsFolder(out)
    assert subprocess.run(['bash', '-n', str(script)]).returncode == 0
    # task 0 first, alone; then task 1 is killed while it writes its record
    first = _task(script, 0); assert first.wait(timeout=300) == 0, first.stdout.read()
    slow = _task(script, 1, slow=True)
    for line in slow.stdout:
        if 'HALF WRITTEN' in line: break
    slow.send_signal(signal.SIGKILL); slow.wait()
    assert folder.read(grid[1]) is None and folder.read(grid[0]) is not None   # no half record; the finished one intact
    assert list((out/'runs').glob('*.tmp*'))   # what the killed task left: never read as a run
    # the array again, every task at once, tasks 1 and 3 twice (a requeue), and a task of another configuration
    other = scheduler_config('slurm', ORDERS, cfg.replace(lr=0.01), 2, out)
    (tmp_path/'other.sbatch').write_text(other)
    procs = [_task(script, k) for k in (0, 1, 2, 3, 1, 3)] + [_task(tmp_path/'other.sbatch', 2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs[:-1]] == [0]*6, logs
    assert procs[-1].returncode != 0 and 'holds runs of another configuration (lr: 0.003 there, 0.01 now)' in logs[-1]
    records = [folder.read(c) for c in grid]   # every record complete, checked, of its own run
    assert all(r is not None for r in records)
    assert [r['config']['order'] for r in records] == [c.order for c in grid]
    stamps = {f: f.stat().st_mtime_ns for f in (out/'runs').glob('*.json')}
    report = subprocess.run([str(BIN/'fastai-order-compare'), *cli_args(ORDERS, cfg, 2, out)], capture_output=True, text=True)
    assert report.returncode == 0 and (out/'report.md').exists(), report.stderr   # the last call: the report, nothing trained
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps
    print(f"\nconcurrency: {len(procs) + 2} processes, {len(grid)} runs, {sum(r is not None for r in records)} results found, "
          f"0 files corrupted")


def test_the_shipped_examples_are_what_the_command_prints():
    "examples/ holds the README's Imagenette grid as a W&B sweep and a SLURM array: regenerated, they are unchanged"
    from fastai_order.experiment.compare import compare_cli
    import contextlib, io
    root = Path(__file__).parent.parent/'examples'
    args = dict(orders='resnet,bn_after,preact,pool_before_act,pool_before_bn', data='imagenette-160', arch='xresnet18', size=128, bs=64,
                epochs=5, seeds=5, lr=8e-3, workers=8, out='/shared/imagenette_orders', wandb=True)
    for name, extra in (('imagenette_orders.sweep.yaml', dict(scheduler='wandb')),
                        ('imagenette_orders.sbatch', dict(scheduler='slurm', cpus_per_run=8, gpus_per_run=1))):
        with contextlib.redirect_stdout(io.StringIO()) as o: compare_cli(**args, **extra)
        assert o.getvalue() == (root/name).read_text(), name
