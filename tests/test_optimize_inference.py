"After optimize_order(mode='eval') the model is for inference only: training it refuses in one line; 'train' models train as before."
import copy, io
import pytest, torch, torch.nn as nn
from fastai.learner import Learner, load_learner
from fastai_order.model.layers import ordered_cnn
from fastai_order.rewrite.inference import InferenceOnly, inference_only, allow_training
from fastai_order.rewrite.optimize import optimize_order
from fastai_order.rewrite.swap import swap_order
from fastai_order.tools.synthetic import synthetic_dls

LEARNER_LINE = ("learn.optimize_order('eval') rewrote learn.model in place for inference only (2 BatchNorms folded into their convs, "
                "2 Dropouts removed). To train, rebuild the learner and learn.load a checkpoint saved before the rewrite "
                "(learn.optimize_order('train') keeps a model trainable); allow_training(learn.model) trains this one as it is.")

def _cnn(): torch.manual_seed(0); return ordered_cnn(3, 4, (8, 16), order='conv-bn-act-pool-drop', p=0.2)
def _learner(model, path=None): return Learner(synthetic_dls(n=32, bs=16), model, loss_func=nn.CrossEntropyLoss(), path=path or '.')
def _weights(model): return [p.detach().clone() for p in model.parameters()]
def _same(a, b): return all(torch.equal(x, y) for x, y in zip(a, b))
def _refuses(model, x, contains=''):
    model.train()
    with pytest.raises(RuntimeError, match='for inference only') as e: model(x).sum().backward()
    assert contains in str(e.value) and '\n' not in str(e.value)


def test_learner_fit_after_eval_refuses_saying_what_was_folded_and_how_to_train():
    learn = _learner(_cnn())
    learn.optimize_order('eval', reps=0)
    w = _weights(learn.model)
    with pytest.raises(RuntimeError) as e: learn.fit(1)
    assert str(e.value) == LEARNER_LINE
    assert _same(w, learn.model.parameters())   # refused before any step
    learn.validate(); learn.get_preds()          # evaluation runs


def test_train_forward_refuses_while_evaluation_and_no_grad_run():
    model, x = _cnn().eval(), torch.randn(4, 3, 16, 16)
    with torch.no_grad(): y = model(x)
    new = optimize_order(model, 'eval', reps=0).model
    assert inference_only(model) is None          # the original is left as it was, and trains
    _refuses(new, x, "optimize_order(mode='eval') made this copy for inference only (2 BatchNorms folded into their convs, 2 Dropouts removed). "
                     "To train, use the model it was given, left as it was")
    with torch.no_grad(): new.train()(x)          # a train-mode forward without gradients runs
    with torch.inference_mode(): new(x)
    new.eval()
    torch.testing.assert_close(new(x), y, rtol=1e-4, atol=1e-5)   # with gradients on too, in evaluation
    optimize_order(model, 'eval', reps=0, inplace=True)
    _refuses(model, x, "optimize_order(mode='eval', inplace=True) rewrote this model in place for inference only (2 BatchNorms")


def test_the_mark_survives_deepcopy_torch_save_and_export(tmp_path):
    learn = _learner(_cnn(), tmp_path)
    learn.fit(1)
    learn.optimize_order('eval', reps=0)
    x = torch.randn(2, 3, 16, 16)
    buf = io.BytesIO(); torch.save(learn.model, buf); buf.seek(0)
    for m in (copy.deepcopy(learn.model), torch.load(buf, weights_only=False)):
        assert inference_only(m).message == LEARNER_LINE
        _refuses(m, x)
    learn.export('eval.pkl')
    back = load_learner(tmp_path/'eval.pkl')
    items = list(learn.dls.valid_ds.items)
    with torch.no_grad(): ref = learn.model.eval()(torch.stack([i[0] for i in items]))
    torch.testing.assert_close(back.get_preds(dl=back.dls.test_dl(items))[0], ref, rtol=1e-4, atol=1e-5)
    back.predict(items[0]); back.validate(dl=back.dls.test_dl(items, with_labels=True))
    back.dls = learn.dls
    with pytest.raises(RuntimeError) as e: back.fit(1)
    assert str(e.value) == LEARNER_LINE


def test_train_mode_models_carry_no_mark_and_train():
    learn = _learner(_cnn())
    learn.optimize_order('train', reps=0)
    assert inference_only(learn.model) is None and learn.model[0].order is not None
    w = _weights(learn.model)
    learn.fit(1)
    assert not _same(w, learn.model.parameters())
    assert inference_only(optimize_order(_cnn(), 'train', reps=0).model) is None


def test_only_what_holds_in_evaluation_only_marks():
    torch.manual_seed(0)
    exact_in_training = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))   # relu ↔ maxpool: exact in training too
    r = optimize_order(exact_in_training, 'eval', reps=0)
    assert len(r.rows) == 1 and inference_only(r.model) is None
    r.model.train()(torch.randn(2, 3, 16, 16)).sum().backward()
    bn_after = ordered_cnn(3, 4, (8,), order='conv-act-bn-pool').eval()   # no fold, but BN ↔ max pool holds in evaluation only
    r = optimize_order(bn_after, 'eval', reps=0)
    assert r.rows[0]['after'].index('maxpool') < r.rows[0]['after'].index('bn')
    assert repr(inference_only(r.model)) == 'InferenceOnly(1 group reordered by rules exact in evaluation only)'


def test_optimizing_or_swapping_an_inference_only_model_again():
    x = torch.randn(2, 3, 16, 16)
    first = optimize_order(_cnn().eval(), 'eval', reps=0).model
    mark = inference_only(first)
    again = optimize_order(first, 'eval', reps=0)
    assert again.rows == [] and (inference_only(again.model).folded, inference_only(again.model).dropouts) == (2, 2)   # counted once
    assert len(again.model._forward_pre_hooks) == 1 and inference_only(again.model) is not mark   # the copy's own
    with pytest.raises(ValueError, match=r"optimize_order refused \(inference only\): mode='train' cannot make this model trainable again: "
                                         r"optimize_order\(mode='eval'\) made this copy"):
        optimize_order(first, 'train', reps=0, inplace=True)
    wrapped = nn.Sequential(first, nn.Flatten())   # inside a larger model, the mark is found and keeps firing
    with pytest.raises(ValueError, match='inference only'): optimize_order(wrapped, 'train', reps=0)
    assert inference_only(optimize_order(wrapped, 'eval', reps=0).model) is not None
    swap_order(first, 'conv-act-bn')
    assert inference_only(first) is mark
    _refuses(first, x)
    allow_training(first)                          # on purpose: the folded model trains as it is
    assert inference_only(first) is None
    first.train()(x).sum().backward()
    assert inference_only(optimize_order(first, 'train', reps=0).model) is None
