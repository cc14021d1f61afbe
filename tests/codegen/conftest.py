"""Fixtures for codegen tests; puts this folder on sys.path for its helper modules."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def artifact_dir(tmp_path):
    return tmp_path / "artifact"
