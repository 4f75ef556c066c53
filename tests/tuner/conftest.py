import pytest

from keeplora_hf.models import TINY_MODELS


@pytest.fixture(params=TINY_MODELS)
def tiny_name(request) -> str:
    return request.param
