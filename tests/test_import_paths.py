"""Every documented import path works: the names of ``properlm.__all__``, every public submodule, and every name that
``properlm.training``, ``properlm.integrations.transformers``, ``properlm.evaluation``, ``properlm.data`` and
``properlm.distributed`` held when each was a single module (issue 18 split them into subpackages; the package
``__init__`` files re-export the names, private helpers included), and every name of the former top-level modules
``properlm.metrics``, ``properlm.decoding`` and ``properlm.generation_eval`` (now the modules of
``properlm.evaluation`` under their old names)."""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import pytest

import properlm

#: the names defined in src/properlm/training.py before the split (its __all__, the other public names, then the
#: private helpers that tests and scripts may reach for)
TRAINING_ALL = [
    "EVAL_RULES",
    "LR_SCHEDULERS",
    "ConfigError",
    "TrainConfig",
    "average_checkpoints",
    "config_fields",
    "eval_rules",
    "find_checkpoints",
    "load_yaml_config",
    "make_config",
    "run_training",
    "validate_config",
    "write_training_record",
]
TRAINING_OTHER_PUBLIC = ["EpochSeededLengthGroupedSampler", "PAPER_SMOOTHING_WARN_VOCAB", "smoothing_warning"]
TRAINING_PRIVATE = [
    "_EVAL_CHUNK_ELEMENTS",
    "_CHECKPOINT_RE",
    "_opt",
    "_coerce",
    "_parse_schedule",
    "_check_precision",
    "_check_file",
    "_check_improper",
    "_weights_file",
    "_load_averaged",
    "_score_sums",
    "_make_trainer_class",
    "_score_metrics",
    "_metrics_callback",
    "_tensorboard_available",
    "_load_data",
    "_sampling_arguments",
    "_training_arguments",
    "_build_model",
    "_record_gguf_base",
    "_gguf_base_callback",
    "_training_record_callback",
    "_apply_lora",
    "_final_eval",
    "_warn_if_fsdp_ignored",
    "_vocab_size",
]

#: the same for src/properlm/integrations/transformers.py
TRANSFORMERS_ALL = [
    "ScoringRuleHandle",
    "ScoringRuleLossFunc",
    "apply_improper_loss",
    "apply_scoring_rule",
    "is_scoring_rule_applied",
    "linear_scoring_rule_loss",
    "remove_scoring_rule",
    "scoring_rule_loss_func",
]
TRANSFORMERS_PRIVATE = [
    "_HEAD_TRANSFORM_CONFIG",
    "_METRIC_CHUNK_ELEMENTS",
    "_LOGARITHMIC",
    "_fused_impl",
    "_align",
    "_check_aligned",
    "_config_of",
    "_is_encoder_decoder",
    "_text_config",
    "_Call",
    "_PatchState",
    "_trl_metrics",
    "_kwargs_from_args",
    "_ModelPreHook",
    "_HeadPreHook",
    "_ModelPostHook",
    "_with_loss",
    "_base_model",
    "_output_head",
    "_SOURCE_CACHE",
    "_class_source",
    "_reads_config",
    "_head_transform",
    "_check_fusable",
    "_restore_attrs",
    "_HOOK_TYPES",
    "_strip_hooks",
]

#: the same for src/properlm/evaluation.py
EVALUATION_ALL = [
    "DEFAULT_MAX_LENGTH",
    "DTYPES",
    "RESULTS_KIND",
    "EvalError",
    "EvalSettings",
    "LengthLimits",
    "ScoredHiddenStates",
    "format_value",
    "markdown_table",
    "mixed_precision",
    "parse_rules",
    "resolve_device",
    "resolve_languages",
    "resolve_lengths",
    "run_evaluation",
    "teacher_forced_metrics",
    "torch_dtype",
    "validate_decoding",
    "validate_new_token_cap",
    "validate_settings",
]
EVALUATION_PRIVATE = [
    "_check_output_dir",
    "_tqdm",
    "_versions",
    "_fit_temperature",
    "_tf_dict",
    "_config_seq2seq",
    "_json_safe",
    "_fmt",
    "_pct",
]

