"""Allows ``python -m covid_cxr``."""

import sys

from covid_cxr.cli import main

sys.exit(main())
