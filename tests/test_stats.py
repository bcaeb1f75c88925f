"Statistics against known values, scipy and statsmodels; order_stats pairs accuracy by seed, times paired step ratios and adjusts by Holm."
import json, math, re
import numpy as np, pandas as pd, pytest, scipy.stats
from statsmodels.stats.power import TTestPower, TTestIndPower
from fastai_order.experiment.stats import (mean_ci, gmean_ci, welch, welch_ratio, paired_t, prob_improvement, holm, seeds_needed, ratio_test,
                                           order_stats, SEEDS_CAP)
from fastai_order.timing.paired import ratio_interval
from fastai_order.timing.batch_timer import PHASES

BASE, POOL, ACT = 'conv-bn-act-pool', 'conv-pool-bn-act', 'conv-act-bn-pool'


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


def test_paired_t_matches_scipy_and_says_what_ties_mean():
    a, b = [97.9, 98.1, 97.7, 98.0], [97.8, 97.9, 97.6, 97.7]
    d, h, p = paired_t(a, b)
    r = scipy.stats.ttest_rel(a, b)
    lo, hi = r.confidence_interval(0.95)
    assert (d, d - h, d + h, p) == pytest.approx((0.175, lo, hi, r.pvalue))
    assert paired_t([98.0, 97.0], [98.0, 97.0])[1:] == (0.0, 1.0)      # tied in every seed: nothing to detect
    assert paired_t([98.5, 97.5], [98.0, 97.0])[1:] == (0.0, 0.0)      # the same difference in every seed
    assert np.isnan(paired_t([98.0], [97.0])[2])


def test_probability_of_improvement_is_mann_whitney_u_over_nm():
    assert prob_improvement([1, 2, 3], [2, 2]) == pytest.approx((0 + 0.5*2 + 2) / 6)
    x, y = [0.91, 0.93, 0.92, 0.95], [0.90, 0.93, 0.94]
    assert prob_improvement(x, y) == pytest.approx(scipy.stats.mannwhitneyu(x, y).statistic / 12)
    assert prob_improvement([1], [0]) == 1 and prob_improvement([0], [0]) == 0.5


def test_holm_on_the_textbook_example_and_nan():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([np.nan, 0.01, 0.04, 0.03])
    assert np.isnan(out[0]) and out[1:] == pytest.approx([0.03, 0.06, 0.06])
    assert np.isnan(holm([np.nan])).all()


def test_seeds_needed_is_statsmodels_power_rounded_up():
    assert seeds_needed(0.5, 1, paired=False) == 64       # Cohen's table: d = 0.5, two-sided α = 0.05, 80 % power
    assert seeds_needed(0.5, 1) == math.ceil(TTestPower().solve_power(0.5, alpha=0.05, power=0.8)) == 34
    assert seeds_needed(-0.3, 0.2, paired=False) == math.ceil(TTestIndPower().solve_power(1.5, alpha=0.05, power=0.8))
    assert seeds_needed(30, 1) == 2                        # a huge effect: the fewest a test takes
    assert seeds_needed(0.01, 1) == math.inf and seeds_needed(0, 1) == math.inf   # beyond the cap, or nothing to detect
    assert math.isnan(seeds_needed(0.5, 0)) and math.isnan(seeds_needed(0.5, np.nan))
    assert seeds_needed(1, 1, cap=5) == math.inf and SEEDS_CAP == 1000


def test_ratio_test_is_ratio_interval_and_a_t_test_on_logs():
    r = [0.86, 0.90, 0.88, 0.91, 0.87]
    g, lo, hi, p = ratio_test(r)
    assert (g, lo, hi) == pytest.approx(ratio_interval(r)) and p == pytest.approx(scipy.stats.ttest_1samp(np.log(r), 0).pvalue)
    assert ratio_test([0.9])[0] == pytest.approx(0.9) and np.isnan(ratio_test([0.9])[3])
    assert ratio_test([1.0, 1.0, 1.0])[3] == 1.0


