"A report that answers first, never shows an impossible interval and lets no library warning through."
import json, math, re, warnings
import numpy as np, pandas as pd, pytest
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from fastai_order.experiment.stats import order_stats, seeds_needed
from fastai_order.experiment.report import Comparison
from test_stats import runs, speed, BASE, POOL, ACT


def test_a_single_run_two_seeds_and_tied_seeds_are_said_in_words():
    one = Comparison(runs(1))
    assert one.stats.verdict.tolist()[1:] == ['no test with a single run (n=1 vs 1)']*2
    assert '(one run)' in one.table() and '±' not in one.table() and '(one run)' in one.whole_runs()
    assert 'one run per order' in ' '.join(one.headline())
    two = Comparison(runs(2), speed=speed())
    t = two.table()
    assert '2 seeds: too few for an interval' in t and '±' not in t and two.stats.acc_lo.isna().all()
    assert 'accuracy: 2 seeds, too few for a test' in two.stats.verdict[1]
    tied = Comparison(runs(3, accs={BASE: 0.979, ACT: 0.979, POOL: 0.977}, tie=True))
    rows = {r.split(' | ')[0][2:]: r for r in tied.table().splitlines()[2:]}
    assert '97.90 (the same in every seed) | the same in every seed |' in rows[ACT] and '0.00' not in rows[ACT].replace('97.90', '')
    assert '−0.20 in every seed' in rows[POOL] and 'less accurate (−0.20 points)' in rows[POOL]   # no spread at all: the same loss in every seed
    assert 'accuracy not distinguishable at n=3' in rows[ACT]
    assert 'the same difference' in Comparison(runs(2, tie=True)).headline()[1]


def test_intervals_stay_within_0_and_100_percent():
    st = order_stats(runs(3, accs={BASE: 0.999, ACT: 0.995, POOL: 0.999}, seed=3))
    assert (st.acc_hi <= 100).all() and (st.acc_lo >= 0).all()
    assert (st.acc[0] + st.d_acc_hi[1:] <= 100 + 1e-9).all()
    ax = Comparison(runs(3, accs={BASE: 0.999, ACT: 0.995, POOL: 0.999}, seed=3)).plot_accuracy()
    assert 0 <= ax.get_xlim()[0] and ax.get_xlim()[1] <= 100
    plt.close('all')


def test_seeds_needed_said_where_accuracy_is_not_distinguishable():
    c = Comparison(runs(3), speed=speed(), min_effect=0.5)
    s = c.stats.set_index('order')
    assert not (s.p_acc_holm < 0.05).any()
    pairs = c.runs.pivot(index='seed', columns='order', values='accuracy')*100
    sd = (pairs[ACT] - pairs[BASE]).std(ddof=1)
    assert s.seeds_min_effect[ACT] == seeds_needed(0.5, sd) and s.seeds_needed[ACT] == seeds_needed(s.d_acc[ACT], sd)
    acc = c.headline()[1]
    assert acc.startswith(f'No order is more or less accurate than {BASE} at n=3 (paired t, Holm-adjusted)')
    assert 'seeds would detect a 0.' in acc and 'a 0.5-point one (80 % power)' in acc


