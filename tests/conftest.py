import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import morphir  # noqa: E402
from morphir.contract import calibrate  # noqa: E402
from models import EXTRA_MODELS  # noqa: E402

# the test models are tiny: one intra-op thread is as fast and does not oversubscribe a shared CI box
torch.set_num_threads(1)


def build_graph(name: str, seed: int = 0) -> morphir.MorphGraph:
    """A traced, BN-calibrated model: ``zoo:NAME`` on 1x8x8 digits-sized input, or an extra model."""
    torch.manual_seed(seed)
    if name.startswith("zoo:"):
        shape = (1, 8, 8)
        model = morphir.zoo.build(name[4:], shape, 10)
    else:
        ctor, shape = EXTRA_MODELS[name]
        model = ctor()
    calibrate(model, (torch.randn(64, *shape),))
    return morphir.trace(model, torch.randn(2, *shape))


@pytest.fixture
def vgg_graph() -> morphir.MorphGraph:
    return build_graph("zoo:vgg19")