def runs(n=3, accs=None, hist=True, tie=False, seed=0, **ctx):
    "A runs table: every seed shifts every order alike (the same start), conv-pool-bn-act's whole runs are 12 % shorter"
    rng, rows = np.random.default_rng(seed), []
    accs = accs or {BASE: 0.979, ACT: 0.980, POOL: 0.977}
    for s in range(n):
        start = 0 if tie else rng.normal(0, 0.004)
        for o, a in accs.items():
            acc = a if tie else min(1.0, round(a + start + rng.normal(0, 0.0012), 4))
            h = [dict(epoch=e, train_loss=1/(e + 1), valid_loss=0.5/(e + 1), accuracy=acc - 0.05/(e + 1)) for e in range(3)]
            t = 0.88 if o == POOL else 1.0
            rows.append(dict(order=o, seed=s, accuracy=acc, valid_loss=.07, train_loss=.05, train_ms=90*t*(1 + rng.normal(0, .05)),
                             valid_ms=30*t*(1 + rng.normal(0, .05)), **{f'train_{p}_ms': 15.*t for p in PHASES}, layer_orders=json.dumps({o: 3}),
                             device='cpu', cpu='x', cores=2, threads=2, python='3.11', torch_version='2', fastai_version='2.8', cuda_version='none',
                             clock='host', other_load=0.0, **({'history': json.dumps(h)} if hist else {})))
    return pd.DataFrame(rows).assign(**ctx)


def speed(reps=7, seed=0):
    "Paired step times: the machine drifts by ±10 % between repeats, conv-pool-bn-act takes ×0.88 (train) and ×0.85 (inference)"
    rng = np.random.default_rng(seed)
    return pd.DataFrame([dict(step=step, repeat=r, **{o: 0.05*drift*f*(1 + rng.normal(0, .02)) for o, f in ((BASE, 1), (ACT, 1), (POOL, x))})
                         for step, x in (('train', .88), ('valid', .85)) for r, drift in enumerate(1 + 0.1*rng.standard_normal(reps))])


def test_accuracy_is_paired_by_seed_and_the_pairing_pays():
    r = runs(5, accs={BASE: 0.970, ACT: 0.975, POOL: 0.970})
    st = order_stats(r, speed=speed())
    assert st.acc_test.tolist() == ['', 'paired t', 'paired t'] and st.acc_n.tolist() == [5, 5, 5]
    a, b = (100*r.accuracy[r.order == o].to_numpy() for o in (ACT, BASE))
    d, h, p = paired_t(a, b)
    assert (st.d_acc[1], st.d_acc_lo[1], st.d_acc_hi[1], st.p_acc[1]) == pytest.approx((d, d - h, d + h, p))
    assert p < welch(a, b)[2]   # the seeds' shared start, taken out
    assert st.p_improve[1] == pytest.approx(prob_improvement(a, b))
    assert st.p_acc_holm[1:].tolist() == pytest.approx(holm(st.p_acc[1:]).tolist())
    assert 'more accurate (+0.' in st.verdict[1]
    no_shared = r.assign(seed=np.where(r.order == BASE, r.seed + 10, r.seed))   # no seed in common: Welch
    st = order_stats(no_shared)
    assert st.acc_test[1] == 'Welch' and st.p_acc[1] == pytest.approx(welch(a, b)[2])


def test_speed_comes_from_paired_ratios_holm_adjusted_over_train_and_inference():
    sp = speed()
    st = order_stats(runs(), speed=sp)
    t = sp[sp.step == 'train']
    g, lo, hi, p = ratio_test(t[POOL] / t[BASE])
    assert (st.train_x[2], st.train_lo[2], st.train_hi[2], st.p_train[2]) == pytest.approx((g, lo, hi, p))
    assert st.speed_from.tolist() == ['paired steps']*3 and st.train_n[2] == 7 and st.infer_x[2] == pytest.approx(0.85, abs=0.02)
    assert np.r_[st.p_train_holm[1:], st.p_infer_holm[1:]] == pytest.approx(holm(np.r_[st.p_train[1:], st.p_infer[1:]]))
    assert re.match(r'train step faster \(×0\.8\d\), inference faster \(×0\.8\d\)', st.verdict[2]), st.verdict[2]
    assert st.verdict[1].startswith('train step not distinguishable, inference not distinguishable')
    old = order_stats(runs())   # an older folder: whole runs, Welch on logs
    w = runs()
    assert old.speed_from.tolist() == ['whole runs']*3
    assert old.train_x[2] == pytest.approx(welch_ratio(w.train_ms[w.order == POOL], w.train_ms[w.order == BASE])[0])