#: the same for src/properlm/metrics.py, src/properlm/decoding.py and src/properlm/generation_eval.py
METRICS_ALL = [
    "DEFAULT_NUM_BINS",
    "DEFAULT_TEMPERATURES",
    "CalibrationBin",
    "EvalMetrics",
    "MetricsAccumulator",
    "TemperatureFit",
    "TemperatureScan",
    "calibration_bins",
    "check_temperature",
    "expected_calibration_error",
    "perplexity",
    "reliability_diagram",
    "token_level_outputs",
]
METRICS_PRIVATE = [
    "_CHUNK_ELEMENTS",
    "_LOG",
    "_unique_rules",
    "_scored_rows",
    "_bin_index",
    "_check_bins",
    "_bins_from_sums",
    "_ece_from_sums",
    "_bin_sums",
    "_check_calibration_inputs",
    "_FLOAT32_MIN",
    "_hermite_max",
]
DECODING_ALL = ["ScoringRuleObjective", "all_token_scores"]
GENERATION_EVAL_ALL = [
    "ROUGE_TYPES",
    "DecodeStats",
    "check_new_token_cap",
    "decode_prompts",
    "decode_prompts_with_stats",
    "generation_metrics",
    "new_token_cap",
    "one_line",
    "rouge_per_example",
    "rouge_version",
    "summarization_metrics",
    "translation_metrics",
]
GENERATION_EVAL_PRIVATE = ["_LANG_CODES", "_pad_id", "_check_pairs"]

#: the same for src/properlm/data.py (now the package properlm.data)
DATA_ALL = [
    "IGNORE_INDEX",
    "INSTRUCTION_TEMPLATE",
    "INSTRUCTION_TEMPLATE_NO_INPUT",
    "SUMMARIZATION_TEMPLATE",
    "TASKS",
    "TRANSLATION_TEMPLATE",
    "DataCollator",
    "DataError",
    "Example",
    "build_prompt",
    "detect_task",
    "encode_prompt",
    "load_examples",
    "read_instruction_file",
    "read_parallel_files",
    "read_summarization_file",
    "split_validation",
    "tokenize_example",
    "tokenize_examples",
    "truncate_source",
]
DATA_PRIVATE = [
    "_REQUIRED",
    "_OPTIONAL",
    "_name",
    "_check_file",
    "_lines",
    "_json_records",
    "_json_array_records",
    "_record_fields",
    "_read_json_task",
    "_has_chat_template",
    "_plain_prompt",
    "_user_message",
    "_ids",
    "_source_field",
    "_cut_text",
    "_prompt_ids",
    "_target_ids",
]
#: the submodule of properlm.data that defines each of its names
DATA_MODULES = {
    "reading": [
        "TASKS",
        "DataError",
        "Example",
        "detect_task",
        "load_examples",
        "read_instruction_file",
        "read_parallel_files",
        "read_summarization_file",
        "split_validation",
        "_REQUIRED",
        "_OPTIONAL",
        "_name",
        "_check_file",
        "_lines",
        "_json_records",
        "_json_array_records",
        "_record_fields",
        "_read_json_task",
    ],
    "prompts": [
        "INSTRUCTION_TEMPLATE",
        "INSTRUCTION_TEMPLATE_NO_INPUT",
        "SUMMARIZATION_TEMPLATE",
        "TRANSLATION_TEMPLATE",
        "build_prompt",
        "truncate_source",
        "_has_chat_template",
        "_plain_prompt",
        "_user_message",
        "_ids",
        "_source_field",
        "_cut_text",
    ],
    "tokenization": [
        "IGNORE_INDEX",
        "encode_prompt",
        "tokenize_example",
        "tokenize_examples",
        "_prompt_ids",
        "_target_ids",
    ],
    "collate": ["DataCollator"],
}

#: the same for src/properlm/distributed.py (now the package properlm.distributed); its helpers are public names of
#: its modules (not re-exported), and the rows per chunk are properlm.options.chunk_rows
DISTRIBUTED_ALL = ["fused_linear_vocab_parallel_scoring_rule_loss", "vocab_parallel_scoring_rule_loss", "vocab_shard"]
DISTRIBUTED_OTHER = ["ProcessGroup"]
DISTRIBUTED_PRIVATE: list[str] = []
DISTRIBUTED_MODULES = {
    "layout": ["vocab_shard", "ProcessGroup"],
    "shard_stats": [],
    "unfused": ["vocab_parallel_scoring_rule_loss"],
    "fused": ["fused_linear_vocab_parallel_scoring_rule_loss"],
}

#: each former top-level module and the module of properlm.evaluation that it now is
FORMER_MODULES = {
    "properlm.metrics": "properlm.evaluation.metrics",
    "properlm.decoding": "properlm.evaluation.decoding",
    "properlm.generation_eval": "properlm.evaluation.generation",
}

