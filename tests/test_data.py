"`get_dls` on small folders in Imagenette's layout (real JPEGs, WordNet-id class folders) and in fastai's (PNGs, some not RGB), by path and by name through fastai's data folder with the download step excluded; the recipes; `check_images`; MNIST's digits as tensors; and the errors."
import numpy as np, pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from PIL import Image
from fastai.data.external import fastai_cfg
import fastai_order.experiment.data as data
from fastai_order.experiment.data import (get_dls, mnist_folder, mnist_tensors, DATASETS, RECIPES, MNIST_STATS, data_recipe, data_folder,
                                          check_data, check_recipe, check_images, TensorImages)
from conftest import imagenette_like, WNIDS

@pytest.fixture
def fastai_home(tmp_path, monkeypatch):
    "fastai's home (data folder: `data/`) moved to `tmp_path`; fastai caches its config, hence the cache clears"
    monkeypatch.setenv('FASTAI_HOME', str(tmp_path))
    fastai_cfg.cache_clear()
    yield tmp_path
    fastai_cfg.cache_clear()


def fastai_like(root, n_train=3, n_valid=2):
    "A small folder in fastai's layout: train/ and valid/, classes 'cat' and 'dog', PNGs; one grayscale and one palette image"
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('valid', n_valid)):
        for c, name in enumerate(('cat', 'dog')):
            (root/split/name).mkdir(parents=True)
            for i in range(n): Image.fromarray((rng.random((30, 40, 3)) * 60 + 100 * c).astype(np.uint8)).save(root/split/name/f'{i}.png')
    Image.fromarray(rng.integers(0, 255, (36, 36), dtype=np.uint8), mode='L').save(root/'train'/'cat'/'grey.png')
    Image.new('P', (20, 30)).save(root/'valid'/'dog'/'palette.png')
    return root


def one_line_error(f, match):
    with pytest.raises(ValueError, match=match) as e: f()
    assert '\n' not in str(e.value)
    return str(e.value)


def test_a_folder_in_imagenettes_layout(tmp_path):
    dls = get_dls(imagenette_like(tmp_path/'imagenette2-160'), size=32, bs=4, num_workers=0)
    assert dls.vocab == WNIDS and (len(dls.train_ds), len(dls.valid_ds)) == (18, 6)
    x, y = dls.one_batch()
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert -3 < x.mean() < 3 and x.min() < 0   # ImageNet-normalized, not 0..1
    torch.testing.assert_close(dls.valid.one_batch()[0], dls.valid.one_batch()[0])   # deterministic validation


def test_a_folder_in_fastais_layout_with_images_not_in_rgb(tmp_path):
    folder = fastai_like(tmp_path/'pets')
    assert check_data(folder) == str(folder.resolve())
    dls = get_dls(folder, size=24, bs=4, num_workers=0)
    assert dls.vocab == ['cat', 'dog'] and (len(dls.train_ds), len(dls.valid_ds)) == (7, 5)
    assert all(p.parent.parent.name == 'valid' for p in dls.valid_ds.items)
    assert dls.one_batch()[0].shape == (4, 3, 24, 24)
    assert dls.valid.one_batch()[0].shape == (4, 3, 24, 24) and len(list(dls.valid)) == 2   # the palette image too


def test_a_dataset_name_reads_fastais_data_folder(fastai_home):
    tmp_path = fastai_home
    imagenette_like(tmp_path/'data'/'imagenette2-160')   # what untar_data extracts: no download happens
    dls = get_dls('imagenette-160', size=24, bs=6, num_workers=0)
    assert dls.path == tmp_path/'data'/'imagenette2-160' and dls.vocab == WNIDS
    assert dls.one_batch()[0].shape == (6, 3, 24, 24)


def test_a_failed_download_names_the_url_and_the_way_out(fastai_home, monkeypatch):
    tmp_path = fastai_home
    def offline(url, *args, **kwargs): raise ConnectionError('network unreachable')
    monkeypatch.setattr(data, 'untar_data', offline)
    with pytest.raises(RuntimeError, match=r"Could not download 'imagewoof-320' from https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-320.tgz "
                                           r"\(ConnectionError: network unreachable\).*get_dls\('/path/to/imagewoof2-320'\)") as e:
        get_dls('imagewoof-320')
    assert str(tmp_path/'data'/'imagewoof2-320') in str(e.value)


