"""Former name of :mod:`properlm.evaluation.decoding`, kept for existing imports: the scoring-rule beam objective.

``properlm.decoding`` is that module itself (the same module object), so attribute access,
``monkeypatch.setattr`` and pickled references to ``properlm.decoding.<name>`` reach the code that runs.
"""

import sys

from .evaluation import decoding as _module

sys.modules[__name__] = _module
