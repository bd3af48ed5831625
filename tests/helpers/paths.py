"""Where the repository, the bundled data and the optional `../shared` data live."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_DATA = REPO / "data" / "tiny"
