"""Fixtures shared by the pass tests: a small model whose tables look trained, and a Zipf profile
of it (test modules that need another model define their own ``model`` fixture)."""

import pytest

from tests.helpers import small_model, zipf_profile


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def profile(model):
    return zipf_profile(model)
