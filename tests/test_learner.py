"Ordered models train in a fastai Learner and survive export / load_learner."
import pytest, torch
from fastai.learner import Learner, load_learner
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter, IndexSplitter
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai_order.model.layers import ordered_xresnet, ordered_cnn


def dls(shape, n=32, c=3):
    torch.manual_seed(0)
    x, y = torch.randn(n, *shape), torch.randint(0, c, (n,))
    dsets = Datasets(list(zip(x, y)), tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=IndexSplitter(range(8))(range(n)))
    return dsets.dataloaders(bs=8)


@pytest.mark.parametrize('make,shape', [
    (lambda: ordered_xresnet('xresnet18', 'pool_before_act', n_out=3), (3, 32, 32)),
    (lambda: ordered_xresnet('xresnet18', 'preact', n_out=3), (3, 32, 32)),
    (lambda: ordered_cnn(c_in=1, n_out=3, widths=(16, 16), ks=5, ndim=1, order='keras_question', p=0.2), (1, 40)),
])
def test_train_export_load(make, shape, tmp_path):
    learn = Learner(dls(shape), make(), CrossEntropyLossFlat(), metrics=accuracy, path=tmp_path)
    w0 = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, 1e-2)
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(w0, learn.model.parameters()))   # fit may have moved it to a GPU
    learn.export('ordered.pkl')
    back = load_learner(tmp_path/'ordered.pkl')   # on the CPU
    x = torch.randn(4, *shape)
    learn.model.cpu().eval(); back.model.eval()
    assert torch.equal(learn.model(x), back.model(x))
    assert type(back.model[0]).__name__ == type(learn.model[0]).__name__
