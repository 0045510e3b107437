"""The `cancelproc` command: the only place that prints, reads the environment and exits.

`app` holds the click group, the App the commands share and the error handling at the
edge; each other module adds its commands to the group when imported.
"""

from processor.cli import admin, emails, find, records, requests, run  # noqa: F401 - they register their commands
from processor.cli.app import cli, main

__all__ = ["cli", "main"]
