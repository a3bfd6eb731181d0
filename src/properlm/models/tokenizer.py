"""Tokenizers: a byte-level BPE trained on the training texts (for fresh tiny models), and loading a saved one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["MIN_VOCAB_SIZE", "SPECIAL_TOKENS", "ensure_pad_token", "load_tokenizer", "train_bpe_tokenizer"]

#: special tokens of the tokenizers trained here, in id order (pad=0, bos=1, eos=2, unk=3)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
#: smallest byte-level BPE vocabulary: 256 byte symbols plus the special tokens
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


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
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: Any) -> None:
    """Give ``tokenizer`` a pad token when it has none: its EOS token, else its UNK token, else ``<pad>``."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": SPECIAL_TOKENS["pad_token"]})
