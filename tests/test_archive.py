"""``benchmarks/_archive.py``: what a results archive keeps, what it restores (a step only with
every step after it) and its settings check."""

from __future__ import annotations

import json
import os

import pytest

import _archive
from _archive import ResultsArchive, small_files


def _finish(out, **files):
    os.makedirs(out, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"done": os.path.basename(out)}, f)


def test_small_files_leave_out_weights_checkpoints_and_large_files(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for rel in (
        "results.json",
        "metrics.jsonl",
        "sub/hypotheses.txt",
        "final/config.json",
        "checkpoint-5/trainer_state.json",
        "model.safetensors",
        "runs/x/events.out.tfevents.1.host",
        "big.txt",
        "reliability.png",
    ):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("x" * (100 if rel == "big.txt" else 3))
    monkeypatch.setattr(_archive, "MAX_FILE_BYTES", 50)
    assert small_files(str(run)) == ["metrics.jsonl", "results.json", os.path.join("sub", "hypotheses.txt")]


def test_restore_only_steps_whose_dependents_are_all_archived(tmp_path):
    work, root = tmp_path / "work", tmp_path / "archive"
    outs = {name: str(work / name) for name in ("a/train", "a/fit", "a/test", "b/train", "b/fit", "b/test", "u/test")}
    steps = [
        ("a/train", outs["a/train"], ()),
        ("a/fit", outs["a/fit"], ("a/train",)),
        ("a/test", outs["a/test"], ("a/fit",)),
        ("b/train", outs["b/train"], ()),
        ("b/fit", outs["b/fit"], ("b/train",)),
        ("b/test", outs["b/test"], ("b/fit",)),
        ("u/test", outs["u/test"], ()),
    ]
    archive = ResultsArchive(str(root), str(work))
    for name in ("a/train", "a/fit", "a/test", "b/train", "b/fit", "u/test"):  # b/test never finished
        _finish(outs[name], **{"hypotheses.txt": name})
    (work / "a" / "train" / "final").mkdir()
    (work / "a" / "train" / "final" / "model.safetensors").write_text("weights")
    assert sorted(archive.save_all(steps)) == ["a/fit", "a/test", "a/train", "b/fit", "b/train", "u/test"]
    assert archive.save_all(steps) == []  # nothing new
    assert not (root / "a" / "train" / "final").exists()

    new = tmp_path / "new"
    fresh = ResultsArchive(str(root), str(new))
    new_steps = [(n, o.replace(str(work), str(new)), d) for n, o, d in steps]
    # b/train and b/fit are finished, but b/test is not: b's model is needed, so b runs again, and
    # b/fit, though archived, is not restored (it would be the fit of b's earlier self)
    assert fresh.restorable(new_steps) == ["a/train", "a/fit", "a/test", "u/test"]
    assert fresh.restore(new_steps) == ["a/train", "a/fit", "a/test", "u/test"]
    assert (new / "a" / "test" / "hypotheses.txt").read_text() == "a/test"
    assert json.loads((new / "a" / "train" / "results.json").read_text()) == {"done": "train"}
    assert not (new / "b").exists()
    assert fresh.waiting(new_steps) == ["b/train", "b/fit"]  # archived, left out until b/test is archived too
    assert fresh.restore(new_steps) == []  # finished in the work directory now


def test_a_recorded_choice_cuts_the_lineage(tmp_path):
    """A choice recorded in a work-level file (``out`` None) is never restored itself, and the steps
    after it need its record, not the runs before it: a branch of another seed trained on the choice
    is restored without the candidates it was chosen from, and they without it; a step that also
    needs the candidates' outputs names them."""
    work, root = tmp_path / "work", tmp_path / "archive"
    outs = {name: str(work / name) for name in ("a1", "cand", "e1", "a2", "b2", "e2")}
    steps = [
        ("a1", outs["a1"], ()),
        ("cand", outs["cand"], ("a1",)),
        ("select", None, ("cand",)),
        ("e1", outs["e1"], ("select", "cand")),  # the chosen candidate's evaluation
        ("a2", outs["a2"], ()),
        ("b2", outs["b2"], ("a2", "select")),
        ("e2", outs["e2"], ("b2",)),
    ]
    archive = ResultsArchive(str(root), str(work))
    for name in ("a1", "cand", "e1", "a2", "b2"):
        _finish(outs[name])
    archive.save_all(steps)
    new = tmp_path / "new"
    moved = [(n, None if o is None else o.replace(str(work), str(new)), d) for n, o, d in steps]
    fresh = ResultsArchive(str(root), str(new))
    # b2's evaluation is missing: a2 and b2 run again; seed 1's lineage is whole, whatever b2 becomes
    assert fresh.restorable(moved) == ["a1", "cand", "e1"]
    _finish(outs["e2"])
    archive.save_all(steps)
    assert fresh.restorable(moved) == ["a1", "cand", "e1", "a2", "b2", "e2"]
    # without the candidate's weights (not archived, so it trains again) its evaluation is not restored
    (root / "cand" / "results.json").unlink()
    assert fresh.restorable(moved) == ["a2", "b2", "e2"]


def test_settings_are_recorded_then_checked(tmp_path):
    archive = ResultsArchive(str(tmp_path / "archive"), str(tmp_path / "work"))
    archive.check_settings({"steps": 100, "arms": ["a"]}, ["steps"])
    archive.check_settings({"steps": 100, "arms": ["b"]}, ["steps"])  # arms are not compared
    with pytest.raises(ValueError, match=r"other settings .*'steps': \(100, 200\)"):
        archive.check_settings({"steps": 200}, ["steps"])


def test_archive_and_work_directory_must_be_apart(tmp_path):
    with pytest.raises(ValueError, match="must not contain each other"):
        ResultsArchive(str(tmp_path / "work" / "archive"), str(tmp_path / "work"))
    archive = ResultsArchive(str(tmp_path / "archive"), str(tmp_path / "work"))
    with pytest.raises(ValueError, match="not inside the work directory"):
        archive.finished(str(tmp_path / "elsewhere"))
