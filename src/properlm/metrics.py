"""Former name of :mod:`properlm.evaluation.metrics`, kept for existing imports: teacher-forced metrics.

``properlm.metrics`` is that module itself (the same module object), so attribute access,
``monkeypatch.setattr`` and pickled references to ``properlm.metrics.<name>`` reach the code that runs.
"""

import sys

from .evaluation import metrics as _module

sys.modules[__name__] = _module
