"Statistics against known values and scipy, and a report that never shows an impossible interval."
import json
import numpy as np, pandas as pd, pytest, scipy.stats
from fastai_order.experiment.report import mean_ci, gmean_ci, welch, welch_ratio, order_stats, Comparison
from fastai_order.timing.batch_timer import PHASES


def test_student_t_interval_on_known_data():
    m, h = mean_ci([1, 2, 3, 4, 5])
    assert m == 3 and h == pytest.approx(1.9632, abs=1e-4)   # t(0.975, 4) = 2.7764, s = √2.5
    assert mean_ci([2.0, 4.0])[1] == pytest.approx(12.7062 * np.sqrt(2) / np.sqrt(2), rel=1e-4)   # t(0.975, 1)
    assert np.isnan(mean_ci([1.0])[1])


def test_geometric_interval_is_positive_and_multiplicative():
    g, f = gmean_ci([50, 60, 1500])
    assert g == pytest.approx((50 * 60 * 1500) ** (1/3)) and g / f > 0
    s = np.std(np.log([50, 60, 1500]), ddof=1)
    assert f == pytest.approx(np.exp(scipy.stats.t.ppf(0.975, 2) * s / np.sqrt(3)))


def test_welch_matches_scipy():
    a, b = [0.90, 0.91, 0.93, 0.92], [0.95, 0.96, 0.94, 0.97, 0.95]
    d, h, p = welch(a, b)
    r = scipy.stats.ttest_ind(a, b, equal_var=False)
    lo, hi = r.confidence_interval(0.95)
    assert (d, h, p) == pytest.approx(((lo + hi)/2, (hi - lo)/2, r.pvalue))
    ratio, lo, hi, p = welch_ratio([110, 121, 99], [100, 110, 90])
    assert ratio == pytest.approx(1.1) and lo < 1.1 < hi


def _runs(**ctx):
    rows = [dict(order=o, seed=s, accuracy=a + 0.001*s, train_ms=ms + s) for o, a, ms in (('a', .90, 100.), ('b', .95, 130.)) for s in range(4)]
    rows.append(dict(order='c', seed=0, accuracy=0.9, train_ms=100.))
    base = dict(device='cpu', cpu='x', cores=2, threads=2, python='3.11', torch_version='2', fastai_version='2.8', cuda_version='none',
                clock='host', other_load=0.0, layer_orders='{}', **{f'train_{p}_ms': 1. for p in PHASES})
    return pd.DataFrame(rows).assign(**{**base, **ctx})


def test_order_stats_std_interval_and_verdicts():
    runs = _runs()
    st = order_stats(runs)
    a = runs.accuracy[runs.order == 'b']
    assert st.acc_std[1] == pytest.approx(a.std(ddof=1)) and st.acc_ci[1] == pytest.approx(mean_ci(a)[1])
    assert st.verdict[1].startswith('slower: ×1.30 the time') and 'more accurate by 5.0 ± ' in st.verdict[1]
    assert st.verdict[2] == 'no test with a single run (n=1 vs 4)' and st.n.tolist() == [4, 4, 1]


def test_the_report_says_one_run_and_never_shows_a_negative_interval():
    runs = _runs()
    runs.loc[0, 'train_ms'] = 1500.   # one run on a busy machine
    c = Comparison(runs)
    last = c.table().splitlines()[-1]
    assert '(one run)' in last and '±' not in last
    lo = (c.stats.ms_gmean / c.stats.ms_factor).dropna()
    assert len(lo) == 2 and (lo > 0).all()
    ax = c.plot_tradeoff()
    assert ax.get_xscale() == 'log'
    ax = c.plot_accuracy()
    left, right = ax.get_xlim()
    s = c.stats.dropna(subset=['acc_ci'])
    assert left <= 100*(s.acc_mean - s.acc_ci).min() and right >= 100*(s.acc_mean + s.acc_ci).max()


def test_the_report_warns_about_mixed_contexts_a_busy_machine_and_partial_orders():
    runs = _runs()
    runs.loc[runs.seed == 3, 'threads'] = 1
    runs.loc[0, 'other_load'] = 0.6
    runs['layer_orders'] = json.dumps({'a': 1, 'conv-bn-act': 10})
    notes = Comparison(runs).notes()
    assert notes[0].startswith('⚠ The runs come from different contexts') and 'threads: 2 (7 runs), 1 (2 runs)' in notes[0]
    assert notes[1].startswith("⚠ Other processes kept 60–60 % of the machine's cores busy during 1 of 9 runs (a seed 0)")
    assert any(n.startswith('a is realised in 1 conv layer (the stem)') for n in notes)
    assert '## Where the times come from' in Comparison(runs).markdown()
