"The zoo sweep on `SUBSET`: optimize_order is never wrong (nor crashes) on torchvision's and timm's models, swap_order keeps checkpoints loadable; the CSV resumes; limits and bad input are recorded or refused in one line."
import copy, inspect
import pandas as pd, pytest, torch
import fastai_order.tools.zoo as fz
from fastai_order.tools.zoo import zoo_sweep, zoo_cli, run_isolated, COLUMNS
from fastai_order.tools.zoo_row import SUBSET, zoo_model, calibrate_bn, model_errors
from fastai_order.tools.zoo_summary import zoo_summary
from fastai_order.rewrite.optimize import optimize_order
from fastai_order.rewrite.proof import rounding_sensitivity, ROUNDING_MARGIN
from fastai_order.rewrite.swap import swap_order

pytest.importorskip('timm')
FAST = dict(reps=0, bs=1, size=64)   # batch 1, 64 px where a model takes any size (not the fixed-size ViT-likes), no timing


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "One torch thread: on a busy 2-core machine two threads spin at OpenMP barriers, and the subset took 5-7× as long"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def subset(tmp_path_factory, one_thread):
    "The subset swept once, in this process (no per-model subprocess: 20 × the imports would dominate), into a CSV"
    out = tmp_path_factory.mktemp('zoo')/'zoo.csv'
    return zoo_sweep('subset', **FAST, isolate=False, out=out, verbose=False), out


def test_subset_swept_every_model_once(subset):
    df, out = subset
    assert list(zip(df.source, df.model)) == [(s, n) for s in ('torchvision', 'timm') for n in SUBSET[s]]
    s = zoo_summary(df)
    assert list(pd.read_csv(out).columns) == COLUMNS and s.loc['tried', 'all'] == 20
    assert s.loc['swap: every chain swapped', 'all'] == f"{(df.swap_missed == 0).sum()}/{df.swap_chains.notna().sum()}"
    assert zoo_summary(pd.read_csv(out)).equals(s)   # the same from the CSV as pandas reads it (whole numbers as floats)


DRIFT = inspect.signature(optimize_order).parameters['drift'].default   # optimize_order's own float32 allowance: 4× the original's error
UNIT = torch.finfo(torch.float32).eps / 2   # plus one rounding


def within_rounding(df) -> pd.Series:
    """Whether each row's errors are what this machine's rounding explains, judged against the model's own errors measured
    here (never a fixed bound: one CPU rounds LeViT's float32 outputs to 1.4e-3 of the float64 result, another to 3.5e-3):
    the float64 rerun within `ROUNDING_MARGIN`× what one rounding of every weight changes (at least 1e-9), and the float32
    model as returned within `DRIFT`× the float32 original's own error on the same batch, plus one rounding"""
    f64 = df.sweep_error <= (ROUNDING_MARGIN * df.float64_noise.fillna(0)).clip(lower=1e-9)
    return f64 & (df.fp32_error <= DRIFT * df.fp32_error_original + UNIT)


def test_subset_optimize_is_never_wrong(subset):
    df, _ = subset
    assert not (df.outcome == 'wrong').any(), df.loc[df.outcome == 'wrong', ['source', 'model', 'sweep_error', 'message']]
    done = df[df.outcome.isin(['optimized', 'unchanged'])]
    assert within_rounding(done).all(), done[['model', 'sweep_error', 'float64_noise', 'fp32_error', 'fp32_error_original']]
    opt = df[df.outcome == 'optimized']
    assert (opt.groups64 == opt.groups).all()   # the float64 rerun made the same rewrites as the float32 run
    assert (df.source == 'torchvision').sum() == (df[df.source == 'torchvision'].outcome == 'optimized').sum()   # conv-BN in every one


def test_a_wrong_model_is_out_of_those_bounds():
    "The bounds above tell a wrong model: resnet18 whose conv → BN → ReLU chains became conv → ReLU → BN (`swap_order`, which changes what it computes)"
    model, shape = zoo_model('torchvision', 'resnet18', size=64)
    calibrate_bn(model, shape)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    wrong = copy.deepcopy(model)
    swap_order(wrong, 'bn_after')
    e = model_errors(model, wrong, x)
    noise = rounding_sensitivity(copy.deepcopy(model).double(), x.double())[0]
    row = pd.DataFrame([dict(e, sweep_error=e['f64_error'], float64_noise=noise)])
    assert not within_rounding(row).any(), row
    assert not within_rounding(row.assign(fp32_error=0.)).any() and not within_rounding(row.assign(sweep_error=0.)).any(), row   # each bound alone


def test_subset_optimize_never_crashes(subset):
    df, _ = subset
    crashed = df[df.outcome == 'crashed']
    assert crashed.empty, crashed[['source', 'model', 'message']].to_string()


def test_subset_swap_keeps_state_dict_keys_and_runs(subset):
    df, _ = subset
    assert (df.swap_status != 'crashed').all(), df.loc[df.swap_status == 'crashed', ['model', 'swap_error']]
    ok = df[df.swap_status == 'ok']
    assert ok.swap_keys_same.astype(str).eq('True').all(), ok.loc[~ok.swap_keys_same.astype(str).eq('True'), 'model']
    assert ok.swap_runs.astype(str).eq('True').all(), ok.loc[~ok.swap_runs.astype(str).eq('True'), ['model', 'swap_error']]


