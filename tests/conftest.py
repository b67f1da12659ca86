import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct on the CPU, fp32: (model, tokenizer)."""
    from kvbench.models import load_model

    return load_model("embedded", device="cpu", dtype="fp32")

