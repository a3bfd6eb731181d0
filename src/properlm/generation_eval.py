"""Former name of :mod:`properlm.evaluation.generation`, kept for existing imports: batched decoding, BLEU, chrF, ROUGE.

``properlm.generation_eval`` is that module itself (the same module object), so attribute access,
``monkeypatch.setattr`` and pickled references to ``properlm.generation_eval.<name>`` reach the code that runs.
"""

import sys

from .evaluation import generation as _module

sys.modules[__name__] = _module
