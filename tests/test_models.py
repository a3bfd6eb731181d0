"""Model/tokenizer loading: tiny configs with a trained BPE tokenizer, save/load, errors."""

from __future__ import annotations

import pytest
import torch

from properlm.models import (
    INIT_CONFIGS,
    ModelLoadError,
    check_model_source,
    is_seq2seq,
    load_model_and_tokenizer,
    train_bpe_tokenizer,
)

TEXTS = [f"{i} is written {w}" for i, w in enumerate("zero one two three four five six seven".split())] * 5
SMALL = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "max_positions": 64}


def test_bpe_tokenizer_special_tokens_and_roundtrip():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=280, kind="causal")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("7 is written seven, ünïcode")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "7 is written seven, ünïcode"
    s2s = train_bpe_tokenizer(TEXTS, vocab_size=280, kind="seq2seq")
    assert s2s("seven")["input_ids"][-1] == s2s.eos_token_id
    with pytest.raises(ValueError, match="vocab_size must be at least 260"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)


@pytest.mark.parametrize("init", INIT_CONFIGS)
def test_init_save_load_roundtrip(tmp_path, init):
    model, tok = load_model_and_tokenizer(init=init, train_texts=TEXTS, vocab_size=280, seed=1, init_options=SMALL)
    assert is_seq2seq(model) == (init == "tiny-seq2seq")
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    again, _ = load_model_and_tokenizer(init=init, tokenizer=tok, seed=1, init_options=SMALL)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)  # the seed fixes the initialisation
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model_and_tokenizer(str(tmp_path))
    assert type(loaded) is type(model)
    assert tok2("one two")["input_ids"] == tok("one two")["input_ids"]
    ids = torch.tensor([tok("one two three")["input_ids"]])
    kwargs = {"decoder_input_ids": ids} if is_seq2seq(model) else {}
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, **kwargs).logits, loaded(input_ids=ids, **kwargs).logits)


def test_lora_adapter_directory_is_merged(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = load_model_and_tokenizer(init="tiny-gpt", train_texts=TEXTS, vocab_size=280, init_options=SMALL)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tok("one two")["input_ids"]])
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    merged, _ = load_model_and_tokenizer(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_model_source_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no model given"):
        check_model_source()
    with pytest.raises(ModelLoadError, match="unknown init config 'tiny-bert'"):
        check_model_source(init="tiny-bert")
    with pytest.raises(ModelLoadError, match="do not combine"):
        check_model_source(model="x", init="tiny-gpt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_source(model=str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="holds no config.json"):
        check_model_source(model=str(tmp_path))
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        check_model_source(gguf_file=str(tmp_path / "model.gguf"))
    with pytest.raises(ModelLoadError, match="needs training texts"):
        load_model_and_tokenizer(init="tiny-gpt")


def test_gguf_needs_package(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(ModelLoadError, match="needs the 'gguf' package"):
        check_model_source(gguf_file=str(path))
    with pytest.raises(ModelLoadError, match="needs the 'gguf' package"):
        check_model_source(model=str(tmp_path), gguf_file="m.gguf")


def write_llama_gguf(model, tokenizer, path):
    """Write a Llama model with a byte-level BPE tokenizer as an (unquantised, float32) GGUF file,
    as llama.cpp's converter does (q/k rows permuted for its rotary layout)."""
    import json

    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    writer.add_rope_freq_base(rope)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)

    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_file_loads_with_the_same_logits(tmp_path):
    model, tok = load_model_and_tokenizer(
        init="tiny-gpt", train_texts=TEXTS, vocab_size=280, init_options={**SMALL, "dropout": 0.0}
    )
    write_llama_gguf(model, tok, tmp_path / "tiny.gguf")
    loaded, tok2 = load_model_and_tokenizer(str(tmp_path), gguf_file="tiny.gguf")
    also, _ = load_model_and_tokenizer(gguf_file=str(tmp_path / "tiny.gguf"))
    assert type(loaded).__name__ == "LlamaForCausalLM" and not is_seq2seq(loaded)
    text = "3 is written three"
    assert tok2(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
        torch.testing.assert_close(also(input_ids=ids).logits, expected)
