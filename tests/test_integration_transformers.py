"""Hugging Face integration: compute_loss_func, apply_scoring_rule, PEFT, TRL, gradient accumulation."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import properlm.integrations.transformers.hooks as integ_hooks  # noqa: E402
from properlm import scoring_rule_loss  # noqa: E402
from properlm.integrations.transformers import (  # noqa: E402
    ScoringRuleLossFunc,
    apply_scoring_rule,
    is_scoring_rule_applied,
    remove_scoring_rule,
    scoring_rule_loss_func,
)
from properlm.integrations.transformers.hooks import ModelPreHook  # noqa: E402

V = 100
KINDS = ["llama", "gpt2", "t5", "bart"]
CAUSAL = {"llama", "gpt2"}


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "llama-untied":
        cfg = transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "t5":
        cfg = transformers.T5Config(
            vocab_size=V,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        model = transformers.T5ForConditionalGeneration(cfg)
    elif kind == "bart":
        cfg = transformers.BartConfig(
            vocab_size=V,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
        )
        model = transformers.BartForConditionalGeneration(cfg)
        with torch.no_grad():  # a non-zero final_logits_bias must be part of the fused loss
            model.final_logits_bias.normal_()
    else:  # pragma: no cover
        raise ValueError(kind)
    model.eval()  # no dropout: calls are deterministic
    return model


def batch(kind: str, b: int = 3, t: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    labels = torch.randint(3, V, (b, t), generator=g) if kind not in CAUSAL else ids.clone()
    labels[0, -2:] = -100  # padding / prompt positions
    labels[-1, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def aligned(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if kind in CAUSAL:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def reference_loss(model, kind, inputs, rule, smoothing, num_items_in_batch=None):
    """scoring_rule_loss on the logits of the unpatched model."""
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    if kind not in CAUSAL:
        kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
    logits = model(**kwargs).logits
    z, y = aligned(kind, logits, inputs["labels"])
    return scoring_rule_loss(z, y, rule, smoothing, num_items_in_batch=num_items_in_batch)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


# ----------------------------------------------------------------------------------------------
# values: patched == compute_loss_func == unfused reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_all_paths_give_the_same_loss(kind):
    model = tiny_model(kind)
    inputs = batch(kind)
    for rule in ["logarithmic", "brier", "spherical", "power:3", "pseudo-spherical:1.5"]:
        for smoothing in (0.0, 0.1):
            ref = reference_loss(model, kind, inputs, rule, smoothing)
            func = scoring_rule_loss_func(rule, smoothing, model=model)
            via_func = func(
                model(
                    **{k: v for k, v in inputs.items() if k != "labels"},
                    **(
                        {}
                        if kind in CAUSAL
                        else {"decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])}
                    ),
                ),
                inputs["labels"],
            )
            # shift inferred from the outputs when the model is not given
            via_func_inferred = scoring_rule_loss_func(rule, smoothing)(model(**inputs), inputs["labels"])
            with apply_scoring_rule(model, rule, smoothing) as handle:
                out = model(**inputs)
                assert handle.fused and out.logits.shape[-2] == 0  # no logits were built
                fused = out.loss
            with apply_scoring_rule(model, rule, smoothing, fused=False):
                out = model(**inputs)
                unfused = out.loss
                assert out.logits.shape[-1] == V and out.logits.shape[-2] == inputs["input_ids"].shape[1]
            for value in (via_func, via_func_inferred, fused, unfused):
                torch.testing.assert_close(value, ref, rtol=2e-6, atol=2e-6, msg=f"{kind} {rule} {smoothing}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama-untied", "t5", "bart"])
def test_fused_gradients_match_reference(kind):
    model = tiny_model(kind)
    inputs = batch("llama" if kind == "llama-untied" else kind)
    ref_kind = "llama" if kind == "llama-untied" else kind
    reference_loss(model, ref_kind, inputs, "brier", 0.1).backward()
    ref = grads(model)
    with apply_scoring_rule(model, "brier", 0.1):
        model(**inputs).loss.backward()
    assert_grads_close(grads(model), ref)


@pytest.mark.slow
def test_logarithmic_is_the_models_cross_entropy_and_removal_restores_it():
    for kind in KINDS:
        model = tiny_model(kind)
        inputs = batch(kind)
        own = model(**inputs).loss
        handle = apply_scoring_rule(model, "logarithmic")
        assert is_scoring_rule_applied(model)
        torch.testing.assert_close(model(**inputs).loss, own, rtol=1e-6, atol=1e-6)
        handle.set_rule("brier")
        assert not torch.allclose(model(**inputs).loss, own)
        handle.remove()
        handle.remove()  # idempotent
        assert not is_scoring_rule_applied(model) and not handle.active
        out = model(**inputs)
        torch.testing.assert_close(out.loss, own, rtol=0, atol=0)
        assert out.logits.shape[-1] == V
        # remove_scoring_rule without the handle
        apply_scoring_rule(model, "brier")
        assert remove_scoring_rule(model) and not remove_scoring_rule(model)
        torch.testing.assert_close(model(**inputs).loss, own, rtol=0, atol=0)
        assert "accepts_loss_kwargs" not in model.__dict__


def test_handle_set_rule_switches_the_loss():
    model = tiny_model("llama")
    inputs = batch("llama")
    handle = apply_scoring_rule(model, "logarithmic", smoothing=0.1)
    handle.set_rule("spherical")
    assert handle.rule.spec == "spherical" and handle.smoothing == 0.1
    torch.testing.assert_close(model(**inputs).loss, reference_loss(model, "llama", inputs, "spherical", 0.1))
    handle.set_rule("power:3", smoothing=0.0)
    torch.testing.assert_close(model(**inputs).loss, reference_loss(model, "llama", inputs, "power:3", 0.0))
    with pytest.raises(ValueError, match="smoothing"):
        handle.set_rule("brier", smoothing=1.5)
    with pytest.raises(ValueError):
        handle.set_rule("no-such-rule")
    assert handle.rule.spec == "power:3" and handle.smoothing == 0.0  # unchanged by the failed calls
    handle.rule = "brier"
    handle.smoothing = 0.2
    torch.testing.assert_close(model(**inputs).loss, reference_loss(model, "llama", inputs, "brier", 0.2))
    func = ScoringRuleLossFunc("brier")
    func.set_rule("spherical", 0.1)
    func.rule = "logarithmic"
    assert func.rule.spec == "logarithmic" and func.smoothing == 0.1
    assert "logarithmic" in repr(func) and "brier" in repr(handle)


def test_the_fused_patch_scores_the_hidden_states(monkeypatch):
    """The fused patch passes the hidden states (not the logits) and the output bias to the fused loss, and equals
    the patch that scores the logits (``fused=False``)."""
    model = tiny_model("bart")
    inputs = batch("bart")
    calls = []
    real = integ_hooks.fused_linear_scoring_rule_loss

    def spy(hidden, weight, target, **kw):
        calls.append((tuple(hidden.shape), tuple(weight.shape), kw["bias"] is not None))
        return real(hidden, weight, target, **kw)

    monkeypatch.setattr(integ_hooks, "fused_linear_scoring_rule_loss", spy)  # what the patch's hook calls
    with apply_scoring_rule(model, "spherical", 0.1):
        loss_fused = model(**inputs).loss
        loss_fused.backward()
    g_fused = grads(model)
    assert calls == [((3, 7, 32), (V, 32), True)]  # hidden states, not logits; BART's final_logits_bias
    with apply_scoring_rule(model, "spherical", 0.1, fused=False):
        loss_logits = model(**inputs).loss
        loss_logits.backward()
    assert len(calls) == 1  # the logits are scored without the fused loss
    torch.testing.assert_close(loss_logits, loss_fused, rtol=1e-6, atol=1e-6)
    assert_grads_close(grads(model), g_fused)


def test_return_dict_false_and_positional_labels():
    model = tiny_model("gpt2")
    inputs = batch("gpt2")
    ref = reference_loss(model, "gpt2", inputs, "brier", 0.0)
    with apply_scoring_rule(model, "brier"):
        out = model(**inputs, return_dict=False)
        assert isinstance(out, tuple)
        torch.testing.assert_close(out[0], ref)
        # GPT2LMHeadModel.forward(input_ids, past_key_values, cache_position, attention_mask, token_type_ids,
        # position_ids, inputs_embeds, labels): labels positionally
        names = list(__import__("inspect").signature(model.forward).parameters)
        pos = [inputs.get(n) for n in names[: names.index("labels") + 1]]
        torch.testing.assert_close(model(*pos).loss, ref)


def test_generation_and_pre_shifted_labels():
    model = tiny_model("llama")
    inputs = batch("llama")
    prompt = inputs["input_ids"][:, :3]
    expected = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with apply_scoring_rule(model, "brier"):
        torch.testing.assert_close(model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0), expected)
        # context-parallel collators pass labels already shifted (padded with -100 at the end)
        shifted = torch.nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
        torch.testing.assert_close(
            model(input_ids=inputs["input_ids"], shift_labels=shifted).loss, model(**inputs).loss
        )


def test_autocast_bfloat16():
    model = tiny_model("t5")
    inputs = batch("t5")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_loss(model, "t5", inputs, "brier", 0.1)
        with apply_scoring_rule(model, "brier", 0.1):
            loss = model(**inputs).loss
    assert loss.dtype == torch.float32 and loss.isfinite()
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    loss.backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


def test_bad_labels_raise_and_leave_the_model_usable():
    model = tiny_model("llama")
    inputs = batch("llama")
    plain = model(input_ids=inputs["input_ids"]).logits
    with apply_scoring_rule(model, "brier"):
        with pytest.raises(ValueError, match="labels"):
            model(input_ids=inputs["input_ids"], labels=inputs["labels"][:, :4])
        with pytest.raises(ValueError, match="outside"):
            model(input_ids=inputs["input_ids"], labels=inputs["labels"] + 1000)
        # disarmed after the errors: a call without labels gives the full logits
        torch.testing.assert_close(model(input_ids=inputs["input_ids"]).logits, plain)
        assert model(**inputs).loss.isfinite()


def test_refuses_fused_mode_where_it_cannot_express_the_logits():
    model = tiny_model("llama")
    model.lm_head.base_layer = torch.nn.Linear(32, V)  # looks PEFT-wrapped: its weight alone is not the logits
    with pytest.raises(ValueError, match="wrapped by PEFT.*fused=False"):
        apply_scoring_rule(model, "brier")
    assert not is_scoring_rule_applied(model)
    handle = apply_scoring_rule(model, "brier", fused=False)
    assert not handle.fused
    with pytest.raises(ValueError, match="output embedding"):
        apply_scoring_rule(model.model, "brier")  # the bare decoder has no head
    with pytest.raises(ValueError, match="smoothing"):
        apply_scoring_rule(model, "brier", smoothing=-0.1)
    with pytest.raises(ValueError, match="shift_labels"):
        scoring_rule_loss_func("brier", shift_labels="yes")


def test_apply_twice_replaces_the_patch():
    model = tiny_model("t5")
    inputs = batch("t5")
    apply_scoring_rule(model, "brier")
    apply_scoring_rule(model, "spherical", 0.1)
    assert sum(isinstance(h, ModelPreHook) for h in model._forward_pre_hooks.values()) == 1
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
    torch.testing.assert_close(model(**inputs).loss, reference_loss(model, "t5", inputs, "spherical", 0.1))


def test_state_dict_save_pretrained_deepcopy_and_pickle(tmp_path):
    model = tiny_model("llama")
    inputs = batch("llama")
    keys = list(model.state_dict())
    handle = apply_scoring_rule(model, "brier", 0.1)
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "m")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert not is_scoring_rule_applied(reloaded)
    for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    expected = model(**inputs).loss
    twin = copy.deepcopy(model)
    unpickled = pickle.loads(pickle.dumps(model))
    for other in (twin, unpickled):
        assert is_scoring_rule_applied(other)
        torch.testing.assert_close(other(**inputs).loss, expected)
    handle.set_rule("logarithmic")  # the copies keep their own settings
    torch.testing.assert_close(twin(**inputs).loss, expected)
    assert remove_scoring_rule(twin) and not is_scoring_rule_applied(twin)
    assert is_scoring_rule_applied(model)


# ----------------------------------------------------------------------------------------------
# gradient accumulation: one batch of 8 == 8 accumulated batches of 1 (num_items_in_batch)
# ----------------------------------------------------------------------------------------------


def test_trainer_sees_a_causal_loss_that_accepts_num_items(tmp_path):
    """GPT-2 has loss_type None: unpatched, Trainer would count position 0 into num_items_in_batch."""
    model = tiny_model("gpt2")
    before = dict(model.__dict__)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert not transformers.Trainer(model=model, args=args)._loss_shifts_labels
    handle = apply_scoring_rule(model, "brier")
    trainer = transformers.Trainer(model=model, args=args)
    assert trainer._loss_shifts_labels and trainer.model_accepts_loss_kwargs
    handle.remove()
    assert {k: v for k, v in model.__dict__.items() if k in ("loss_type", "accepts_loss_kwargs")} == {
        k: v for k, v in before.items() if k in ("loss_type", "accepts_loss_kwargs")
    }
    t5 = tiny_model("t5")
    apply_scoring_rule(t5, "brier")
    assert not transformers.Trainer(model=t5, args=args)._loss_shifts_labels  # seq2seq: every label counts


def _ragged_examples(kind: str, n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        t = 3 + i % 5
        ids = torch.randint(3, V, (1, t), generator=g)
        labels = ids.clone() if kind in CAUSAL else torch.randint(3, V, (1, 2 + i % 4), generator=g)
        labels[0, 0] = -100 if i % 3 == 0 else labels[0, 0]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _pad(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        width = max(e[key].shape[1] for e in examples)
        out[key] = torch.cat(
            [torch.nn.functional.pad(e[key], (0, width - e[key].shape[1]), value=fill) for e in examples]
        )
    return out


def _num_items(kind: str, labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] if kind in CAUSAL else labels).ne(-100).sum()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("path", ["apply", "loss_func"])
def test_gradient_accumulation_is_exact(kind, path):
    model = tiny_model(kind)
    examples = _ragged_examples(kind)
    full = _pad(examples)
    n_items = _num_items(kind, full["labels"])
    func = scoring_rule_loss_func("spherical", 0.1, model=model)
    handle = apply_scoring_rule(model, "spherical", 0.1) if path == "apply" else None

    def step(inputs):
        if handle is not None:
            return model(**inputs, num_items_in_batch=n_items).loss
        labels = inputs["labels"]
        rest = {k: v for k, v in inputs.items() if k != "labels"}
        if kind not in CAUSAL:
            rest["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        return func(model(**rest), labels, num_items_in_batch=n_items)

    big = step(full)
    big.backward()
    g_big = grads(model)
    small = sum(step(e).detach() for e in examples)
    for e in examples:
        step(e).backward()
    g_small = grads(model)
    torch.testing.assert_close(small, big.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(g_small, g_big, rtol=1e-4, atol=1e-6)
    # and num_items_in_batch matters: without it the 8 means would not add up
    if handle is not None:
        assert not torch.allclose(sum(model(**e).loss.detach() for e in examples), big.detach())


def _trainer_grads(tmp_path, model, data, batch_size, accumulation, compute_loss_func=None):
    class Capture(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    capture = Capture()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        max_grad_norm=0.0,
        dataloader_drop_last=False,
    )

    def collate(rows):
        return _pad([{k: torch.tensor([v]) for k, v in r.items()} for r in rows])

    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collate,
        callbacks=[capture],
        compute_loss_func=compute_loss_func,
    )
    trainer.train()
    return capture.grads


@pytest.mark.slow
@pytest.mark.parametrize("path", ["apply", "loss_func"])
def test_trainer_gradient_accumulation_matches_big_batch(tmp_path, path):
    data = [{k: v[0].tolist() for k, v in e.items()} for e in _ragged_examples("llama")]
    results = []
    for batch_size, accumulation in ((8, 1), (1, 8)):
        model = tiny_model("llama")
        model.train()
        if path == "apply":
            apply_scoring_rule(model, "brier", 0.1)
            results.append(_trainer_grads(tmp_path, model, data, batch_size, accumulation))
        else:
            func = scoring_rule_loss_func("brier", 0.1, model=model)
            results.append(_trainer_grads(tmp_path, model, data, batch_size, accumulation, func))
    # dropout is 0 in the tiny Llama, so both runs see the same function
    assert_grads_close(results[1], results[0], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# PEFT and TRL
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_model():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    inputs = batch("llama")
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
        ),
    )
    ref = reference_loss(model, "llama", inputs, "spherical", 0.1)
    ref.backward()
    g_ref = grads(model)
    handle = apply_scoring_rule(model, "spherical", 0.1)  # the outer (PEFT) model
    assert handle.fused
    loss = model(**inputs).loss
    torch.testing.assert_close(loss, ref, rtol=2e-6, atol=2e-6)
    loss.backward()
    g = grads(model)
    assert g and all("lora_" in name for name in g)
    assert_grads_close(g, g_ref)
    handle.remove()
    # patching the inner model before wrapping works too (PEFT calls it through __call__)
    inner = tiny_model("llama")
    apply_scoring_rule(inner, "spherical", 0.1)
    wrapped = peft.get_peft_model(inner, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert remove_scoring_rule(wrapped) is True  # found inside the wrapper
    inner_handle = apply_scoring_rule(inner, "spherical", 0.1)
    patched = wrapped(**inputs).loss
    inner_handle.remove()
    torch.testing.assert_close(patched, reference_loss(wrapped, "llama", inputs, "spherical", 0.1))
    # an adapter on the head: its weight alone is not the head, so fused mode refuses
    head_lora = peft.get_peft_model(tiny_model("llama-untied"), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="PEFT"):
        apply_scoring_rule(head_lora, "brier")
    h = apply_scoring_rule(head_lora, "brier", fused=False)
    torch.testing.assert_close(head_lora(**inputs).loss, reference_loss(head_lora, "llama", inputs, "brier", 0.0))
    h.remove()


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for i, w in enumerate("zero one two three four five six seven eight nine ten plus is".split()):
        vocab[w] = 3 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*compute_loss_func.*:FutureWarning")
def test_sft_trainer_trains_with_the_scoring_rule(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    words = "zero one two three four five six seven eight nine".split()
    rows = [
        {"prompt": f"{words[i % 10]} plus {words[(i * 3) % 10]} is", "completion": f" {words[(i + i * 3) % 10]} ten"}
        for i in range(16)
    ]
    model = tiny_model("llama")
    model.train()
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        max_length=32,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=_word_tokenizer()
    )
    handle = apply_scoring_rule(trainer.model, "spherical", 0.1)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    n_items = inputs["labels"][:, 1:].ne(-100).sum()
    assert 0 < n_items < inputs["labels"][:, 1:].numel()  # prompt tokens are masked
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=n_items)
    handle.remove()
    with torch.no_grad():
        logits = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    ref = scoring_rule_loss(logits[:, :-1], inputs["labels"][:, 1:], "spherical", 0.1, num_items_in_batch=n_items)
    torch.testing.assert_close(loss.detach(), ref, rtol=2e-6, atol=2e-6)
    # unfused mode speaks TRL's fused_lm_head protocol too
    with apply_scoring_rule(trainer.model, "spherical", 0.1, fused=False):
        unfused = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=n_items)
    torch.testing.assert_close(unfused.detach(), ref, rtol=2e-6, atol=2e-6)
    # the compute_loss_func path of SFTTrainer
    func_trainer = trl.SFTTrainer(
        model=tiny_model("llama"),
        args=args,
        processing_class=_word_tokenizer(),
        train_dataset=datasets.Dataset.from_list(rows),
        compute_loss_func=scoring_rule_loss_func("spherical", 0.1),
    )
    func_trainer.model.load_state_dict(trainer.model.state_dict())
    via_func = func_trainer.compute_loss(func_trainer.model, dict(inputs), num_items_in_batch=n_items)
    torch.testing.assert_close(via_func.detach(), ref, rtol=2e-6, atol=2e-6)

    handle = apply_scoring_rule(trainer.model, "spherical", 0.1)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(0 < x < 1 for x in losses)  # bounded rule: losses in [0, 1]
    assert all("mean_token_accuracy" in h for h in trainer.state.log_history if "loss" in h)
    handle.remove()
