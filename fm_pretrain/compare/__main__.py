"""`python -m fm_pretrain.compare`: see cli.py."""

from .cli import main

raise SystemExit(main())