def test_bad_data_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown data 'imagenet': did you mean 'imagenette'\? not a folder, nor one of mnist, imagenette-160"): get_dls('imagenet')
    needs = r"is in neither fastai's nor Imagenette's layout: it needs 'train/' and 'valid/' or 'val/', each with one folder per class"
    (tmp_path/'train'/'a').mkdir(parents=True)
    one_line_error(lambda: get_dls(tmp_path), needs + r" \('valid/' or 'val/' missing\)")
    (tmp_path/'valid').mkdir()   # no class folder in it: still missing
    one_line_error(lambda: check_data(tmp_path), needs + r" \('valid/' or 'val/' missing\)")
    one_line_error(lambda: check_data(tmp_path/'train'), needs + r" \('train/' and 'valid/' or 'val/' missing\)")
    (tmp_path/'valid'/'a').mkdir(); (tmp_path/'val'/'a').mkdir(parents=True)
    one_line_error(lambda: check_data(tmp_path), r"has both 'valid/' and 'val/'")
    assert set(DATASETS) == {'imagenette-160', 'imagenette-320', 'imagenette', 'imagewoof-160', 'imagewoof-320', 'imagewoof'}


def test_mnist_is_written_once_in_imagenettes_layout(tmp_path):
    folder = mnist_folder(tmp_path/'mnist')
    assert sorted(p.name for p in folder.iterdir()) == ['train', 'val']
    counts = {s: [len(list((folder/s/str(d)).iterdir())) for d in range(10)] for s in ('train', 'val')}
    assert counts == {'train': [400] * 10, 'val': [100] * 10}
    img = Image.open(folder/'val'/'7'/'3900.png')
    assert img.size == (28, 28) and img.mode == 'L'
    assert (np.array(img) == mnist_tensors()[0][3900, 0].numpy()).all()   # the same digits as in memory
    stamp = (folder/'train'/'0'/'0000.png').stat().st_mtime_ns
    assert mnist_folder(tmp_path/'mnist') == folder and (folder/'train'/'0'/'0000.png').stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ['mnist']   # no temporary folder left behind


def test_digits_are_never_flipped_or_cropped():
    tfms = data_recipe('mnist', 28)
    names = [type(t).__name__ for t in tfms['item_tfms'] + tfms['batch_tfms']]
    assert 'FlipItem' not in names and 'RandomResizedCrop' not in names and 'Flip' not in names
    assert [type(t).__name__ for t in data_recipe('imagenette-160')['item_tfms']] == ['RandomResizedCrop', 'FlipItem']


def test_a_recipe_is_named(tmp_path):
    assert list(RECIPES) == ['photo', 'digits']
    assert [check_recipe(None, 'mnist'), check_recipe(None, 'imagenette'), check_recipe(None), check_recipe('digits', 'imagenette')] == ['digits', 'photo', None, 'digits']
    assert [type(t).__name__ for t in data_recipe('mnist', 28, recipe='photo')['item_tfms']] == ['RandomResizedCrop', 'FlipItem']
    assert [type(t).__name__ for t in data_recipe('imagenette-160', recipe='digits')['item_tfms']] == ['Resize']
    for f in (lambda: check_recipe('fotos'), lambda: data_recipe('mnist', recipe='fotos'), lambda: get_dls('mnist', recipe='fotos')):
        one_line_error(f, r"Unknown recipe 'fotos': did you mean 'photo'\? allowed: photo, digits")
    folder = fastai_like(tmp_path/'pets')
    dls = get_dls(folder, size=20, bs=4, num_workers=0, recipe='digits')   # digits' recipe on a folder: resized, MNIST's statistics
    norm = dls.after_batch.fs[-1]
    assert torch.allclose(norm.mean.flatten().cpu(), torch.tensor(MNIST_STATS[0])) and dls.valid.one_batch()[0].shape == (4, 3, 20, 20)


