"""Test setup: Triton kernels run on CPU under the interpreter.

TRITON_INTERPRET must be set before any generated kernel module is imported,
because `@triton.jit` decides at decoration time whether to interpret.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
sys.path.insert(0, str(ROOT))  # `import generated.<spec>` as a user in the project root would

HAS_CUDA = torch.cuda.is_available()


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite in one process per core (pytest-xdist): one torch thread
    # each, so that the workers' CPU-bound interpreter runs do not compete for the cores.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # GPU tests need compiled kernels: with the interpreter on (this file's default) CUDA
    # tensors are refused, so on a GPU machine they run with TRITON_INTERPRET=0.
    if not HAS_CUDA:
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        skip_gpu = pytest.mark.skip(reason="kernels are interpreted; run GPU tests with TRITON_INTERPRET=0")
    else:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _compile_cache_dir(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("mlagen-aot") if cache is not None else tmp_path_factory.mktemp("aot")


@pytest.fixture(scope="module")
def compile_cache(_compile_cache_dir):
    """MLAGEN_CACHE_DIR of the arch tests (test_gpu_compile, test_sparse_compile,
    test_compressed_compile): one directory of compile readings for the session (in pytest's
    cache, so readings persist between runs), so a kernel that several of them launch alike
    compiles once. Its tuning cache stays empty: every launcher takes its default config.
    Under pytest-xdist (`make test`) one module at a time holds it: a worker that starts another
    arch module meanwhile waits and then reads what the first compiled, instead of compiling
    the same kernels cold beside it on the same cores."""
    with FileLock(str(_compile_cache_dir) + ".lock"), pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLAGEN_CACHE_DIR", str(_compile_cache_dir))
        yield _compile_cache_dir
