from pathlib import Path

import pytest
from llama_cpp_runtime import runtime  # tests/export is on sys.path (pytest prepend import mode)


@pytest.fixture(scope="session")
def llama_cpp(tmp_path_factory) -> str:
    """PYTHONPATH entry under which llama.cpp (llama-cpp-py-sync) loads here; skips with the reason otherwise."""
    path, why = runtime(Path(tmp_path_factory.mktemp("llama_cpp")))
    if path is None:
        pytest.skip(why)
    return path
