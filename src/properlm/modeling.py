"""Models and tokenizers: directories, hub ids, GGUF files, LoRA adapters and fresh tiny models.

Hugging Face directories and hub ids, GGUF files, LoRA adapter directories, and fresh tiny models with
a BPE tokenizer trained on the training texts.

Sources (exactly one of them):

* ``model``: a local directory saved with ``save_pretrained`` or a hub id. The class is
  ``AutoModelForSeq2SeqLM`` when ``config.is_encoder_decoder`` else ``AutoModelForCausalLM``.
  A directory holding a PEFT adapter (``adapter_config.json``) is loaded onto its base
  model and merged.
* ``gguf_file``: a GGUF file (``from_pretrained(directory, gguf_file=name)``, needs the
  ``gguf`` package); ``model`` may name the directory that holds it.
* ``init``: a named small config, :data:`INIT_CONFIGS` -- ``"tiny-gpt"`` (a Llama-style
  decoder) or ``"tiny-seq2seq"`` (a Marian/Transformer encoder-decoder) -- with a byte-level BPE
  tokenizer trained by the ``tokenizers`` library on ``train_texts``
  (:func:`train_bpe_tokenizer`).

Example::

    >>> model, tok = load_model_and_tokenizer(init="tiny-seq2seq", train_texts=texts, vocab_size=500)
    >>> model, tok = load_model_and_tokenizer("runs/demo/final")
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "BASE_RECORD",
    "INIT_CONFIGS",
    "MIN_VOCAB_SIZE",
    "POSITION_LIMIT_KEYS",
    "SPECIAL_TOKENS",
    "TRAINING_RECORD",
    "ModelLoadError",
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

#: names accepted by ``init``
INIT_CONFIGS = ("tiny-gpt", "tiny-seq2seq")

#: special tokens of the tokenizers trained here, in id order (pad=0, bos=1, eos=2, unk=3)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
#: file next to a LoRA adapter whose base model is a GGUF file: ``{"gguf_file": NAME}``
#: (``adapter_config.json`` records only the directory that holds it)
BASE_RECORD = "properlm_base.json"
#: file that ``properlm train`` writes into every model directory it saves (``final/``,
#: ``averaged/``, ``checkpoint-N/``): the data settings the model was trained with, e.g.
#: ``{"max_length": 256, "max_source_length": 192, "task": "summarization"}``
TRAINING_RECORD = "properlm_training.json"
#: config fields that bound the positions a model takes (learned or sinusoidal position tables), in order
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")
#: smallest byte-level BPE vocabulary: 256 byte symbols plus the special tokens
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class ModelLoadError(ValueError):
    """The model source is missing, ambiguous or cannot be loaded."""


def gguf_location(model: str | None, gguf_file: str) -> tuple[str, str]:
    """``(directory, file name)`` of a GGUF file given as a path or relative to ``model``."""
    path = gguf_file if model is None else os.path.join(model, gguf_file)
    if model is None or os.path.isabs(gguf_file):
        path = gguf_file
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def check_model_source(model: str | None = None, gguf_file: str | None = None, init: str | None = None) -> None:
    """Raise :class:`ModelLoadError` for a missing or ambiguous model source, without loading.

    Exactly one of ``model`` / ``gguf_file`` / ``init`` must be given (``model`` may
    accompany ``gguf_file`` as its directory). A local ``model`` directory must hold a
    ``config.json`` or an ``adapter_config.json``; a GGUF file must exist and the ``gguf``
    package must be installed. A ``model`` that is not a local path is taken as a hub id.
    """
    if init is not None:
        if init not in INIT_CONFIGS:
            raise ModelLoadError(f"unknown init config {init!r}; choose one of {', '.join(INIT_CONFIGS)}")
        if model is not None or gguf_file is not None:
            raise ModelLoadError("--init creates a fresh model: do not combine it with --model or --gguf-file")
        return
    if gguf_file is not None:
        directory, name = gguf_location(model, gguf_file)
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ModelLoadError(f"GGUF file {path!r} does not exist")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ModelLoadError(
                "loading a GGUF file needs the 'gguf' package: pip install gguf (or properlm[gguf])"
            ) from None
        return
    if model is None:
        raise ModelLoadError(
            "no model given: pass --model (a directory or hub id), --gguf-file, or --init "
            f"({' or '.join(INIT_CONFIGS)})"
        )
    if os.path.exists(model):
        if not os.path.isdir(model):
            raise ModelLoadError(
                f"model {model!r} is a file; pass the directory that holds config.json "
                "(or use --gguf-file for a GGUF file)"
            )
        if not any(os.path.isfile(os.path.join(model, f)) for f in ("config.json", "adapter_config.json")):
            raise ModelLoadError(
                f"model directory {model!r} holds no config.json (nor adapter_config.json){training_run_hint(model)}"
            )
    elif looks_like_a_path(model):
        raise ModelLoadError(f"model directory {model!r} does not exist{_missing_path_hint(model)}")


def looks_like_a_path(model: str) -> bool:
    """Whether ``model`` (that names nothing local) is a mistyped local path rather than a hub id.

    It is when it starts with ``.``, ``~`` or a separator, holds a backslash or more than one ``/`` (a hub
    id is ``NAME`` or ``OWNER/NAME``), or its parent directory exists here (``runs/smol`` beside ``runs/``).
    Such a path is refused at once, instead of trying the hub (retries, then a network error).
    """
    seps = tuple({"/", os.sep, os.altsep or "/"})
    if model.startswith((".", "~", *seps)) or "\\" in model or model.count("/") > 1:
        return True
    parent = os.path.dirname(model)
    return bool(parent) and os.path.isdir(parent)


def _missing_path_hint(model: str) -> str:
    """`` (did you mean 'runs/small'?)`` for a near name in the parent directory of a missing ``model``."""
    parent = os.path.dirname(model.rstrip("/" + os.sep)) or "."
    if not os.path.isdir(parent):
        return ""
    close = difflib.get_close_matches(os.path.basename(model.rstrip("/" + os.sep)), sorted(os.listdir(parent)), n=1)
    if not close:
        return ""
    return f" (did you mean {os.path.join(os.path.dirname(model.rstrip('/' + os.sep)), close[0])!r}?)"


def training_run_hint(model: str | None) -> str:
    """For a ``model`` that is a ``properlm train`` output directory, the hint to pass its model; else ``""``.

    An output directory holds ``final/`` (and perhaps ``averaged/``, ``checkpoint-N/``), each a model
    directory, but no ``config.json`` of its own."""
    if not model or not os.path.isdir(model):
        return ""
    names = ("config.json", "adapter_config.json")
    if any(os.path.isfile(os.path.join(model, n)) for n in names):
        return ""
    models = [d for d in ("final", "averaged") if any(os.path.isfile(os.path.join(model, d, n)) for n in names)]
    if not models:
        return ""
    return (
        f" (it looks like the output directory of `properlm train`: pass the model it saved, "
        f"{' or '.join('--model ' + os.path.join(model, d) for d in models)})"
    )


def _read_json_file(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def model_config_dict(model: str | None, gguf_file: str | None = None) -> dict[str, Any] | None:
    """The ``config.json`` of a local model directory as a dict, read without loading anything.

    For a LoRA adapter directory: its base model's; ``None`` for a hub id, a GGUF file, or a
    directory without one."""
    if model is None or gguf_file is not None or not os.path.isdir(model):
        return None
    config = _read_json_file(os.path.join(model, "config.json"))
    if config is None:
        base = adapter_base(model)
        if base is not None and os.path.isdir(base[0]):
            config = _read_json_file(os.path.join(base[0], "config.json"))
    return config


def adapter_base(directory: str) -> tuple[str, str | None] | None:
    """``(base, gguf_file)`` of a PEFT adapter directory, read without loading anything.

    ``base`` is ``adapter_config.json``'s ``base_model_name_or_path`` (a path relative to the
    adapter directory when one exists there, else as written: a directory or a hub id), ``gguf_file``
    the GGUF file in it that :data:`BASE_RECORD` names (``None`` without one). ``None`` when
    ``directory`` holds no adapter config or the config names no base."""
    adapter = _read_json_file(os.path.join(directory, "adapter_config.json"))
    base = adapter.get("base_model_name_or_path") if isinstance(adapter, dict) else None
    if not isinstance(base, str) or not base:
        return None
    if not os.path.isabs(base) and os.path.isdir(os.path.join(directory, base)):
        base = os.path.join(directory, base)
    record = _read_json_file(os.path.join(directory, BASE_RECORD))
    gguf_file = record.get("gguf_file") if isinstance(record, dict) else None
    return base, gguf_file if isinstance(gguf_file, str) else None


def model_max_positions(config: Any) -> tuple[int | None, str | None]:
    """``(limit, field)``: the most token positions a model's position table holds.

    Read from the first of :data:`POSITION_LIMIT_KEYS` in ``config`` (a ``PretrainedConfig`` or its dict; a
    composite config's ``text_config`` is looked into), or ``(None, None)`` when it names none
    (e.g. T5's relative positions). For an encoder-decoder the limit holds for the encoder input
    and for the decoder's sequence alike."""
    if config is None:
        return None, None
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    for key in POSITION_LIMIT_KEYS:
        v = get(key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, key
    text = get("text_config", None)
    if text is not None and text is not config:
        return model_max_positions(text)
    return None, None


def read_training_record(model: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, path)``: the data settings a model directory was trained with by ``properlm train``.

    Read from :data:`TRAINING_RECORD` in the directory, else (runs made before it existed) the
    ``config`` of ``results.json`` in the run directory that holds it (``RUN/final`` ->
    ``RUN/results.json``) -- or ``(None, None)``. The record has ``max_length`` and
    ``max_source_length`` (``None``: not cut)."""
    if model is None or not os.path.isdir(model):
        return None, None
    path = os.path.join(model, TRAINING_RECORD)
    record = _read_json_file(path)
    if record is not None and isinstance(record.get("max_length"), int):
        return record, path
    parent = os.path.join(os.path.dirname(os.path.abspath(model)), "results.json")
    results = _read_json_file(parent)
    config = results.get("config") if results else None
    if isinstance(config, dict) and isinstance(config.get("max_length"), int) and "global_step" in results:
        return {
            "max_length": config["max_length"],
            "max_source_length": config.get("max_source_length"),
            "task": config.get("task"),
        }, parent
    return None, None


# ------------------------------------------------------------------------------ tokenizers


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1000,
    *,
    kind: str = "causal",
    min_frequency: int = 2,
    model_max_length: int = 1024,
) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it in ``PreTrainedTokenizerFast``.

    Special tokens: ``<pad>`` (0), ``<s>`` (1), ``</s>`` (2), ``<unk>`` (3). Every byte is in
    the base alphabet, so any text can be encoded; digits are never merged (each digit is
    its own pre-token, as in Llama's tokenizer). ``kind="causal"`` prepends ``<s>`` to each
    encoded text (Llama style); ``kind="seq2seq"`` appends ``</s>`` (T5/Marian style).

    Args:
        texts: training texts (sources and targets).
        vocab_size: at least 260 (256 bytes + 4 special tokens).
        kind: ``"causal"`` or ``"seq2seq"``.
        min_frequency: the least count of a pair to be merged.
        model_max_length: ``model_max_length`` of the wrapped tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in ("causal", "seq2seq"):
        raise ValueError(f"kind must be 'causal' or 'seq2seq', got {kind!r}")
    specials = list(SPECIAL_TOKENS.values())
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    # digits are split one by one (as Llama does) so that numbers are spelled digit by digit
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    if kind == "causal":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, tok.token_to_id(eos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL_TOKENS)


def load_tokenizer(model: str, gguf_file: str | None = None) -> Any:
    """``AutoTokenizer`` of a directory / hub id (or of a GGUF file).

    A pad token is set to the EOS token (or UNK) when the tokenizer has none.
    """
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    _ensure_pad(tokenizer)
    return tokenizer


def _ensure_pad(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": SPECIAL_TOKENS["pad_token"]})


# ------------------------------------------------------------------------------ models


def tiny_config(
    name: str,
    tokenizer: Any,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    ffn_size: int | None = None,
    max_positions: int = 1024,
    dropout: float = 0.1,
) -> Any:
    """A small randomly initialisable config for ``init`` ``name``.

    ``tiny-gpt``: ``LlamaConfig`` (RMSNorm, rotary positions, SwiGLU, tied embeddings).
    ``tiny-seq2seq``: ``MarianConfig`` (a Transformer-base-style encoder-decoder with
    sinusoidal positions, as in the paper's translation models: ``num_layers`` encoder and
    decoder layers, GELU, shared and tied embeddings, decoder start token ``<s>``).
    ``ffn_size`` defaults to ``4 * hidden_size``.
    """
    if name not in INIT_CONFIGS:
        raise ModelLoadError(f"unknown init config {name!r}; choose one of {', '.join(INIT_CONFIGS)}")
    if hidden_size % num_heads:
        raise ModelLoadError(f"hidden size {hidden_size} is not divisible by the number of heads {num_heads}")
    ffn = ffn_size or 4 * hidden_size
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vocab = len(tokenizer)
    if name == "tiny-gpt":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=ffn,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            attention_dropout=dropout,
            **ids,
        )
    from transformers import MarianConfig

    return MarianConfig(
        vocab_size=vocab,
        d_model=hidden_size,
        encoder_layers=num_layers,
        decoder_layers=num_layers,
        encoder_attention_heads=num_heads,
        decoder_attention_heads=num_heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_position_embeddings=max_positions,
        dropout=dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="gelu",
        decoder_start_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=None,
        tie_word_embeddings=True,
        share_encoder_decoder_embeddings=True,
        scale_embedding=True,
        **ids,
    )


def is_seq2seq(model_or_config: Any) -> bool:
    """``True`` for an encoder-decoder model (or config), also through PEFT/DDP wrappers."""
    config = getattr(unwrap_model(model_or_config), "config", model_or_config)
    return bool(getattr(config, "is_encoder_decoder", False))


def unwrap_model(model: Any) -> Any:
    """The Hugging Face model inside DDP (``.module``) and PEFT (``get_base_model()``) wrappers."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "config"):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model) and hasattr(model, "peft_config"):
            model = model.get_base_model()
        else:
            return model


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
        _drop_gguf_quantizer(net)
    return net, tokenizer


def _drop_gguf_quantizer(net: Any) -> None:
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


def record_gguf_base(adapter_dir: str, gguf_file: str) -> None:
    """Write :data:`BASE_RECORD` into a LoRA adapter directory whose base model is a GGUF file.

    The file is ``gguf_file`` (a file name in the directory that ``adapter_config.json`` names), so
    that :func:`load_model_and_tokenizer` can reload the adapter."""
    with open(os.path.join(adapter_dir, BASE_RECORD), "w", encoding="utf-8") as f:
        json.dump({"gguf_file": gguf_file}, f)


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
