"""``python -m pipeline_rt compare``: the same as the ``pipeoptim`` command."""
import sys

from .cli import main

sys.exit(main())
