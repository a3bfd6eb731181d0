"""The model source of a command (``--model``, ``--gguf-file`` or ``--init``), checked before anything is loaded.

A mistyped path is refused at once (with a near name when there is one), and the output directory of
``properlm train`` is answered with the model directories it holds.
"""

from __future__ import annotations

import difflib
import os

from .errors import ModelLoadError
from .gguf import gguf_location
from .tiny import INIT_CONFIGS

__all__ = ["check_model_source", "looks_like_a_path", "training_run_hint"]


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
