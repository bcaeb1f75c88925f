"The benchmark commands time what their options say: the device, the precision (autocast), channels_last, torch.compile; bad settings stop with one line."
import contextlib
import pytest, torch
from torch import nn
import fastai_order.tools.bench as fb
from fastai_order.tools.bench import bench
from fastai_order.tools.overhead import overhead_bench
from fastai_order.tools.optimize_bench import optimize_bench
from fastai_order.experiment.setting import Setting
from fastai_order.timing.paired import paired_times

CL = torch.channels_last
ORDERS = 'conv-bn-act-pool,conv-pool-bn-act,conv-bn-pool-act'
TINY = dict(arch='cnn', bs=4, size=16, steps=1, repeats=1)


@pytest.fixture
def seen(monkeypatch):
    "What each forward of the models `fastai-order-bench` builds saw, by model name: output dtype, input device and layout, conv weights' layout, compiled"
    seen, make = {}, fb.bench_models
    def hooked(*args, **kwargs):
        models = make(*args, **kwargs)
        for name, m in models.items():
            def record(mod, inp, out, name=name):
                conv = next(c for c in mod.modules() if isinstance(c, nn.Conv2d))
                seen.setdefault(name, []).append(dict(dtype=out.dtype, device=inp[0].device.type, compiled=torch.compiler.is_compiling(),
                                                      x_cl=inp[0].is_contiguous(memory_format=CL), w_cl=conv.weight.is_contiguous(memory_format=CL)))
            m.register_forward_hook(record)
        return models
    monkeypatch.setattr(fb, 'bench_models', hooked)
    return seen


@contextlib.contextmanager
def conv_calls():
    "Every `nn.Conv2d` call in the block, from any model: output dtype and whether its weight is channels_last"
    calls = []
    h = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: calls.append((o.dtype, m.weight.is_contiguous(memory_format=CL))) if isinstance(m, nn.Conv2d) else None)
    try: yield calls
    finally: h.remove()


