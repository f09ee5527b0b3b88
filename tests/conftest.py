import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# estimates in tests are the formulas' own figures; calibration tests point this at their own files
os.environ.setdefault("TUNEQUANT_CALIBRATION", "off")
# the advisor reads no developer run store in tests (even when the shell says otherwise); tests of
# measured evidence give their own runs or set it for their own store
os.environ["TUNEQUANT_MEASURED"] = "off"


def pytest_collection_modifyitems(config, items):
    """gpu tests run only where CUDA is there (and only when selected with -m gpu)."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture(scope="module")
def micro_home(tmp_path_factory):
    """TUNEQUANT_HOME for one test module, shared by the session's modules (the micro demo model
    is built once, under the session's base temp dir); the variable is restored after the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEQUANT_HOME", str(tmp_path_factory.getbasetemp() / "tq-home"))
        from engine.runs import demo
        demo.ensure_model("micro-llama")
        yield
