"""``python -m pipeoptim_compare compare``: the same as the ``pipeoptim`` command."""
import sys

from .cli import main

sys.exit(main())
