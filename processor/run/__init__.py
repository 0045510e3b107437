"""The run: apply due cancellation requests. Decide per request, write per chunk.

`outcome` (what a run is asked and what it comes to), `decide` (one request, in Python),
`store` (every SQL statement of a run), `preview` (the dry run), `reminders` (the
reminders before a cancellation takes effect), `runner` (the lifecycle).
"""

from processor.run.outcome import Action, Outcome, RunOptions, RunSummary, Tally
from processor.run.preview import PREVIEW_COLUMNS, REMIND
from processor.run.runner import Helpers, Runner, RunStopped

__all__ = ["PREVIEW_COLUMNS", "REMIND", "Action", "Helpers", "Outcome", "RunOptions", "RunStopped", "RunSummary",
           "Runner", "Tally"]
