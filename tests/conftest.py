"""pytest configuration: import paths and session-wide fixtures (built once per test run)."""

import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for p in (str(REPO_ROOT), str(TESTS_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

import fixtures as fx  # noqa: E402  (needs the path set above)

EXERCISE_TESTS = REPO_ROOT / "exercises" / "tests"


def pytest_configure(config):
    """`pytest tests` runs the course's exercise tests too (exercises/tests: the solutions are
    this project's code, so they must pass here); a narrower selection runs what it names."""
    if any(Path(arg).resolve() == TESTS_DIR for arg in config.args) and EXERCISE_TESTS.is_dir():
        config.args.append(str(EXERCISE_TESTS))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A directory holding only tokenizer.json and tokenizer_config.json."""
    path = tmp_path_factory.mktemp("tokenizer")
    fx.build_tokenizer_json(path)
    return path


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    """Tiny random checkpoint with tied embeddings (like Qwen3-VL-4B): no lm_head.weight."""
    return fx.write_checkpoint(tmp_path_factory.mktemp("tiny_tied"), tied=True)


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory):
    """Tiny random checkpoint with a separate lm_head (like Qwen3-VL-8B)."""
    return fx.write_checkpoint(tmp_path_factory.mktemp("tiny_untied"), tied=False, seed=1)


@pytest.fixture(scope="session")
def ref_processor(tiny_tied):
    """transformers' Qwen3-VL processor (images + text, left padding); same for every checkpoint."""
    return fx.reference_processor(tiny_tied)


@pytest.fixture(scope="session")
def photos():
    """Real photos as PIL images; see fixtures.photos()."""
    return fx.photos()


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models' tensors are too small to share between threads: on a busy machine a second
    thread mostly waits for a core. Modules that generate or train take this; the rest keep the
    default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hook_counts(monkeypatch):
    """Counts, while the test runs, of the forward hooks registered on any module and of the
    logit lens's runs: what --report and --analysis cost, and nothing without them."""
    import report

    counts = {"hooks": 0, "lens": 0}

    def counted(function, key):
        def wrapper(*args, **kwargs):  # a function, so that it binds as the method did
            counts[key] += 1
            return function(*args, **kwargs)
        return wrapper

    for owner, name, key in ((torch.nn.Module, "register_forward_hook", "hooks"),
                             (torch.nn.Module, "register_forward_pre_hook", "hooks"),
                             (report.AttentionReport, "logit_lens", "lens")):
        monkeypatch.setattr(owner, name, counted(getattr(owner, name), key))
    return counts
