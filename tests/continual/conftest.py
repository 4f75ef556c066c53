import pytest

from test_resume import matrix, run


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """One uninterrupted single-process run of the toy sequence, shared by the resume and multi-process tests."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return out, matrix(run(out))
