"""A results archive: the small outputs of a benchmark's finished steps, kept apart from its work directory.

A reproduction study can take longer than the machine it runs on lives (the work directory,
with its model weights and checkpoints, may not survive to the next machine). The archive keeps,
for every finished step, what the report is made of (``results.json``, ``hypotheses.txt``,
``metrics.jsonl``, ...) and nothing heavy (no model weights, no ``final/`` or ``checkpoint-*``
directories, no figure, no file over :data:`MAX_FILE_BYTES`), in a directory small enough to commit
(``ARCHIVE/<step's path inside the work directory>/...``), with the work directory's
``settings.json`` beside it.

On a new machine :meth:`ResultsArchive.restore` copies finished steps back into an empty (or
partial) work directory, so the benchmark skips them and the report covers them. A step is
restored only together with every step that depends on it, directly or not: a finished training
run is restored only when all of its evaluations are archived too (its weights are not: an
evaluation still to run needs the model, so the run trains again, and so do the steps after it).

Typical use, inside a benchmark's main flow::

    archive = ResultsArchive(args.archive, work)
    archive.check_settings(settings, keys)   # refuse an archive made with other settings
    archive.restore(steps)                   # steps: (name, output_dir, deps) in plan order
    ... after each step finishes: archive.save(output_dir)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["MAX_FILE_BYTES", "SKIPPED_SUFFIXES", "ArchivedStep", "ResultsArchive", "small_files"]

#: files larger than this are never archived (model weights, optimizer states, large logs)
MAX_FILE_BYTES = 4 * 1024 * 1024
#: files with these endings are never archived, whatever their size: weights of any format, and the
#: per-step figures (reliability diagrams), which their ``results.json`` can redraw
SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npz", ".tfevents", ".png")

#: (step name, output directory, names of the steps it depends on); ``None`` for a step with no
#: output directory of its own (a choice recorded in a file of the work directory, which
#: :meth:`ResultsArchive.restore_file` brings back first): it is never restored itself, and it cuts
#: the lineage: the steps after it need its record, not the outputs of the steps before it (a choice
#: once recorded is not made again), so a step that also needs those outputs (an evaluation of the
#: chosen candidate) names them among its own dependencies
ArchivedStep = tuple[str, "str | None", Iterable[str]]


def _skipped_dir(name: str) -> bool:
    return name == "final" or name.startswith("checkpoint-") or name in ("runs", "__pycache__")


def small_files(directory: str) -> list[str]:
    """The files of ``directory`` (paths relative to it, sorted) that an archive keeps: not inside
    ``final/``, ``checkpoint-*/`` or ``runs/`` (TensorBoard), not weights (:data:`SKIPPED_SUFFIXES`),
    at most :data:`MAX_FILE_BYTES` each."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not _skipped_dir(d))
        for name in files:
            path = os.path.join(root, name)
            if (
                name.endswith(SKIPPED_SUFFIXES)
                or ".tfevents." in name
                or os.path.islink(path)
                or os.path.getsize(path) > MAX_FILE_BYTES
            ):
                continue
            out.append(os.path.relpath(path, directory))
    return sorted(out)


