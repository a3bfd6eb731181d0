"""Models and tokenizers: loading, GGUF files, fresh tiny models and their BPE tokenizers.

How-to: :doc:`the command line <../how-to/command-line>` (``--model``, ``--gguf-file``, ``--init``) and
docs/how-to/peft-lora.md (LoRA adapters).

Modules, one job each:

* :mod:`~properlm.models.loading` -- :func:`load_model_and_tokenizer`: a directory or hub id, a GGUF file, a LoRA
  adapter directory, or a fresh tiny model;
* :mod:`~properlm.models.sources` -- checks a model source before anything is loaded (and hints at typos);
* :mod:`~properlm.models.records` -- what a model directory records: config, position limit, adapter base, the
  training record;
* :mod:`~properlm.models.gguf` -- where a GGUF file lies, the record beside an adapter trained on one;
* :mod:`~properlm.models.tiny` -- the named small configs of ``init``;
* :mod:`~properlm.models.tokenizer` -- the byte-level BPE tokenizer trained for a tiny model, loading a saved one;
* :mod:`~properlm.models.wrappers` -- the model inside DDP/PEFT wrappers, encoder-decoder or not;
* :mod:`~properlm.models.errors` -- :class:`ModelLoadError`.

The package exports the public names of those modules.
"""

from __future__ import annotations

from .errors import ModelLoadError
from .gguf import BASE_RECORD, gguf_location, record_gguf_base
from .loading import load_model_and_tokenizer
from .records import (
    POSITION_LIMIT_KEYS,
    TRAINING_RECORD,
    adapter_base,
    model_config_dict,
    model_max_positions,
    read_training_record,
)
from .sources import check_model_source, looks_like_a_path, training_run_hint
from .tiny import INIT_CONFIGS, tiny_config
from .tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, load_tokenizer, train_bpe_tokenizer
from .wrappers import is_seq2seq, unwrap_model

__all__ = [
    "BASE_RECORD",
    "INIT_CONFIGS",
    "MIN_VOCAB_SIZE",
    "POSITION_LIMIT_KEYS",
    "SPECIAL_TOKENS",
    "TRAINING_RECORD",
    "ModelLoadError",
    "adapter_base",
    "check_model_source",
    "gguf_location",
    "is_seq2seq",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "looks_like_a_path",
    "model_config_dict",
    "model_max_positions",
    "read_training_record",
    "record_gguf_base",
    "tiny_config",
    "train_bpe_tokenizer",
    "training_run_hint",
    "unwrap_model",
]
