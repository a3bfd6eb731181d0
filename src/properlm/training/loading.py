"""Loading what a run trains on: the examples, the model and tokenizer, the LoRA wrapper.

``load_data`` reads and validates the training and validation examples (or splits off a validation fraction)
before any model is loaded; ``build_model`` loads the model and tokenizer (directory, hub id, GGUF file) or builds a
fresh one with a BPE tokenizer trained on the data (``--init``); ``apply_lora`` wraps the model in PEFT adapters.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..data import DataError, Example, load_examples, split_validation
from .config import ConfigError, TrainConfig


def load_data(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """``(train, validation)`` examples of ``cfg`` (the validation split cut from the training data when asked)."""
    train = load_examples(
        cfg.train_file,
        task=cfg.task if cfg.task != "translation" else None,
        source_file=cfg.source_file,
        target_file=cfg.target_file,
        source_lang=cfg.source_lang,
        target_lang=cfg.target_lang,
    )
    val: list[Example] = []
    if cfg.validation_file is not None or cfg.validation_source_file is not None:
        val = load_examples(
            cfg.validation_file,
            task=train[0].task if cfg.validation_file else None,
            source_file=cfg.validation_source_file,
            target_file=cfg.validation_target_file,
            source_lang=cfg.source_lang,
            target_lang=cfg.target_lang,
        )
        if val[0].task != train[0].task:
            raise DataError(f"validation data is {val[0].task} but training data is {train[0].task}")
    elif cfg.validation_fraction > 0:
        seed = cfg.seed if cfg.validation_seed is None else cfg.validation_seed
        train, val = split_validation(train, cfg.validation_fraction, seed)
    return train, val


def build_model(cfg: TrainConfig, train: list[Example], args: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``cfg``: loaded, or a fresh ``--init`` model with a tokenizer trained on ``train``."""
    from ..models import load_model_and_tokenizer

    if cfg.init is None:
        return load_model_and_tokenizer(cfg.model, gguf_file=cfg.gguf_file)
    from transformers import PreTrainedTokenizerFast

    tok_dir = os.path.join(cfg.output_dir, "tokenizer")
    init_options = {
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "ffn_size": cfg.ffn_size,
        "dropout": cfg.dropout,
        "max_positions": max(cfg.max_length, 64),
    }
    # rank 0 trains and saves the tokenizer first; other ranks (and resumed runs) load it
    with args.main_process_first(desc="tokenizer"):
        tokenizer = None
        if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        texts = [t for e in train for t in (e.source, e.target)]
        model, tokenizer = load_model_and_tokenizer(
            init=cfg.init,
            train_texts=texts,
            vocab_size=cfg.vocab_size,
            seed=cfg.seed,
            tokenizer=tokenizer,
            init_options=init_options,
        )
        if args.process_index == 0 and not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
            tokenizer.save_pretrained(tok_dir)
    return model, tokenizer


def apply_lora(cfg: TrainConfig, model: Any, seq2seq: bool) -> Any:
    """``model`` wrapped in a PEFT LoRA adapter as ``cfg`` asks."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets: Any = cfg.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, lora_config)
    except ValueError as exc:
        raise ConfigError(f"--lora-target-modules {cfg.lora_target_modules!r}: {exc}") from None


def model_vocab_size(model: Any) -> int:
    """Rows of the model's output embedding (its vocabulary as the loss sees it)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
