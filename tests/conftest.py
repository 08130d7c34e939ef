import pytest
import torch


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A converted tiny-llama run directory shared by tests that only read it."""
    from flextron.convert import ConvertConfig, convert

    out = tmp_path_factory.mktemp("runs") / "tiny"
    convert(ConvertConfig(model="tiny-llama", out=str(out), calib_windows=4, calib_seq_len=64))
    return out


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