#: properlm.integrations: its __all__ and the lazily resolved names
INTEGRATIONS = [
    "RuleSchedule",
    "RuleScheduleCallback",
    "ScoringRuleHandle",
    "ScoringRuleLossFunc",
    "apply_scoring_rule",
    "remove_scoring_rule",
    "scoring_rule_loss_func",
    "is_scoring_rule_applied",
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
    names = sorted(
        m.name
        for m in pkgutil.walk_packages(properlm.__path__, "properlm.")
        if not any(part.startswith("_") for part in m.name.split("."))
    )
    # the discovery finds the subpackages and their modules
    assert {
        "properlm.training",
        "properlm.training.run",
        "properlm.integrations.transformers",
        "properlm.integrations.transformers.patch",
        "properlm.cli.train",
        "properlm.fused.chunked",
        "properlm.evaluation",
        "properlm.evaluation.settings",
        "properlm.evaluation.lengths",
        "properlm.evaluation.teacher_forced",
        "properlm.evaluation.metrics",
        "properlm.evaluation.calibration",
        "properlm.evaluation.temperature",
        "properlm.evaluation.decoding",
        "properlm.evaluation.generation",
        "properlm.evaluation.text_metrics",
        "properlm.evaluation.run",
        "properlm.evaluation.report",
        "properlm.data",
        *(f"properlm.data.{m}" for m in DATA_MODULES),
        "properlm.distributed",
        *(f"properlm.distributed.{m}" for m in DISTRIBUTED_MODULES),
        *FORMER_MODULES,
    } <= set(names)
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            if name not in _OPTIONAL or (exc.name or "").split(".")[0] != _OPTIONAL[name]:
                failed.append(f"{name}: {exc!r}")
    assert not failed, failed


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("properlm.training", TRAINING_ALL + TRAINING_OTHER_PUBLIC + TRAINING_PRIVATE),
        ("properlm.integrations.transformers", TRANSFORMERS_ALL + TRANSFORMERS_PRIVATE),
        ("properlm.integrations", INTEGRATIONS),
        ("properlm.evaluation", EVALUATION_ALL + EVALUATION_PRIVATE),
        ("properlm.metrics", METRICS_ALL + METRICS_PRIVATE),
        ("properlm.decoding", DECODING_ALL),
        ("properlm.generation_eval", GENERATION_EVAL_ALL + GENERATION_EVAL_PRIVATE),
        ("properlm.data", DATA_ALL + DATA_PRIVATE),
        ("properlm.distributed", DISTRIBUTED_ALL + DISTRIBUTED_OTHER + DISTRIBUTED_PRIVATE),
    ],
)
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


def test_the_evaluation_package_and_the_former_modules_keep_their_all():
    import properlm.evaluation as evaluation

    assert evaluation.__all__ == EVALUATION_ALL
    for module, names in [
        ("properlm.evaluation", EVALUATION_ALL),
        ("properlm.metrics", METRICS_ALL),
        ("properlm.decoding", DECODING_ALL),
        ("properlm.generation_eval", GENERATION_EVAL_ALL),
    ]:
        assert importlib.import_module(module).__all__ == names
        star: dict[str, object] = {}
        exec(f"from {module} import *", star)
        assert set(star) - {"__builtins__"} == set(names), module


@pytest.mark.parametrize(("old", "new"), sorted(FORMER_MODULES.items()))
def test_a_former_module_is_the_new_module(old, new):
    """``import properlm.metrics``, the attribute ``properlm.metrics`` and ``importlib`` give the module of
    ``properlm.evaluation`` itself, not a copy of its names."""
    module = importlib.import_module(new)
    assert importlib.import_module(old) is module
    assert getattr(properlm, old.rsplit(".", 1)[1]) is module
    namespace: dict[str, object] = {}
    exec(f"import {old}", namespace)
    assert namespace["properlm"] is properlm and getattr(properlm, old.rsplit(".", 1)[1]) is module


def test_patching_a_former_module_reaches_the_code(monkeypatch):
    """``monkeypatch.setattr`` through an old name changes what the code reads: the chunk size of the metrics
    module is the one the temperature scan (now in its own module) uses; a function patched through
    ``properlm.generation_eval`` is the one its module's callers see."""
    import torch

    import properlm.metrics
    from properlm.evaluation import generation, metrics, temperature

    seen: list[int] = []
    original = temperature._scored_rows

    def spy(logits, labels, ignore_index):
        seen.append(temperature._metrics._CHUNK_ELEMENTS)
        return original(logits, labels, ignore_index)

    monkeypatch.setattr(temperature, "_scored_rows", spy)
    monkeypatch.setattr(properlm.metrics, "_CHUNK_ELEMENTS", 7)
    assert metrics._CHUNK_ELEMENTS == 7
    scan = temperature.TemperatureScan(temperatures=[0.5, 1.0, 2.0])
    scan.update(torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0]))
    assert seen == [7] and scan.compute().num_tokens == 5
    monkeypatch.setattr("properlm.generation_eval._pad_id", lambda tokenizer: 123)
    assert generation._pad_id(None) == 123