def _copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically (a temporary file renamed into place)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".archive-", dir=os.path.dirname(dst))
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class ResultsArchive:
    """The archive directory ``root`` of the work directory ``work`` (see the module docstring).

    A step is *finished* in a directory when its output directory there holds ``results.json``
    (the convention of :func:`_runner.run_step`); the archive copies that file last, so an
    interrupted copy never looks finished.
    """

    def __init__(self, root: str, work: str) -> None:
        self.root = os.path.abspath(root)
        self.work = os.path.abspath(work)
        if (
            self.root == self.work
            or self.root.startswith(self.work + os.sep)
            or self.work.startswith(self.root + os.sep)
        ):
            raise ValueError(f"the archive {self.root} and the work directory {self.work} must not contain each other")

    def _rel(self, out: str) -> str:
        rel = os.path.relpath(os.path.abspath(out), self.work)
        if rel == os.curdir or rel.startswith(os.pardir):
            raise ValueError(f"{out} is not inside the work directory {self.work}")
        return rel

    def _archived(self, out: str) -> str:
        return os.path.join(self.root, self._rel(out))

    def finished(self, out: str) -> bool:
        """Whether the step with output directory ``out`` (in the work directory) is archived as finished."""
        return os.path.isfile(os.path.join(self._archived(out), "results.json"))

    # -------------------------------------------------------------------- settings

    def check_settings(self, settings: dict[str, Any], keys: Sequence[str] | None = None) -> None:
        """Refuse (``ValueError`` naming the differences) an archive whose ``settings.json``
        differs from ``settings`` in one of ``keys`` (default: every key of ``settings``); record
        ``settings`` when the archive has none yet."""
        path = os.path.join(self.root, "settings.json")
        keys = list(settings) if keys is None else list(keys)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            diff = {k: (saved.get(k), settings.get(k)) for k in keys if saved.get(k) != settings.get(k)}
            if diff:
                raise ValueError(
                    f"the archive {self.root} holds results made with other settings "
                    f"(option: (archived, now)) {diff}; use the same options or another archive"
                )
            return
        os.makedirs(self.root, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)

    # -------------------------------------------------------------------- save / restore

    def save(self, out: str) -> list[str]:
        """Archive the small files of the finished step ``out`` (``results.json`` last); nothing
        when it has not finished. Returns the archived paths (relative to ``out``)."""
        if not os.path.isfile(os.path.join(out, "results.json")):
            return []
        files = small_files(out)
        dst = self._archived(out)
        for rel in sorted(files, key=lambda r: r == "results.json"):
            _copy(os.path.join(out, rel), os.path.join(dst, rel))
        return files

    def save_file(self, rel: str) -> bool:
        """Archive the file ``WORK/rel`` (a timings or manifest file of the whole study), if it exists."""
        src = os.path.join(self.work, rel)
        if not os.path.isfile(src):
            return False
        _copy(src, os.path.join(self.root, rel))
        return True

    def restore_file(self, rel: str) -> bool:
        """Copy ``ARCHIVE/rel`` to ``WORK/rel`` when the work directory has no such file."""
        src, dst = os.path.join(self.root, rel), os.path.join(self.work, rel)
        if os.path.isfile(dst) or not os.path.isfile(src):
            return False
        _copy(src, dst)
        return True

    def restorable(self, steps: Sequence[ArchivedStep]) -> list[str]:
        """The names of the steps (plan order) that :meth:`restore` would copy back.

        A step is restored when it is archived as finished and not finished in the work directory,
        every step depending on it (transitively) is archived as finished (or finished in the work
        directory), and so is every step it depends on (transitively) that the work directory has
        not finished: so a run that must run again (its weights are not archived) brings back none
        of the evaluations of its earlier self, which it would then contradict. Lineages pass
        through steps with an output directory only (see :data:`ArchivedStep`): a branch trained
        on a recorded choice is restored whatever becomes of the runs the choice was made from.
        """
        outs = {name: out for name, out, _ in steps}
        # a step without an output directory (a recorded choice) is no link of any lineage
        parents = {name: {d for d in deps if outs.get(d) is not None} for name, _, deps in steps}
        children: dict[str, set[str]] = {name: set() for name in outs}
        for name, ps in parents.items():
            for d in ps:
                children[d].add(name)

        def reach(name: str, edges: dict[str, set[str]]) -> set[str]:
            seen, todo = set(), [name]
            while todo:
                for n in edges[todo.pop()]:
                    if n not in seen:
                        seen.add(n)
                        todo.append(n)
            return seen

        def in_work(name: str) -> bool:
            out = outs[name]
            return out is not None and os.path.isfile(os.path.join(out, "results.json"))

        def settled(name: str) -> bool:  # nothing to keep, finished in the work directory, or archived
            out = outs[name]
            return out is None or in_work(name) or self.finished(out)

        def whole(name: str) -> bool:  # archived, with everything after it archived or finished
            out = outs[name]
            return out is not None and self.finished(out) and all(settled(n) for n in reach(name, children))

        return [
            name
            for name in outs
            if not in_work(name)
            and whole(name)
            and all(outs[a] is None or in_work(a) or whole(a) for a in reach(name, parents))
        ]

    def waiting(self, steps: Sequence[ArchivedStep]) -> list[str]:
        """The names of the steps (plan order) archived as finished that are neither finished in the work
        directory nor :meth:`restorable`: they wait for the rest of their lineage (e.g. a run whose later
        evaluation never finished will run again), so a report made now leaves them out."""
        chosen = set(self.restorable(steps))
        return [
            name
            for name, out, _ in steps
            if out is not None
            and self.finished(out)
            and name not in chosen
            and not os.path.isfile(os.path.join(out, "results.json"))
        ]

    def restore(self, steps: Sequence[ArchivedStep]) -> list[str]:
        """Copy the :meth:`restorable` steps back into the work directory (``results.json``
        last); returns their names."""
        outs = {name: out for name, out, _ in steps}
        chosen = self.restorable(steps)
        for name in chosen:
            out = outs[name]
            assert out is not None
            src = self._archived(out)
            for rel in sorted(small_files(src), key=lambda r: r == "results.json"):
                _copy(os.path.join(src, rel), os.path.join(out, rel))
        return chosen

    def save_all(self, steps: Sequence[ArchivedStep]) -> list[str]:
        """Archive every finished step of ``steps`` not archived yet (e.g. a work directory run
        without an archive); returns their names."""
        saved = []
        for name, out, _ in steps:
            if out is not None and not self.finished(out) and self.save(out):
                saved.append(name)
        return saved
