"""Every documented import path works: the names of ``properlm.__all__``, every public submodule, and every name that
``properlm.training`` and ``properlm.integrations.transformers`` held when each was a single module (issue 18 split
them into subpackages; the package ``__init__`` files re-export the names, private helpers included)."""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import pytest

import properlm

#: the names defined in src/properlm/training.py before the split (its __all__, the other public names, then the
#: private helpers that tests and scripts may reach for)
TRAINING_ALL = [
    "EVAL_RULES", "LR_SCHEDULERS", "ConfigError", "TrainConfig", "average_checkpoints", "config_fields", "eval_rules",
    "find_checkpoints", "load_yaml_config", "make_config", "run_training", "validate_config", "write_training_record",
]
TRAINING_OTHER_PUBLIC = ["EpochSeededLengthGroupedSampler", "PAPER_SMOOTHING_WARN_VOCAB", "smoothing_warning"]
TRAINING_PRIVATE = [
    "_EVAL_CHUNK_ELEMENTS", "_CHECKPOINT_RE", "_opt", "_coerce", "_parse_schedule", "_check_precision", "_check_file",
    "_check_improper", "_weights_file", "_load_averaged", "_score_sums", "_make_trainer_class", "_score_metrics",
    "_metrics_callback", "_tensorboard_available", "_load_data", "_sampling_arguments", "_training_arguments",
    "_build_model", "_record_gguf_base", "_gguf_base_callback", "_training_record_callback", "_apply_lora",
    "_final_eval", "_warn_if_fsdp_ignored", "_vocab_size",
]

#: the same for src/properlm/integrations/transformers.py
TRANSFORMERS_ALL = [
    "ScoringRuleHandle", "ScoringRuleLossFunc", "apply_improper_loss", "apply_scoring_rule", "is_scoring_rule_applied",
    "linear_scoring_rule_loss", "remove_scoring_rule", "scoring_rule_loss_func",
]
TRANSFORMERS_PRIVATE = [
    "_HEAD_TRANSFORM_CONFIG", "_METRIC_CHUNK_ELEMENTS", "_LOGARITHMIC", "_fused_impl", "_align", "_check_aligned",
    "_config_of", "_is_encoder_decoder", "_text_config", "_Call", "_PatchState", "_trl_metrics", "_kwargs_from_args",
    "_ModelPreHook", "_HeadPreHook", "_ModelPostHook", "_with_loss", "_base_model", "_output_head", "_SOURCE_CACHE",
    "_class_source", "_reads_config", "_head_transform", "_check_fusable", "_restore_attrs", "_HOOK_TYPES",
    "_strip_hooks",
]

#: properlm.integrations: its __all__ and the lazily resolved names
INTEGRATIONS = [
    "RuleSchedule", "RuleScheduleCallback", "ScoringRuleHandle", "ScoringRuleLossFunc", "apply_scoring_rule",
    "remove_scoring_rule", "scoring_rule_loss_func", "is_scoring_rule_applied",
]

#: a module that needs an optional package, and that package: it may be missing where the extra is not installed
_OPTIONAL = {"properlm.fused.triton_kernels": "triton"}


def _from_import(module: str, name: str) -> object:
    """``from module import name``, as a user writes it."""
    namespace: dict[str, object] = {}
    exec(f"from {module} import {name}", namespace)
    return namespace[name]


def test_every_name_of_properlm_all_imports():
    assert len(properlm.__all__) == len(set(properlm.__all__)) >= 20
    for name in properlm.__all__:
        assert _from_import("properlm", name) is getattr(properlm, name)


def test_every_public_submodule_imports():
    names = sorted(m.name for m in pkgutil.walk_packages(properlm.__path__, "properlm.")
                   if not any(part.startswith("_") for part in m.name.split(".")))
    # the discovery finds the subpackages and their modules
    assert {"properlm.training", "properlm.training.run", "properlm.integrations.transformers",
            "properlm.integrations.transformers.patch", "properlm.cli.train", "properlm.fused.chunked"} <= set(names)
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            if name not in _OPTIONAL or (exc.name or "").split(".")[0] != _OPTIONAL[name]:
                failed.append(f"{name}: {exc!r}")
    assert not failed, failed


@pytest.mark.parametrize(("module", "names"), [
    ("properlm.training", TRAINING_ALL + TRAINING_OTHER_PUBLIC + TRAINING_PRIVATE),
    ("properlm.integrations.transformers", TRANSFORMERS_ALL + TRANSFORMERS_PRIVATE),
    ("properlm.integrations", INTEGRATIONS),
])
def test_names_of_the_former_modules_import(module, names):
    missing = []
    for name in names:
        try:
            _from_import(module, name)
        except ImportError:
            missing.append(name)
    assert not missing, f"no longer importable from {module}: {missing}"


def test_the_packages_keep_their_all():
    import properlm.integrations.transformers as integ
    import properlm.training as training

    assert training.__all__ == TRAINING_ALL
    assert integ.__all__ == TRANSFORMERS_ALL
    star: dict[str, object] = {}
    exec("from properlm.training import *", star)
    assert set(star) - {"__builtins__"} == set(TRAINING_ALL)


def test_the_reexported_names_are_the_objects_the_code_uses():
    """A re-export is the submodule's own object (a class, a function, the mutable cache), not a copy."""
    import properlm.integrations.transformers as integ
    import properlm.training as training
    from properlm.integrations.transformers import heads, hooks, linear, patch
    from properlm.training import run, scores, validation

    assert training.run_training is run.run_training
    assert training._score_sums is scores._score_sums
    assert training._EVAL_CHUNK_ELEMENTS == scores._EVAL_CHUNK_ELEMENTS
    assert training.smoothing_warning is validation.smoothing_warning
    assert integ._SOURCE_CACHE is heads._SOURCE_CACHE
    assert integ._fused_impl is linear._fused_impl
    assert integ._HOOK_TYPES == (hooks._ModelPreHook, hooks._ModelPostHook, hooks._HeadPreHook)
    assert properlm.apply_scoring_rule is integ.apply_scoring_rule is patch.apply_scoring_rule
    from properlm.integrations import apply_scoring_rule

    assert apply_scoring_rule is patch.apply_scoring_rule


def test_pickles_naming_the_former_modules_still_load():
    """A pickled patched model (its hooks) or sampler names its classes by the module they were defined in: the
    references written before the split (``properlm.integrations.transformers._ModelPreHook``) still resolve."""
    from properlm.integrations.transformers import hooks
    from properlm.training import sampler

    for module, name, obj in [
        ("properlm.integrations.transformers", "_ModelPreHook", hooks._ModelPreHook),
        ("properlm.integrations.transformers", "_HeadPreHook", hooks._HeadPreHook),
        ("properlm.integrations.transformers", "_ModelPostHook", hooks._ModelPostHook),
        ("properlm.integrations.transformers", "_PatchState", hooks._PatchState),
        ("properlm.training", "EpochSeededLengthGroupedSampler", sampler.EpochSeededLengthGroupedSampler),
    ]:
        assert pickle.loads(f"c{module}\n{name}\n.".encode()) is obj
