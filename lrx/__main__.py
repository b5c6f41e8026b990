"""``python -m lrx`` runs the CLI (where the ``lrx`` script is not on PATH, e.g. a source checkout)."""
from lrx.cli import app

app(prog_name="lrx")
