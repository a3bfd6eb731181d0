"""The documented import paths work, and only those are promised.

Every name of every public module's ``__all__`` imports from it (``properlm.__all__`` included), ``from m import *``
gives exactly that ``__all__``, every public submodule imports, the application packages re-export no private name of
another module, and the objects a user pickles (a patched model's hooks, a sampler, examples, settings, results)
round-trip through ``pickle`` under their defining module.
"""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import types

import pytest

import properlm

#: a module that needs an optional package, and that package: it may be missing where the extra is not installed
OPTIONAL = {"properlm.fused.triton_kernels": "triton"}

#: the application packages: their modules import no private name of another module, and their ``__init__`` files
#: re-export public names only
APPLICATION = (
    "properlm.cli",
    "properlm.data",
    "properlm.evaluation",
    "properlm.integrations",
    "properlm.models",
    "properlm.training",
)


def _public_modules() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.walk_packages(properlm.__path__, "properlm.")
        if not any(part.startswith("_") for part in m.name.split("."))
    )


def _import(name: str) -> types.ModuleType | None:
    """The module ``name``; ``None`` for an optional module whose package is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if name in OPTIONAL and (exc.name or "").split(".")[0] == OPTIONAL[name]:
            return None
        raise


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
    names = _public_modules()
    # the discovery finds the subpackages and their modules
    assert {
        "properlm.training",
        "properlm.training.run",
        "properlm.integrations.transformers",
        "properlm.cli.train",
        "properlm.fused.chunked",
        "properlm.evaluation",
        "properlm.evaluation.metrics",
        "properlm.data",
        "properlm.distributed",
    } <= set(names)
    failed = []
    for name in names:
        try:
            _import(name)
        except ImportError as exc:
            failed.append(f"{name}: {exc!r}")
    assert not failed, failed


@pytest.mark.parametrize("module", _public_modules())
def test_every_name_of_a_modules_all_imports(module):
    mod = _import(module)
    if mod is None:
        pytest.skip(f"{module} needs {OPTIONAL[module]}")
    names = getattr(mod, "__all__", None)
    if names is None:
        return
    assert len(names) == len(set(names)), f"{module}.__all__ has duplicates"
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ names what it does not define: {missing}"
    star: dict[str, object] = {}
    exec(f"from {module} import *", star)
    assert set(star) - {"__builtins__"} == set(names)


@pytest.mark.parametrize("package", APPLICATION)
def test_the_application_packages_reexport_no_private_name(package):
    """A name that starts with one underscore is used inside its own module only: a package ``__init__`` (or any
    module) of the application packages holds no private object that another properlm module defines."""
    offenders = []
    for name in _public_modules():
        if name != package and not name.startswith(package + "."):
            continue
        mod = _import(name)
        if mod is None:
            continue
        for attr, obj in vars(mod).items():
            if not attr.startswith("_") or attr.startswith("__"):
                continue
            if not isinstance(obj, (type, types.FunctionType)):
                continue  # a constant's origin is not recorded; the AST scan of the source covers them
            home = obj.__module__
            if home.startswith("properlm") and home != name:
                offenders.append(f"{name}.{attr} (from {home})")
    assert not offenders, offenders


def test_the_package_all_lists_are_kept():
    import properlm.data as data
    import properlm.evaluation as evaluation
    import properlm.integrations.transformers as integ
    import properlm.training as training

    assert "run_training" in training.__all__ and "TrainConfig" in training.__all__
    assert "run_evaluation" in evaluation.__all__ and "EvalSettings" in evaluation.__all__
    assert "apply_scoring_rule" in integ.__all__ and "load_examples" in data.__all__
    assert properlm.apply_scoring_rule is integ.apply_scoring_rule
    from properlm.integrations import apply_scoring_rule
    from properlm.integrations.transformers import patch

    assert apply_scoring_rule is patch.apply_scoring_rule


def test_pickled_classes_load_by_their_defining_module():
    """A pickle names a class by ``__module__`` and ``__qualname__``: both resolve to the class, for the objects that
    are pickled in practice (a patched model carries its hooks; checkpoints carry samplers, examples, collators;
    evaluation results carry dataclasses)."""
    from properlm.data import DataCollator, DataError, Example
    from properlm.evaluation import EvalSettings
    from properlm.evaluation.calibration import CalibrationBin
    from properlm.evaluation.generation import DecodeStats
    from properlm.evaluation.metrics import EvalMetrics
    from properlm.evaluation.temperature import TemperatureFit
    from properlm.integrations.transformers.hooks import HeadPreHook, ModelPostHook, ModelPreHook, PatchState
    from properlm.training.sampler import EpochSeededLengthGroupedSampler

    for cls in [
        ModelPreHook,
        HeadPreHook,
        ModelPostHook,
        PatchState,
        EpochSeededLengthGroupedSampler,
        Example,
        DataError,
        DataCollator,
        CalibrationBin,
        EvalMetrics,
        TemperatureFit,
        DecodeStats,
        EvalSettings,
    ]:
        assert pickle.loads(f"c{cls.__module__}\n{cls.__qualname__}\n.".encode()) is cls
        assert not cls.__qualname__.startswith("_"), cls
    e = Example("a", "b", "translation", {"source": "a"}, "x line 1")
    assert pickle.loads(pickle.dumps(e)) == e
    c = DataCollator(pad_token_id=0, pad_to_multiple_of=8)
    assert pickle.loads(pickle.dumps(c)) == c
    b = CalibrationBin(lower=0.0, upper=0.5, count=2, confidence=0.25, accuracy=0.5, gap=0.25)
    assert pickle.loads(pickle.dumps(b)) == b


def test_patching_the_metrics_chunk_size_reaches_the_temperature_scan(monkeypatch):
    """``properlm.evaluation.metrics.CHUNK_ELEMENTS`` is read at call time by the temperature scan too."""
    import torch

    from properlm.evaluation import metrics, temperature

    seen: list[int] = []
    original = metrics.scored_rows

    def spy(logits, labels, ignore_index):
        seen.append(metrics.CHUNK_ELEMENTS)
        return original(logits, labels, ignore_index)

    monkeypatch.setattr(temperature, "scored_rows", spy)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 7)
    scan = temperature.TemperatureScan(temperatures=[0.5, 1.0, 2.0])
    scan.update(torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0]))
    assert seen == [7] and scan.compute().num_tokens == 5


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


@pytest.mark.parametrize("package", APPLICATION)
def test_no_private_name_crosses_a_module_boundary(package):
    """No module of the application packages imports a ``_name`` from another module (``from .x import _y``)."""
    import ast
    from pathlib import Path

    root = Path(properlm.__file__).parent
    folder = root.joinpath(*package.split(".")[1:])
    offenders = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("properlm")):
                offenders += [
                    f"{path.relative_to(root)}:{node.lineno} {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not offenders, offenders