def test_photos_of_digits_read_their_folder(tmp_path, monkeypatch):
    assert data_folder('mnist') is None   # in memory: nothing is written
    digits = imagenette_like(tmp_path/'digits')
    monkeypatch.setattr(data, 'mnist_folder', lambda: digits)
    assert data_folder('mnist', recipe='photo') == tmp_path/'digits'
    dls = get_dls('mnist', size=24, bs=4, num_workers=0, recipe='photo')
    assert dls.vocab == WNIDS and type(dls.after_batch.fs[-1]).__name__ == 'Normalize'


def test_bad_images_are_named_before_anything_trains(tmp_path):
    folder = fastai_like(tmp_path/'pets')
    assert check_images(folder) == 12 and check_images('mnist') == 0
    (folder/'train'/'dog'/'0.png').write_bytes((folder/'train'/'dog'/'0.png').read_bytes()[:200])   # truncated
    (folder/'valid'/'cat'/'notes.jpg').write_bytes(b'not an image at all' * 10)   # an image's extension, not an image
    msg = one_line_error(lambda: check_images(folder), "Image file '.*train/dog/0.png' cannot be read")
    assert "1 other image file under" in msg and msg.endswith('delete or replace them before training')
    msg = one_line_error(lambda: check_images(folder, n_workers=2), "Image file '.*train/dog/0.png' cannot be read")   # in worker processes
    (folder/'train'/'dog'/'0.png').unlink()
    one_line_error(lambda: check_images(folder), r"Image file '.*valid/cat/notes.jpg' cannot be read \(UnidentifiedImageError: .*\): delete or replace it before training")
    one_line_error(lambda: check_images(tmp_path/'nowhere'), "Cannot check the images of '.*nowhere': not a folder")


@pytest.mark.parametrize('size', [28, 40])
def test_mnist_digits_are_tensors_in_memory(size):
    dls = get_dls('mnist', size=size, bs=50, num_workers=4)
    assert (len(dls.train_ds), len(dls.valid_ds), dls.c, list(dls.vocab)) == (4000, 1000, 10, [str(d) for d in range(10)])
    assert isinstance(dls.train_ds, TensorImages) and dls.train.fake_l.num_workers == 0   # no workers, whatever was asked
    assert (dls.train.shuffle, dls.train.drop_last, dls.valid.shuffle, dls.valid.drop_last) == (True, True, False, False)
    assert (len(dls.train), len(dls.valid), dls.device.type) == (80, 20, 'cpu')
    assert torch.bincount(dls.valid_ds.y).tolist() == [100] * 10   # the last 100 of each digit validate
    x, y = dls.valid.one_batch()
    assert x.shape == (50, 3, size, size) and x.dtype == torch.float32 and y.shape == (50,) and y.dtype == torch.int64
    lo, hi = (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081   # black and white, normalized with MNIST's statistics
    assert abs(x.min().item() - lo) < 1e-4 and hi - 0.1 < x.max().item() <= hi + 1e-4
    assert (x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all()
    torch.testing.assert_close(dls.valid.one_batch()[0], x)   # deterministic validation
    xt = dls.train.one_batch()[0]
    assert xt.shape == (50, 3, size, size) and not torch.equal(xt, dls.valid.one_batch()[0])
    img, label = dls.valid.decode_batch((x, y), max_n=2)[0]
    assert img.shape == (3, size, size) and label == str(y[0].item())


def test_a_learner_trains_on_digits_in_memory():
    set_seed(0)
    dls = get_dls('mnist', size=28, bs=500)
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 10)), metrics=accuracy)
    assert isinstance(learn.loss_func, CrossEntropyLossFlat)   # inferred, as from a folder's labels
    with learn.no_logging(): learn.fit(1, 1e-2)
    assert learn.recorder.values[-1][2] > 0.5   # it learns (chance: 0.1)
    preds, targs, decoded = learn.get_preds(with_decoded=True)
    assert preds.shape == (1000, 10) and (targs == dls.valid_ds.y).all() and decoded.shape == (1000,)