def test_resume_skips_the_models_in_the_csv(subset, tmp_path, monkeypatch, capsys):
    df, out = subset
    ran, row = [], fz.zoo_row
    monkeypatch.setattr(fz, 'zoo_row', lambda s, n, **kw: ran.append(n) or row(s, n, **kw))
    again = zoo_sweep('subset', **FAST, isolate=False, out=out)
    assert ran == [] and again.equals(df) and capsys.readouterr().out.startswith('20 of 20 models already in')
    part = tmp_path/'part.csv'
    df.iloc[:2].to_csv(part, index=False)   # resnet18 and mobilenet_v3_small done; mnasnet0_5 not
    res = zoo_sweep('subset', 'resnet18,mnasnet0_5,mobilenet_v3_small', **FAST, isolate=False, out=part, verbose=False)
    assert ran == ['mnasnet0_5'] and res.model.tolist() == ['resnet18', 'mobilenet_v3_small', 'mnasnet0_5']
    zoo_sweep('subset', 'mnasnet0_5', **FAST, isolate=False, out=part, verbose=False)
    assert ran == ['mnasnet0_5']
    assert zoo_sweep('subset', 'mnasnet0_5', **dict(FAST, bs=2), isolate=False, out=part, verbose=False).bs.tolist() == [2]   # another setting: runs
    assert ran == ['mnasnet0_5'] * 2


def test_a_model_past_its_time_is_recorded_as_timeout(tmp_path):
    out = tmp_path/'zoo.csv'
    df = zoo_sweep('subset', 'resnet18', timeout=0.5, out=out, verbose=False)   # in a subprocess, killed after 0.5 s
    r = df.iloc[0]
    assert r.outcome == 'timeout' and r.message.startswith('still in phase') and r.message.endswith('after 0.5 s'), r.to_dict()
    assert pd.read_csv(out).outcome.tolist() == ['timeout']


def test_a_model_past_its_memory_is_recorded_as_out_of_memory():
    r = run_isolated('torchvision', 'resnet18', timeout=60, memory_gb=0.2, **FAST)   # the process alone holds more
    assert r['outcome'] == 'out of memory', r


@pytest.mark.parametrize('kw, msg', [
    (dict(models='resnet81'), "fastai-order-zoo: Unknown model 'resnet81': did you mean 'resnet18'?"),
    (dict(source='timm', models='efficientnet_b9'), "fastai-order-zoo: Unknown model 'efficientnet_b9': did you mean"),
    (dict(source='subset', models='vgg11'), "fastai-order-zoo: Unknown model 'vgg11': --source subset takes the subset: resnet18, "),
    (dict(source='torchvison'), "fastai-order-zoo: Unknown source 'torchvison': did you mean 'torchvision'?"),
    (dict(mode='inference'), "fastai-order-zoo: Unknown mode 'inference': allowed: eval, train"),
    (dict(channels_last='maybe'), "fastai-order-zoo: `channels_last` must be True, False or auto (None), got 'maybe'"),
    (dict(reps=-1), "fastai-order-zoo: `reps` must be an integer ≥ 0, got -1"),
    (dict(timeout=0), "fastai-order-zoo: `timeout` must be a number ≥ 0.01, got 0"),
    (dict(memory_gb=-2), "fastai-order-zoo: `memory_gb` must be a number ≥ 0.1, got -2"),
    (dict(bs=0), "fastai-order-zoo: `bs` must be an integer ≥ 1, got 0"),
    (dict(threads=0), "fastai-order-zoo: `threads` must be an integer ≥ 1, got 0"),
])
def test_bad_input_stops_in_one_line(kw, msg, tmp_path):
    with pytest.raises(SystemExit) as e: zoo_cli(**{'out': tmp_path/'zoo.csv', **kw})
    assert str(e.value).startswith(msg) and '\n' not in str(e.value), str(e.value)
    assert not (tmp_path/'zoo.csv').exists()


def test_a_csv_of_other_columns_is_not_appended_to(tmp_path):
    out = tmp_path/'other.csv'
    out.write_text('a,b\n1,2\n')
    with pytest.raises(SystemExit, match=r"^fastai-order-zoo: .*other.csv is not a sweep CSV of this version \(its columns differ\): give another --out$"):
        zoo_cli(source='subset', models='squeezenet1_1', out=out)
    assert out.read_text() == 'a,b\n1,2\n'


def test_a_row_cut_off_by_a_stopped_sweep_is_dropped_and_its_model_runs_again(subset, tmp_path):
    "A sweep killed while writing leaves half a row: it was glued to the next row appended, and the CSV could no longer be read"
    df, out = subset
    part = tmp_path/'part.csv'
    lines = out.read_text().splitlines(keepends=True)
    part.write_text(''.join(lines[:2]) + lines[2][:60])   # resnet18's row whole, mobilenet_v3_small's cut off
    with pytest.warns(UserWarning, match='its last line was cut off'):
        res = zoo_sweep('subset', 'resnet18,mobilenet_v3_small', **FAST, isolate=False, out=part, verbose=False)
    assert res.model.tolist() == ['resnet18', 'mobilenet_v3_small'] and len(pd.read_csv(part)) == 2


def test_a_csv_that_is_not_text_is_named_in_one_line(tmp_path):
    out = tmp_path/'bad.csv'
    out.write_bytes(b'garbage\x00\xff,,\n')
    with pytest.raises(SystemExit, match=r"^fastai-order-zoo: .*bad.csv is not a sweep CSV of this version \('utf-8' codec can't decode"):
        zoo_cli(source='subset', models='squeezenet1_1', out=out)
    assert out.read_bytes() == b'garbage\x00\xff,,\n'
