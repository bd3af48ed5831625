"""python -m fm_pretrain.tracking init --run-dir DIR [--experiment NAME] [--tracking-uri URI]

Creates the tracking store and experiment and prints the tracking URI on stdout (MLflow's own log lines go to
stderr). Launchers call it once before the ranks start: two processes creating a fresh sqlite store at once fail.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fm_pretrain.config import TrackingConfig

from .store import default_tracking_uri, ensure_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fm_pretrain.tracking", description="MLflow store setup")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the tracking store and experiment; print the tracking URI")
    init.add_argument("--run-dir", required=True)
    init.add_argument("--experiment", default=TrackingConfig.experiment)
    init.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or run_dir sqlite")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri(args.run_dir)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    ensure_store(uri, args.experiment)
    print(uri, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
