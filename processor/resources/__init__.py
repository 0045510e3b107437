"""What the package ships besides its code, found through importlib.resources wherever the
package is installed (a wheel in a virtualenv, an editable checkout), never relative to a
source tree or the working directory.

- `templates/`: the built-in email templates, the fallback behind an app folder's own
  `templates/` (emails.py).
- `app/`: the skeleton `cancelproc init` copies into an app folder (appfolder.py): the
  commented config file, the hooks folder with its disabled examples, the templates folder
  for overrides.
- `report/`: the page `cancelproc report html` writes (report.html.jinja) and the chart
  library inlined into it: uPlot 1.6.32 from its release's dist/ (uPlot.iife.min.js,
  uPlot.min.css), under the MIT licence kept beside it (uPlot-LICENSE.txt).
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path


def shipped(*parts: str) -> Traversable:
    """A file or folder shipped in this package: shipped("app", "config", "processor.toml")."""
    return files(__name__).joinpath(*parts)


def shipped_folder(*parts: str) -> Path:
    """A shipped folder as a path on disk, for readers that need one (Jinja's file loader).
    pip installs a wheel as files, so the folder is always on disk; a package imported from
    a zip archive would not be, and is refused in one line rather than failing later."""
    folder = shipped(*parts)
    if not isinstance(folder, Path):
        raise RuntimeError(f"cancelproc's {'/'.join(parts)} is inside an archive ({folder}): install the package "
                           "with pip so that its files are on disk")
    return folder
