"""Improper baselines (properlm.improper): DFT and 1 - p. Float64 references of value and gradient, the
gradient identity, impropriety, low-precision input, TRL's loss_type="dft", the model patch and
``properlm train --improper-loss``."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

import properlm
from properlm import (
    IMPROPER_OBJECTIVES,
    DFTLoss,
    OneMinusPLoss,
    apply_improper_loss,
    dft_loss,
    get_improper_objective,
    one_minus_p_loss,
    scoring_rule_loss,
)

LOSSES = {"dft": dft_loss, "one-minus-p": one_minus_p_loss}


def reference(logits, target, name, ignore_index=-100, reduction="mean", num_items_in_batch=None):
    """Float64 reference from torch.log_softmax (independent of properlm's statistics)."""
    logp_all = torch.log_softmax(logits.double(), dim=-1)
    valid = target != ignore_index
    logp = logp_all.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    per_token = -logp * p.detach() if name == "dft" else 1.0 - p
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    denom = valid.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return per_token.sum() / denom


def _inputs(shape, V=11, seed=0, ignore_index=-100, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, V, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(V, shape, generator=g)
    flat = target.view(-1)
    flat[::3] = ignore_index  # every third position ignored
    return logits, target


# ------------------------------------------------------------------------------------- value and gradient


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("shape", [(7,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize(
    "reduction, num_items", [("mean", None), ("mean", 9), ("mean", "tensor"), ("sum", None), ("none", None)]
)
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_value_and_gradient_match_the_float64_reference(name, shape, reduction, num_items, ignore_index):
    logits, target = _inputs(shape, ignore_index=ignore_index)
    if num_items == "tensor":
        num_items = torch.tensor(13)
    x = logits.clone().requires_grad_(True)
    out = LOSSES[name](x, target, ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items)
    x_ref = logits.clone().requires_grad_(True)
    ref = reference(x_ref, target, name, ignore_index, reduction, num_items)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (gx,) = torch.autograd.grad(out, x, upstream)
    (gr,) = torch.autograd.grad(ref, x_ref, upstream)
    torch.testing.assert_close(gx, gr, rtol=1e-10, atol=1e-12)
    ignored = target == ignore_index
    assert ignored.any() and bool((gx[ignored] == 0).all())  # no gradient at ignored positions
    if reduction == "none":
        assert bool((out[ignored] == 0).all())


def test_modules_and_the_name_table():
    logits, target = _inputs((2, 5), dtype=torch.float32)
    torch.testing.assert_close(DFTLoss()(logits, target), dft_loss(logits, target))
    torch.testing.assert_close(
        OneMinusPLoss(reduction="sum")(logits, target, 4), one_minus_p_loss(logits, target, reduction="sum")
    )
    torch.testing.assert_close(DFTLoss()(logits, target, 4), dft_loss(logits, target, num_items_in_batch=4))
    assert repr(OneMinusPLoss(ignore_index=0)) == "OneMinusPLoss(ignore_index=0, reduction='mean')"
    assert set(IMPROPER_OBJECTIVES) == {"dft", "one-minus-p"}
    for name, fn in LOSSES.items():
        obj = get_improper_objective(name)
        assert obj.name == name and get_improper_objective(obj) is obj
        torch.testing.assert_close(obj(logits, target, reduction="none"), fn(logits, target, reduction="none"))
    with pytest.raises(ValueError, match=r"unknown improper objective 'nll'; allowed: 'dft', 'one-minus-p'"):
        get_improper_objective("nll")
    # outside the scoring-rule registry
    for name in ("dft", "one-minus-p"):
        with pytest.raises(ValueError, match="unknown scoring rule"):
            properlm.get_rule(name)
        assert name not in properlm.available_rules()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"num_items_in_batch": 0}, "num_items_in_batch must be positive"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    logits, target = _inputs((4,), dtype=torch.float32)
    for fn in LOSSES.values():
        with pytest.raises(ValueError, match=message):
            fn(logits, target, **kwargs)
    with pytest.raises(ValueError, match="shape mismatch"):
        dft_loss(logits, target[:2])
    with pytest.raises(ValueError, match="outside"):
        one_minus_p_loss(logits, torch.full((4,), 11))
    with pytest.raises(ValueError, match="integer token ids"):
        dft_loss(logits, target.float())


# ------------------------------------------------------------------------------------- the gradient identity


def test_dft_and_one_minus_p_have_the_same_gradient():
    """grad(-log p * sg(p)) = -sg(p) grad log p = -grad p = grad(1 - p): in float64, to rounding;
    and it is -p_y (onehot(y) - softmax(z))."""
    logits, target = _inputs((3, 6), V=17, seed=3)
    grads = {}
    for name, fn in LOSSES.items():
        x = logits.clone().requires_grad_(True)
        fn(x, target, reduction="sum").backward()
        grads[name] = x.grad
    assert torch.equal(grads["dft"], grads["one-minus-p"])  # exact, not only to rounding
    valid = (target != -100).unsqueeze(-1)
    soft = torch.softmax(logits, -1)
    onehot = torch.nn.functional.one_hot(target.clamp(min=0), 17).double()
    p_y = (soft * onehot).sum(-1, keepdim=True)
    closed_form = torch.where(valid, -p_y * (onehot - soft), 0.0)
    torch.testing.assert_close(grads["dft"], closed_form, rtol=1e-12, atol=1e-15)
    # the values differ: only the reported loss tells them apart
    assert not torch.allclose(dft_loss(logits, target), one_minus_p_loss(logits, target))


# ------------------------------------------------------------------------------------- impropriety


def _expected_loss(fn, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """E_q L(p) = sum_k q_k L(p, k) for one distribution p (V,) scored against every outcome k."""
    V = q.numel()
    logits = p.log().expand(V, V)
    return (q * fn(logits, torch.arange(V), reduction="none")).sum()


@pytest.mark.parametrize("name", list(LOSSES))
def test_expected_loss_is_not_minimised_at_q(name):
    """Improper: from p = q, moving p towards the one-hot on argmax q lowers E_q L(p); the minimum
    over the simplex is that one-hot (1 - max q for 1 - p, 0 for DFT's value). The log score
    (proper) is minimised at q, and only its expected gradient vanishes there."""
    fn = LOSSES[name]
    q = torch.softmax(torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0)
    mode = torch.nn.functional.one_hot(q.argmax(), 6).double()
    at_q = _expected_loss(fn, q, q)
    values = [at_q]
    for t in (0.5, 0.9, 0.999):
        values.append(_expected_loss(fn, (1 - t) * q + t * mode, q))
    assert all(b < a for a, b in itertools.pairwise(values)), values
    near_one_hot = _expected_loss(fn, (1 - 1e-9) * mode + 1e-9 * q, q)
    minimum = 1 - q.max() if name == "one-minus-p" else torch.tensor(0.0, dtype=torch.float64)
    torch.testing.assert_close(near_one_hot, minimum, rtol=0, atol=1e-7)
    if name == "one-minus-p":  # linear in p: no p on the simplex does better than the one-hot
        for seed in range(5):
            p = torch.softmax(torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 0)
            assert _expected_loss(fn, p, q) >= minimum
    # the expected gradient in the logits at p = q is not zero (the log score's is), and a descent
    # step raises the probability of the mode
    V = 6
    z = q.log().expand(V, V).clone().requires_grad_(True)
    (q * fn(z, torch.arange(V), reduction="none")).sum().backward()
    g = z.grad.sum(0)  # all rows are the same logits
    z_log = q.log().expand(V, V).clone().requires_grad_(True)
    (q * scoring_rule_loss(z_log, torch.arange(V), "logarithmic", reduction="none")).sum().backward()
    assert float(z_log.grad.sum(0).abs().max()) < 1e-12
    assert float(g.abs().max()) > 1e-3
    stepped = torch.softmax(q.log() - 0.5 * g, 0)
    assert stepped[q.argmax()] > q.max()


# ------------------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_half_precision_inputs_compute_in_float32(name, dtype):
    logits, target = _inputs((3, 8), V=257, seed=2, dtype=torch.float32)
    logits = (logits * 10).to(dtype)  # large logits: tiny p, overflow-prone in half precision
    x = logits.clone().requires_grad_(True)
    out = LOSSES[name](x, target)
    out.backward()
    assert out.dtype == torch.float32 and bool(torch.isfinite(out))
    assert x.grad.dtype == dtype and bool(torch.isfinite(x.grad.float()).all())
    ref = reference(logits.double(), target, name)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    per_token = LOSSES[name](logits, target, reduction="none")
    assert per_token.dtype == torch.float32 and bool(torch.isfinite(per_token).all())


# ------------------------------------------------------------------------------------- Hugging Face, TRL

V = 50


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _tiny_t5(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=V,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(cfg).eval()


def _batch(seed=1, b=3, t=6, causal=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    labels = ids.clone() if causal else torch.randint(3, V, (b, t), generator=g)
    labels[0, -2:] = -100
    labels[-1, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_apply_improper_loss_fused_and_unfused_match_the_functional_loss(kind, name):
    model = _tiny_llama() if kind == "llama" else _tiny_t5()
    inputs = _batch(causal=kind == "llama")
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    if kind == "t5":
        kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
    logits = model(**kwargs).logits
    z, y = (logits[:, :-1], inputs["labels"][:, 1:]) if kind == "llama" else (logits, inputs["labels"])
    ref = LOSSES[name](z, y, num_items_in_batch=7)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for fused in (True, False):
        with apply_improper_loss(model, name, fused=fused) as handle:
            assert handle.improper_loss == name and f"improper_loss={name!r}" in repr(handle)
            loss = model(**inputs, num_items_in_batch=7).loss
            loss.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for n, g in ref_grads.items():
            torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-4, atol=1e-6, msg=n)
        model.zero_grad(set_to_none=True)
    # removed: the model's own loss (cross-entropy) again
    ce = scoring_rule_loss(z, y, "logarithmic")
    torch.testing.assert_close(model(**inputs).loss, ce, rtol=1e-5, atol=1e-6)


def test_patched_state_survives_deepcopy_and_pickle():
    import copy
    import pickle

    model = _tiny_llama()
    inputs = _batch()
    apply_improper_loss(model, "one-minus-p")
    expected = model(**inputs).loss
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(**inputs).loss, expected)
    assert properlm.remove_scoring_rule(model)


def _word_tokenizer():
    transformers = pytest.importorskip("transformers")
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
def test_dft_equals_trl_sft_trainer_loss_type_dft(tmp_path):
    """TRL's SFTTrainer(loss_type="dft").compute_loss equals dft_loss on the model's logits (with and
    without num_items_in_batch), and the fused patch equals it under TRL's fused_lm_head protocol."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    words = "zero one two three four five six seven eight nine".split()
    rows = [
        {"prompt": f"{words[i % 10]} plus {words[(i * 3) % 10]} is", "completion": f" {words[(i + i * 3) % 10]} ten"}
        for i in range(8)
    ]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        loss_type="dft",
        max_steps=1,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        max_length=32,
    )
    trainer = trl.SFTTrainer(
        model=_tiny_llama(),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=_word_tokenizer(),
    )
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels = inputs["labels"]
    n_items = labels[:, 1:].ne(-100).sum()
    assert 0 < n_items < labels[:, 1:].numel()  # prompt tokens are masked
    with torch.no_grad():
        logits = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    for num_items in (n_items, None):
        trl_loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=num_items)
        ours = dft_loss(logits[:, :-1], labels[:, 1:], num_items_in_batch=num_items)
        torch.testing.assert_close(trl_loss.detach(), ours, rtol=2e-6, atol=2e-6)
    # our patch answering TRL's fused_lm_head call (TRL's nll loss then reads our per-token loss)
    trainer.args.loss_type = "nll"
    with apply_improper_loss(trainer.model, "dft"):
        patched = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=n_items)
    torch.testing.assert_close(
        patched.detach(), dft_loss(logits[:, :-1], labels[:, 1:], num_items_in_batch=n_items), rtol=2e-6, atol=2e-6
    )


# ------------------------------------------------------------------------------------- properlm train


WORDS = "zero one two three four five six seven eight nine".split()


def _alpaca(directory, n=16):
    path = directory / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(
                json.dumps({"instruction": "Spell the number.", "input": str(i % 10), "output": WORDS[i % 10]}) + "\n"
            )
    return str(path)


def _train_args(data, out, *extra):
    return [
        "train",
        "--init",
        "tiny-gpt",
        "--train-file",
        data,
        "--vocab-size",
        "270",
        "--hidden-size",
        "16",
        "--num-layers",
        "1",
        "--num-heads",
        "2",
        "--max-length",
        "32",
        "--per-device-train-batch-size",
        "4",
        "--max-steps",
        "2",
        "--logging-steps",
        "1",
        "--learning-rate",
        "1e-2",
        "--lr-scheduler",
        "constant",
        "--dropout",
        "0",
        "--seed",
        "0",
        "--no-progress-bar",
        "--no-tensorboard",
        "--output-dir",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_train_cli_improper_loss_records_it_and_matches_the_gradient_identity(tmp_path, capsys):
    from safetensors.torch import load_file

    from properlm.cli.main import main
    from properlm.models import TRAINING_RECORD

    data = _alpaca(tmp_path)
    runs = {}
    for name in ("dft", "one-minus-p"):
        out = tmp_path / name
        assert (
            main(_train_args(data, out, "--improper-loss", name, "--validation-fraction", "0.25", "--eval-steps", "2"))
            == 0
        )
        stdout = capsys.readouterr().out
        notice = [line for line in stdout.splitlines() if "improper objective" in line]
        assert len(notice) == 1 and f"'{name}'" in notice[0] and "not a proper scoring rule" in notice[0]
        results = json.loads((out / "results.json").read_text())
        assert results["config"]["improper_loss"] == name and results["rule_stages"] == [[name, 2]]
        record = json.loads((out / "final" / TRAINING_RECORD).read_text())
        assert record["improper_loss"] == name
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if "loss" in m]
        assert len(losses) == 2 and {m["rule"] for m in metrics} == {name}
        runs[name] = (losses, load_file(str(out / "final" / "model.safetensors")), results)
    # the held-out loss is the objective's; the proper rules' scores are still reported (and the same,
    # as the weights are)
    ev_dft, ev_omp = runs["dft"][2]["eval"], runs["one-minus-p"][2]["eval"]
    assert 0 < ev_dft["eval_loss"] < 1 and 0 < ev_omp["eval_loss"] < 1
    assert ev_dft["eval_loss"] != pytest.approx(ev_omp["eval_loss"], rel=1e-3)
    for key in ("eval_score_logarithmic", "eval_score_brier", "eval_score_spherical"):
        assert ev_dft[key] == pytest.approx(ev_omp[key], rel=1e-5)
    # the same data and seed give the same gradients, hence the same weights, but other loss values
    (dft_losses, dft_w, _), (omp_losses, omp_w, _) = runs["dft"], runs["one-minus-p"]
    assert all(0 < x < 1 for x in omp_losses) and dft_losses[0] != pytest.approx(omp_losses[0], rel=1e-3)
    for key, w in dft_w.items():
        torch.testing.assert_close(omp_w[key], w, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_train_yaml_improper_loss_seq2seq(tmp_path):
    from properlm.training import make_config, run_training

    src, tgt = tmp_path / "train.src", tmp_path / "train.tgt"
    src.write_text("\n".join(str(i) for i in range(16)) + "\n", encoding="utf-8")
    tgt.write_text("\n".join(WORDS[i % 10] for i in range(16)) + "\n", encoding="utf-8")
    cfg = make_config(
        {
            "init": "tiny-seq2seq",
            "source-file": str(src),
            "target-file": str(tgt),
            "vocab_size": 270,
            "hidden_size": 16,
            "num_layers": 1,
            "num_heads": 2,
            "max_length": 16,
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "improper_loss": "one-minus-p",
            "fused": False,
            "output_dir": str(tmp_path / "s2s"),
            "tensorboard": False,
            "progress_bar": False,
        }
    )
    results = run_training(cfg, quiet=True)
    assert results["seq2seq"] and results["rule_stages"] == [["one-minus-p", 2]]
    losses = [
        json.loads(line)["loss"] for line in open(os.path.join(cfg.output_dir, "metrics.jsonl")) if '"loss"' in line
    ]
    assert len(losses) == 2 and all(0 < x < 1 for x in losses)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--schedule", "logarithmic:1,brier:1"], "--improper-loss dft cannot be combined with --schedule"),
        (["--smoothing", "0.1"], "--improper-loss dft cannot be combined with --smoothing 0.1"),
        (["--smoothing-variant", "gated"], "--improper-loss dft cannot be combined with --smoothing-variant gated"),
        (["--rule", "brier"], "give either --rule or --improper-loss, not both"),
    ],
)
def test_bad_combinations_fail_before_anything_is_loaded(tmp_path, capsys, extra, message):
    from properlm.cli.main import main

    out = tmp_path / "o"
    assert main(_train_args(_alpaca(tmp_path), out, "--improper-loss", "dft", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out / "tokenizer")


def test_unknown_improper_loss_is_refused(tmp_path, capsys):
    from properlm.cli.main import main
    from properlm.training import ConfigError, make_config, validate_config

    with pytest.raises(SystemExit):
        main(_train_args(_alpaca(tmp_path), tmp_path / "o", "--improper-loss", "nll"))
    assert "invalid choice: 'nll'" in capsys.readouterr().err
    cfg = make_config({"init": "tiny-gpt", "train_file": _alpaca(tmp_path), "improper_loss": "nll"})
    with pytest.raises(ConfigError, match="--improper-loss must be one of dft, one-minus-p, got 'nll'"):
        validate_config(cfg)
