"""``python -m unlearn_fast.cli`` (what torchrun launches)."""

import sys

from . import main

sys.exit(main())
