"""Allows ``python -m covid_cxr``: the entry point of the composition root, :mod:`service.cli`."""

import sys

from service.cli import main

sys.exit(main())
