"""pytest configuration of the exercises' tests: import paths, one marker per exercise
(`pytest -m ex03`), and the reference models that several exercises share."""
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
for path in (ROOT, ROOT / "tests", ROOT / "exercises", HERE):  # the project, fixtures.py, course.py
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import checks  # noqa: E402  (needs the paths above)
from course import EXERCISES  # noqa: E402


def pytest_configure(config):
    for exercise in EXERCISES:
        config.addinivalue_line("markers", f"{exercise.marker}: exercise {exercise.number}, "
                                           f"{exercise.title}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' tensors are too small to share between threads: on a busy machine a
    second thread mostly waits for a core (a forward pass can take ten times as long)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def models():
    """(transformers' tiny model, ours) with the same random weights: see checks.models."""
    return checks.models()


@pytest.fixture(scope="session")
def photos():
    import fixtures
    return fixtures.photos()


@pytest.fixture(scope="module")
def pvm_model():
    """A tiny random model with PVM at layers 1 and 3, the gates open (as after some training):
    the model of exercises 8 and 9."""
    import pvm
    from model import Qwen3VL, tiny_config
    torch.manual_seed(0)
    model = pvm.attach_pvm(Qwen3VL(tiny_config()).eval().requires_grad_(False), [1, 3], 64)
    with torch.no_grad():
        for i in (1, 3):
            model.layers[i].pvm_block.gate_alpha.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def pvm_model_bf16(pvm_model):
    """The same model in bfloat16, the dtype it trains and generates in."""
    import copy
    return copy.deepcopy(pvm_model).to(torch.bfloat16)