def test_pickles_naming_the_former_evaluation_modules_still_load():
    from properlm.evaluation import calibration, generation, metrics, settings, temperature

    for module, name, obj in [
        ("properlm.metrics", "CalibrationBin", calibration.CalibrationBin),
        ("properlm.metrics", "EvalMetrics", metrics.EvalMetrics),
        ("properlm.metrics", "TemperatureFit", temperature.TemperatureFit),
        ("properlm.generation_eval", "DecodeStats", generation.DecodeStats),
        ("properlm.evaluation", "EvalSettings", settings.EvalSettings),
    ]:
        assert pickle.loads(f"c{module}\n{name}\n.".encode()) is obj
    b = calibration.CalibrationBin(lower=0.0, upper=0.5, count=2, confidence=0.25, accuracy=0.5, gap=0.25)
    assert pickle.loads(pickle.dumps(b)) == b


@pytest.mark.parametrize(
    ("package", "names", "modules"),
    [
        ("properlm.data", DATA_ALL, DATA_MODULES),
        ("properlm.distributed", DISTRIBUTED_ALL, DISTRIBUTED_MODULES),
    ],
)
def test_data_and_distributed_keep_their_names_and_all(package, names, modules):
    """``properlm.data`` and ``properlm.distributed`` keep the ``__all__`` of the former modules, and each name (private
    helpers included) is the object of the submodule that now defines it, not a copy; every name of the former
    module is in one submodule."""
    pkg = importlib.import_module(package)
    assert pkg.__all__ == names
    star: dict[str, object] = {}
    exec(f"from {package} import *", star)
    assert set(star) - {"__builtins__"} == set(names)
    private = DATA_PRIVATE if package == "properlm.data" else [*DISTRIBUTED_PRIVATE, "ProcessGroup"]
    assert sorted(n for ns in modules.values() for n in ns) == sorted(names + private)
    for module, defined in modules.items():
        sub = importlib.import_module(f"{package}.{module}")
        for name in defined:
            assert _from_import(package, name) is getattr(sub, name), f"{package}.{name} is not {sub.__name__}.{name}"
            obj = getattr(sub, name)
            if callable(obj) and hasattr(obj, "__module__") and name != "ProcessGroup":
                assert obj.__module__ == sub.__name__, name
        assert set(getattr(sub, "__all__", ())) <= set(names), sub.__name__


def test_setting_chunk_elements_on_properlm_distributed_reaches_both_losses(monkeypatch):
    """``properlm.options.CHUNK_ELEMENTS`` sets the rows per chunk that both vocabulary-parallel losses use
    (``properlm.options.chunk_rows``, which the unfused and fused modules call)."""
    import properlm.options as pl_options
    from properlm.distributed import fused, unfused
    from properlm.options import CHUNK_ELEMENTS, chunk_rows

    assert unfused.chunk_rows is fused.chunk_rows is chunk_rows
    assert chunk_rows(1000) == max(1, CHUNK_ELEMENTS // 1000)
    monkeypatch.setattr(pl_options, "CHUNK_ELEMENTS", 3 * 7)
    assert chunk_rows(7) == 3 and chunk_rows(100) == 1 and chunk_rows(0) == 21


def test_pickles_naming_the_former_data_module_still_load():
    """An ``Example`` or a ``DataCollator`` pickled before the split names ``properlm.data``: it still loads."""
    from properlm.data import collate, reading

    for name, obj in [
        ("Example", reading.Example),
        ("DataError", reading.DataError),
        ("DataCollator", collate.DataCollator),
    ]:
        assert pickle.loads(f"cproperlm.data\n{name}\n.".encode()) is obj
    e = reading.Example("a", "b", "translation", {"source": "a"}, "x line 1")
    assert pickle.loads(pickle.dumps(e)) == e
    c = collate.DataCollator(pad_token_id=0, pad_to_multiple_of=8)
    assert pickle.loads(pickle.dumps(c)) == c
