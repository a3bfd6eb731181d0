"""GGUF files: where one lies, the record beside a LoRA adapter trained on one, and the loaded model's marks.

A GGUF model is loaded with ``from_pretrained(directory, gguf_file=name)`` (the ``gguf`` package);
:func:`~properlm.models.loading.load_model_and_tokenizer` calls these helpers.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["BASE_RECORD", "drop_gguf_quantizer", "gguf_location", "record_gguf_base"]

#: file next to a LoRA adapter whose base model is a GGUF file: ``{"gguf_file": NAME}``
#: (``adapter_config.json`` records only the directory that holds it)
BASE_RECORD = "properlm_base.json"


def gguf_location(model: str | None, gguf_file: str) -> tuple[str, str]:
    """``(directory, file name)`` of a GGUF file given as a path or relative to ``model``."""
    path = gguf_file if model is None else os.path.join(model, gguf_file)
    if model is None or os.path.isabs(gguf_file):
        path = gguf_file
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def record_gguf_base(adapter_dir: str, gguf_file: str) -> None:
    """Write :data:`BASE_RECORD` into a LoRA adapter directory whose base model is a GGUF file.

    The file is ``gguf_file`` (a file name in the directory that ``adapter_config.json`` names), so
    that :func:`load_model_and_tokenizer` can reload the adapter."""
    with open(os.path.join(adapter_dir, BASE_RECORD), "w", encoding="utf-8") as f:
        json.dump({"gguf_file": gguf_file}, f)


def drop_gguf_quantizer(net: Any) -> None:
    """Clear the quantisation marks of a dequantised GGUF model.

    A GGUF model is dequantised on loading (its parameters are ordinary float tensors), but
    transformers still marks it as quantised, which makes ``Trainer`` refuse full fine-tuning
    and ``save_pretrained`` record a GGUF quantisation config. Clear those marks: the model
    is then an ordinary Hugging Face model, saved and reloaded as such."""
    if getattr(net, "hf_quantizer", None) is None:
        return
    net.hf_quantizer = None
    net.is_quantized = False
    net.quantization_method = None
    if hasattr(net.config, "quantization_config"):
        del net.config.quantization_config
