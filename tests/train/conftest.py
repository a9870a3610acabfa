"""Fixtures for the training tests (data: tests/tiny_data.py)."""
import pytest

from tests.tiny_data import write_shards


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> str:
    """Path of index.json for ~3k tokens in a few shards."""
    return write_shards(str(tmp_path_factory.mktemp("tiny_shards")))
