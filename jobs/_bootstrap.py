"""Imported first by every job script.

Running `python jobs/<job>.py` puts jobs/ first on sys.path, where jobs/pipeline.py would shadow the `pipeline`
package; this drops jobs/ from the path and puts the repository root there instead (so the jobs also run from a
`ray job submit --working-dir .` upload where the package is not pip-installed).
"""

import os
import sys

_JOBS = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _JOBS]
_ROOT = os.path.dirname(_JOBS)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
