"Shared test helpers: a small Imagenette-shaped folder, and the warnings filter."
import numpy as np, pytest, torch
from PIL import Image

cuda = pytest.mark.cuda   # tests that need a CUDA GPU; skipped where there is none

WNIDS = ['n01440764', 'n02102040', 'n02979186']   # tench, English springer, cassette player


def imagenette_like(root, n_train=6, n_val=2):
    "A small Imagenette-shaped folder: train/ and val/, a folder per WordNet id, JPEGs of varied sizes"
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for c, wnid in enumerate(WNIDS):
            (root/split/wnid).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 90, size=2)
                img = (rng.random((h, w, 3)) * 60 + 60 * c).astype(np.uint8)   # each class its own brightness
                Image.fromarray(img).save(root/split/wnid/f'{wnid}_{i}.JPEG', quality=90)
    return root



@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    "A tiny Imagenette-shaped folder, 3 classes × (8 train, 4 val) images, shared by the tests that train"
    return imagenette_like(tmp_path_factory.mktemp('data')/'tiny', n_train=8, n_val=4)


def pytest_configure(config):
    "Register the `cuda` marker; silence third-party deprecation noise that says nothing about this package"
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU (skipped without one)')
    for f in ["ignore:`torch.jit.script` is deprecated:FutureWarning",
              "ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning",
              "ignore:load_learner` uses Python's insecure pickle:UserWarning",
              "ignore:The 'mode.chained_assignment' option is deprecated",
              "ignore:numpy.core is deprecated:DeprecationWarning"]:
        config.addinivalue_line('filterwarnings', f)


def pytest_collection_modifyitems(config, items):
    "Skip the tests marked `cuda` where there is no CUDA GPU"
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if 'cuda' in item.keywords: item.add_marker(skip)
