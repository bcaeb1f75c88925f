"`get_dls` on a small folder in Imagenette's layout (real JPEGs, WordNet-id class folders): by path, by name through fastai's data folder with the download step excluded, and the errors."
import numpy as np, pytest, torch
from PIL import Image
from fastai.data.external import fastai_cfg
import fastai_order.experiment.data as data
from fastai_order.experiment.data import get_dls, mnist_folder, DATASETS, data_recipe
from conftest import imagenette_like, WNIDS

@pytest.fixture
def fastai_home(tmp_path, monkeypatch):
    "fastai's home (data folder: `data/`) moved to `tmp_path`; fastai caches its config, hence the cache clears"
    monkeypatch.setenv('FASTAI_HOME', str(tmp_path))
    fastai_cfg.cache_clear()
    yield tmp_path
    fastai_cfg.cache_clear()


def test_a_folder_in_imagenettes_layout(tmp_path):
    dls = get_dls(imagenette_like(tmp_path/'imagenette2-160'), size=32, bs=4, num_workers=0)
    assert dls.vocab == WNIDS and (len(dls.train_ds), len(dls.valid_ds)) == (18, 6)
    x, y = dls.one_batch()
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert -3 < x.mean() < 3 and x.min() < 0   # ImageNet-normalized, not 0..1
    torch.testing.assert_close(dls.valid.one_batch()[0], dls.valid.one_batch()[0])   # deterministic validation


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
    (tmp_path/'train'/'a').mkdir(parents=True)
    with pytest.raises(ValueError, match=r"not in Imagenette's layout: it needs 'val/'"): get_dls(tmp_path)
    assert set(DATASETS) == {'imagenette-160', 'imagenette-320', 'imagenette', 'imagewoof-160', 'imagewoof-320', 'imagewoof'}


def test_mnist_is_written_once_in_imagenettes_layout(tmp_path):
    folder = mnist_folder(tmp_path/'mnist')
    assert sorted(p.name for p in folder.iterdir()) == ['train', 'val']
    counts = {s: [len(list((folder/s/str(d)).iterdir())) for d in range(10)] for s in ('train', 'val')}
    assert counts == {'train': [400] * 10, 'val': [100] * 10}
    img = Image.open(folder/'val'/'7'/'3900.png')
    assert img.size == (28, 28) and img.mode == 'L'
    stamp = (folder/'train'/'0'/'0000.png').stat().st_mtime_ns
    assert mnist_folder(tmp_path/'mnist') == folder and (folder/'train'/'0'/'0000.png').stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ['mnist']   # no temporary folder left behind


def test_digits_are_never_flipped_or_cropped():
    tfms = data_recipe('mnist', 28)
    names = [type(t).__name__ for t in tfms['item_tfms'] + tfms['batch_tfms']]
    assert 'FlipItem' not in names and 'RandomResizedCrop' not in names and 'Flip' not in names
    assert [type(t).__name__ for t in data_recipe('imagenette-160')['item_tfms']] == ['RandomResizedCrop', 'FlipItem']
