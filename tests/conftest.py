"""Suite-wide test settings.

Under CI (the CI variable is set) hypothesis runs derandomized with no example
database, so a run is repeatable: the same examples every time. Locally it keeps
exploring new examples."""
from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
