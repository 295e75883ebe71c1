"""``python -m tether.cli``."""

from . import app

app()
