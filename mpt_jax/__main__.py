"""`python -m mpt_jax train ...`."""

import sys

from mpt_jax.cli import main

sys.exit(main())
