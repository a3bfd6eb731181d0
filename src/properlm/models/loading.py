"""Load (or create) a model and its tokenizer: a directory or hub id, a GGUF file, a LoRA adapter, a fresh model.

Sources (exactly one of them):

* ``model``: a local directory saved with ``save_pretrained`` or a hub id. The class is
  ``AutoModelForSeq2SeqLM`` when ``config.is_encoder_decoder`` else ``AutoModelForCausalLM``.
  A directory holding a PEFT adapter (``adapter_config.json``) is loaded onto its base
  model and merged.
* ``gguf_file``: a GGUF file (``from_pretrained(directory, gguf_file=name)``, needs the
  ``gguf`` package); ``model`` may name the directory that holds it.
* ``init``: a named small config, :data:`~properlm.models.tiny.INIT_CONFIGS` -- ``"tiny-gpt"`` (a Llama-style
  decoder) or ``"tiny-seq2seq"`` (a Marian/Transformer encoder-decoder) -- with a byte-level BPE
  tokenizer trained by the ``tokenizers`` library on ``train_texts``
  (:func:`~properlm.models.tokenizer.train_bpe_tokenizer`).

Example::

    >>> model, tok = load_model_and_tokenizer(init="tiny-seq2seq", train_texts=texts, vocab_size=500)
    >>> model, tok = load_model_and_tokenizer("runs/demo/final")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ModelLoadError
from .gguf import drop_gguf_quantizer, gguf_location
from .records import adapter_base
from .sources import check_model_source
from .tiny import tiny_config
from .tokenizer import load_tokenizer, train_bpe_tokenizer

__all__ = ["load_model_and_tokenizer"]


def _auto_class(config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _load_pretrained(model: str, gguf_file: str | None, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if os.path.isfile(os.path.join(model, "adapter_config.json")) and not gguf_file:
        return _load_adapter(model, dtype)
    try:
        config = AutoConfig.from_pretrained(model, **kwargs)
        net = _auto_class(config).from_pretrained(model, config=config, dtype=dtype or "auto", **kwargs)
        tokenizer = load_tokenizer(model, gguf_file)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {model!r}{' / ' + gguf_file if gguf_file else ''}: {exc}") from exc
    if gguf_file:
        drop_gguf_quantizer(net)
    return net, tokenizer


def _load_adapter(directory: str, dtype: Any) -> tuple[Any, Any]:
    from peft import PeftModel

    found = adapter_base(directory)
    if found is None:
        raise ModelLoadError(f"{directory}/adapter_config.json is not a JSON object naming base_model_name_or_path")
    base, gguf_file = found
    net, tokenizer = _load_pretrained(base, gguf_file, dtype)
    net = PeftModel.from_pretrained(net, directory).merge_and_unload()
    if any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = load_tokenizer(directory)
    return net, tokenizer


def load_model_and_tokenizer(
    model: str | None = None,
    *,
    gguf_file: str | None = None,
    init: str | None = None,
    train_texts: Iterable[str] | None = None,
    vocab_size: int = 1000,
    seed: int = 0,
    tokenizer: Any = None,
    dtype: Any = None,
    init_options: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Load (or create) a model and its tokenizer. Returns ``(model, tokenizer)``.

    Args:
        model: local directory or hub id (with ``gguf_file``: the directory holding it).
        gguf_file: a GGUF file name (in ``model``) or path.
        init: ``"tiny-gpt"`` or ``"tiny-seq2seq"``: a fresh model, initialised with ``seed``.
        train_texts: texts to train the BPE tokenizer on (``init`` only, unless ``tokenizer``).
        vocab_size: BPE vocabulary size (``init`` only).
        seed: the seed of the fresh model's initialisation (``init`` only).
        tokenizer: an existing tokenizer to use with ``init`` instead of training one
            (e.g. the one saved by an earlier run that is being resumed).
        dtype: ``torch_dtype`` for pretrained weights (default: as stored).
        init_options: keyword arguments of :func:`tiny_config` (hidden_size, num_layers, ...).
    """
    check_model_source(model, gguf_file, init)
    if init is None:
        if gguf_file is not None:
            directory, name = gguf_location(model, gguf_file)
            return _load_pretrained(directory, name, dtype)
        assert model is not None
        return _load_pretrained(model, None, dtype)

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    kind = "seq2seq" if init == "tiny-seq2seq" else "causal"
    if tokenizer is None:
        if train_texts is None:
            raise ModelLoadError("--init needs training texts to train its tokenizer on")
        tokenizer = train_bpe_tokenizer(train_texts, vocab_size, kind=kind)
    config = tiny_config(init, tokenizer, **dict(init_options or {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
        net = cls.from_config(config)
    return net, tokenizer
