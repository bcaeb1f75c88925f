"Engines: a grid of runs as Ray tasks on a local Ray (2 CPUs), a worker killed midway, a failed run named while the others are kept, Ray missing."
import os, signal, subprocess, sys, time
from pathlib import Path
import psutil, pytest
import fastai_order.experiment.engines as engines
from fastai_order.experiment.compare import comparison_plan, compare_cli
from fastai_order.experiment.engines import train_grid, get_engine
from fastai_order.experiment.run import RunConfig, train_run
from fastai_order.experiment.results import RunsFolder

TINY = dict(epochs=1, bs=4, size=16, workers=0)
BIN = Path(sys.executable).parent


def _ray_workers():
    "This machine's Ray worker processes running a run (Ray titles them after the task)"
    return [p for p in psutil.process_iter(['cmdline']) if 'ray::train_run' in ' '.join(p.info['cmdline'] or [])]


def test_a_ray_grid_survives_a_killed_worker_and_resumes(tiny_data, tmp_path):
    pytest.importorskip('ray')
    out = tmp_path/'grid'
    cmd = [str(BIN/'fastai-order-compare'), '--orders', 'resnet,bn_after', '--seeds', '2', '--data', str(tiny_data), '--epochs', '1',
           '--bs', '4', '--size', '16', '--workers', '0', '--out', str(out), '--engine', 'ray', '--cpus-per-run', '1']
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, deadline = None, time.monotonic() + 300
    while killed is None and driver.poll() is None and time.monotonic() < deadline:   # kill the first worker seen training
        for p in _ray_workers():
            try: p.send_signal(signal.SIGKILL); killed = p.pid; break
            except psutil.NoSuchProcess: pass
        time.sleep(0.05)
    log = driver.communicate(timeout=600)[0]
    assert killed and driver.returncode == 0, log
    cfg = RunConfig(data=str(tiny_data), **TINY)
    folder, grid = RunsFolder(out), comparison_plan(['resnet', 'bn_after'], cfg, seeds=2)
    assert all(folder.read(c) is not None for c in grid)   # Ray retried the killed run; every record checks
    assert all(folder.read(c)['context']['threads'] == 1 for c in grid)   # each task had its one CPU
    assert (out/'report.md').exists() and not list((out/'runs').glob('*.tmp*'))
    lost = folder.run_file(grid[2]); lost.unlink()
    stamps = {f: f.stat().st_mtime_ns for f in (out/'runs').glob('*.json')}
    assert train_grid(folder, grid, engine='ray') == 1 and lost.exists()   # only the missing run trains
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps


class FlakyEngine:
    "A parallel engine whose run `fail` ends in an error, as a Ray task's would"
    name, parallel, waiting = 'flaky', True, None
    def __init__(self, fail): self.fail, self.started = fail, []
    def __enter__(self): return self
    def __exit__(self, *exc): pass
    def start(self, cfg, group, log_dir, learner=None): self.started.append(cfg); return cfg
    def wait(self, handles):
        cfg = handles[0]
        return cfg, (RuntimeError('CUDA out of memory.\nTried to allocate') if cfg == self.fail else train_run(cfg))


def test_a_failed_run_is_named_and_the_others_are_kept(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(engines, 'get_engine', lambda e: e)
    cfg = RunConfig(data=str(tiny_data), **TINY)
    grid, folder = comparison_plan(['resnet', 'bn_after'], cfg, seeds=2), RunsFolder(tmp_path)
    folder.create(cfg)
    engine = FlakyEngine(grid[1])
    with pytest.raises(RuntimeError, match=r"1 of 4 runs failed \(conv-act-bn-pool:0: RuntimeError: CUDA out of memory.\); the finished runs"):
        train_grid(folder, grid, engine=engine)
    assert engine.started == grid   # a parallel engine starts every run at once
    assert [folder.read(c) is not None for c in grid] == [True, False, True, True]
    assert all(folder.claim(c) is not None for c in grid)   # no lock is left held


def test_without_ray_the_ray_engine_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'ray', None)   # `import ray` fails
    with pytest.raises(SystemExit, match=r"engine 'ray' needs Ray: pip install 'fastai_order\[ray\]'"):
        compare_cli(orders='resnet', seeds=1, epochs=1, out=str(tmp_path/'x'), engine='ray')
    assert not (tmp_path/'x').exists()
    with pytest.raises(ValueError, match="needs Ray"): get_engine('ray')
