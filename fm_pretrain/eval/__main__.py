"""`python -m fm_pretrain.eval`: see fm_pretrain/eval/cli.py."""

import sys

from .cli import main

sys.exit(main())
