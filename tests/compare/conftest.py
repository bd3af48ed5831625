"""Fixtures of the comparison tests: a sqlite MLflow store holding the hand-made runs of handmade.py."""

from pathlib import Path

import pytest

from tests.compare.handmade import log_handmade


@pytest.fixture(scope="module")
def handmade_db(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(path of mlflow.db, {run name: run id}) of a fresh store with the three hand-made runs."""
    db = tmp_path_factory.mktemp("handmade") / "store" / "mlflow.db"
    db.parent.mkdir()
    ids = log_handmade(f"sqlite:///{db}")
    return db, ids
