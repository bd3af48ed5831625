"""Fixtures of the end-to-end tests."""

import pytest

from tests.helpers.slurm_cluster import slurm_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real single-node Slurm cluster (tests/helpers/slurm_cluster.py), one per test module."""
    with slurm_cluster(tmp_path_factory) as c:
        yield c