def test_the_report_answers_first_then_tables_notes_contexts_figures(tmp_path):
    c = Comparison(runs(3), speed=speed(), config=dict(data='mnist'))
    speed_s, acc_s, trade = c.headline()
    assert re.match(rf"Against {BASE} \(timed paired, step by step\), {POOL} is the fastest: its train step takes ×0\.8\d the time \(95 % CI ×0\.8\d–0\.\d\d\)", speed_s)
    assert re.search(r'and its inference takes ×0\.8\d the time', speed_s) and speed_s.endswith(f'; not distinguishable in speed: {ACT}.')
    assert trade.startswith(f'So {POOL} trains faster than {BASE}')
    md = c.markdown()
    assert md.startswith('# Order comparison\n\n' + speed_s) and md.index('| order | n |') < md.index('## Tests against') < md.index('## Where the times come from')
    assert md.index('## Tests against') < md.index('## Whole runs') < md.index('## Where the times come from')
    assert '| conv-pool-bn-act | 3 | 7' in c.whole_runs() and 'p (Holm)' in md and '![curves](curves.png)' in md and '![speed](speed.png)' in md
    assert set(c.verdicts()) == {BASE, ACT, POOL} and c.verdicts()[BASE] == 'baseline'
    old = Comparison(runs(3, hist=False))
    assert 'whole runs' in old.headline()[0] and 'whole runs' in old.notes()[0] and 'no per-epoch history' in old.notes()[-1]
    assert 'curves' not in old.figures() and 'whole runs' in old.table().splitlines()[0]


def test_the_summary_for_wandb_is_flat_numbers_and_words():
    c = Comparison(runs(3), speed=speed())
    s = c.summary()
    assert s['answer'] == ' '.join(c.headline()) and s['baseline'] == BASE and s[f'{POOL}/verdict'] == c.verdicts()[POOL]
    assert s[f'{POOL}/train_x'] == pytest.approx(c.stats.train_x[2]) and f'{POOL}/p_acc_holm' in s
    assert all(isinstance(v, str) or (isinstance(v, (int, float)) and math.isfinite(v)) for v in s.values())
    json.dumps(s)


@pytest.mark.parametrize('n, paired, hist, tie', [(1, True, True, False), (2, False, False, True), (3, True, True, False), (3, False, True, False)])
def test_no_library_warning_reaches_the_user_and_every_figure_is_saved(tmp_path, n, paired, hist, tie):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        c = Comparison(runs(n, hist=hist, tie=tie), speed=speed() if paired else None)
        c.markdown(); c.summary(); c.save(tmp_path)
    names = {'speed', 'accuracy', 'seeds', 'phases', 'tradeoff', *(['curves'] if hist else [])}
    assert {p.stem for p in tmp_path.glob('*.png')} == names and all((tmp_path/f'{n}.png').stat().st_size > 1000 for n in names)
    assert not list(tmp_path.glob('*.tmp*'))


def test_log_axes_read_as_plain_numbers_and_the_phases_legend_leaves_the_title_alone():
    for c in (Comparison(runs(3), speed=speed()), Comparison(runs(3))):
        for ax in (c.plot_tradeoff(), c.plot_speed()):
            ax.figure.canvas.draw()
            labels = [t.get_text() for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True) if t.get_text()]
            assert len(labels) >= 2 and not any('10^' in l or '×10' in l or '\\times' in l for l in labels), labels
            assert all(float(l.replace('−', '-')) > 0 for l in labels)
    ax = Comparison(runs(3)).plot_phases()
    fig = ax.figure; fig.canvas.draw()
    r = fig.canvas.get_renderer()
    assert not ax.get_legend().get_window_extent(r).overlaps(ax.title.get_window_extent(r))
    plt.close('all')


def test_the_report_warns_about_mixed_contexts_a_busy_machine_and_partial_orders():
    r = runs(4)
    r.loc[r.seed == 3, 'threads'] = 1
    r.loc[0, 'other_load'] = 0.6
    r['layer_orders'] = json.dumps({BASE: 1, 'conv-bn-act': 10})
    notes = Comparison(r).notes()
    assert notes[0].startswith('Speed here comes from whole runs')
    assert notes[1].startswith('⚠ The runs come from different contexts') and 'threads: 2 (9 runs), 1 (3 runs)' in notes[1]
    assert notes[2].startswith(f"⚠ Other processes kept 60–60 % of the machine's cores busy during 1 of 12 runs ({BASE} seed 0)")
    assert any(n.startswith(f'{BASE} is realised in 1 conv layer (the stem)') for n in notes)
    assert '## Where the times come from' in Comparison(r).markdown()