def test_bench_times_the_thread_cnn_in_each_order_under_each_setting(seen, capsys):
    df = bench(**TINY, orders=ORDERS, device='cpu', settings='fp32,bf16+channels_last')
    names = ['cnn conv-bn-act-pool', 'cnn conv-pool-bn-act', 'cnn conv-bn-pool-act']
    assert df.model.tolist() == names * 2 and df.setting.tolist() == ['fp32'] * 3 + ['bf16+channels_last'] * 3
    assert df.ratio[0] == df.ratio[3] == 1.0   # each setting's ratios are to its own first order
    out = capsys.readouterr().out
    assert "Time ratio to 'cnn conv-bn-act-pool'" in out and out.rstrip().splitlines()[-1].split()[0] == 'cnn'
    for name in names:
        calls = seen[name]
        fp32, bf16 = calls[:len(calls)//2], calls[len(calls)//2:]   # each setting builds its models anew: first fp32, then bf16+channels_last
        assert {c['dtype'] for c in fp32} == {torch.float32} and not any(c['w_cl'] for c in fp32)
        assert {c['dtype'] for c in bf16} == {torch.bfloat16} and all(c['w_cl'] and c['x_cl'] for c in bf16)
        assert {c['device'] for c in calls} == {'cpu'} and not any(c['compiled'] for c in calls)


def test_bench_compile_times_the_compiled_model(seen):
    df = bench(**TINY, orders='conv-bn-act-pool,conv-bn-pool-act', device='cpu', compile=True)
    assert df.setting.unique().tolist() == ['compile']
    assert all(c['compiled'] for calls in seen.values() for c in calls)


def test_bench_compares_xresnet_with_fastai_by_default(seen):
    df = bench(bs=2, size=32, steps=1, repeats=1, orders='resnet,bn_after', device='cpu')
    assert df.model.tolist() == ['fastai xresnet18', 'ordered_xresnet conv-bn-act', 'ordered_xresnet conv-act-bn']
    assert df.ratio[0] == 1.0


def test_optimize_bf16_runs_the_timed_forwards_in_bf16():
    with conv_calls() as calls: optimize_bench(models='cnn', bs=2, size=32, train_bs=4, train_size=16, repeats=1, device='cpu', precision='bf16')
    dtypes = [d for d, _ in calls]
    assert dtypes.count(torch.bfloat16) > dtypes.count(torch.float32)   # fp32 only where optimize_order checks its rewrites


def test_timing_fits_in_channels_last_and_bf16(capsys):
    with conv_calls() as calls:
        overhead_bench(bs=4, size=32, batches=2, repeats=1, orders='resnet', device='cpu', precision='bf16', channels_last=True)
    assert calls and all(d == torch.bfloat16 and cl for d, cl in calls)
    assert 'cpu, bf16+channels_last' in capsys.readouterr().out


@pytest.mark.parametrize('f, kw, msg', [
    (bench, dict(device='cpu', precision='fp16'), "fastai-order-bench: precision 'fp16' is for CUDA"),
    (bench, dict(device='gpu'), "fastai-order-bench: Unknown device 'gpu'"),
    (bench, dict(settings='fp32,bf16+chanels_last'), "fastai-order-bench: Unknown setting part 'chanels_last': did you mean 'channels_last'?"),
    (bench, dict(settings='bf16+fp16'), "fastai-order-bench: Setting 'bf16+fp16' names 2 precisions"),
    (bench, dict(settings='fp32,fp32'), "fastai-order-bench: Settings 'fp32,fp32' name one setting twice"),
    (bench, dict(arch='cnn', orders='resnet,conv-bn-act-pool'), "fastai-order-bench: Orders 'resnet' and 'conv-bn-act-pool' build the same model (cnn conv-bn-act-pool)"),
    (overhead_bench, dict(runner=True, precision='bf16', device='cpu'), "fastai-order-overhead: --runner times the runs"),
    (optimize_bench, dict(precision='int8'), "fastai-order-optimize: Unknown precision 'int8'"),
])
def test_a_bad_setting_stops_with_one_line(f, kw, msg):
    with pytest.raises(SystemExit) as e: f(**kw)
    assert str(e.value).startswith(msg) and '\n' not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
@pytest.mark.parametrize('f', [bench, overhead_bench, optimize_bench])
def test_cuda_where_there_is_none_stops_with_one_line(f):
    with pytest.raises(SystemExit, match=r"^fastai-order-\w+: device 'cuda' is not available: torch sees no CUDA GPU here; use 'cpu'$"):
        f(device='cuda')


@pytest.mark.cuda
def test_on_cuda_the_models_run_on_the_gpu_and_the_clock_waits_for_it(seen):
    bench(**TINY, orders=ORDERS, device='cuda', settings='fp32,fp16+channels_last')
    calls = [c for cs in seen.values() for c in cs]
    assert {c['device'] for c in calls} == {'cuda'} and {c['dtype'] for c in calls} == {torch.float32, torch.float16}
    a = torch.randn(4096, 4096, device='cuda')
    t = paired_times({'matmuls': lambda: [a @ a / 64 for _ in range(20)]}, repeats=1, warmup=0, device=Setting('cuda').dev)
    assert torch.cuda.current_stream().query() and t.matmuls[0] > 0   # the harness's clock waited for everything queued


def test_every_paired_benchmark_times_with_the_one_harness(monkeypatch):
    import fastai_order.tools.overhead as fo
    from fastai_order.model.layers import ordered_cnn
    arms = []
    def spy(a, *args, **kwargs): arms.append(list(a)); return paired_times(a, *args, **kwargs)
    for mod in (fb, fo): monkeypatch.setattr(mod, 'paired_times', spy)
    cnn = lambda w: ordered_cnn(3, 4, (w,))
    fb.compare_train_steps({'a': cnn(4), 'b': cnn(8)}, bs=2, size=8, n_out=4, steps=1, repeats=1)
    fb.compare_eval({'a': cnn(4).eval(), 'b': cnn(8).eval()}, torch.randn(2, 3, 8, 8), calls=1, repeats=1)
    fo.timer_overhead(cnn(4), bs=4, size=8, batches=2, repeats=1, n_out=4)
    assert arms == [['a', 'b'], ['a', 'b'], ['none', 'none again', 'BatchTimer', 'LayerTimer']]


def test_settings_are_checked_by_type_and_value():
    with pytest.raises(TypeError, match="`compile` must be True or False, got 1"): Setting.of('cpu', compile=1)
    with pytest.raises(ValueError, match="Unknown backend 'channel_last': did you mean 'channels_last'?"): Setting('cpu', backend='channel_last')
    assert Setting('cpu', backend='compile+channels_last') == Setting.parse('channels_last+compile', 'cpu')   # one backend, one label
    import fastai_order.tools.overhead as fo
    with pytest.raises(ValueError, match="compares the sequential runner with another engine, got 'local'"): fo.engine_speedup(engine='local')
