"""Tests of benchmarks/reproduce_summ.py on tiny generated email data with a tiny model.

End to end: (a), (b), (c) train and evaluate (ROUGE single- and multi-reference, token scores,
ECE, both beam objectives), the branches start from (a)'s step-T1 checkpoint, their smoothing is
selected on the held-out slice of train (the chosen candidate is the seed's run), every run holds
out the same slice of train, a rerun skips every finished step, and --test-file scores the final
models later without retraining. Without training: the chooser, the planned commands before and
after a (fake) finished selection, an explicit --smoothing that skips it, the selection slice
disjoint from what properlm train trains on, and a report of partial results."""

from __future__ import annotations

import json
import os
import random

import pytest

import _runner
import _stats
import reproduce_summ

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

TOPICS = ["gas", "power", "budget", "legal", "trading", "meeting"]
FILLER = ["please", "review", "the", "attached", "file", "thanks", "call", "me", "today", "about"]


def _rows(n: int, rng: random.Random, annotations: bool) -> list[dict]:
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        body = " ".join([topic] + [rng.choice(FILLER) for _ in range(rng.randint(4, 30))] + [topic, "report"])
        row = {"id": f"x{i}", "document": body, "summary": f"{topic} report"}
        if annotations:
            row["annotations"] = [f"{topic} update", "report", f"the {topic}"]
        rows.append(row)
    return rows


def _write(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _write_data(root: str) -> str:
    rng = random.Random(0)
    _write(os.path.join(root, "train.jsonl"), _rows(48, rng, False))
    _write(os.path.join(root, "dev.jsonl"), _rows(6, rng, True))
    return _write(os.path.join(root, "extra_emails.jsonl"), _rows(5, rng, False))


TINY = [
    "--seeds",
    "3",
    "--t1",
    "4",
    "--t2",
    "2",
    "--save-every",
    "2",
    "--eval-every",
    "2",
    "--warmup-steps",
    "2",
    "--batch-size",
    "8",
    "--vocab-size",
    "300",
    "--hidden-size",
    "16",
    "--num-layers",
    "1",
    "--num-heads",
    "2",
    "--ffn-size",
    "32",
    "--max-source-length",
    "24",
    "--heldout-fraction",
    "0.1",
    "--num-beams",
    "2",
    "--max-new-tokens",
    "4",
    "--eval-batch-size",
    "6",
    "--bootstrap-samples",
    "20",
]


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.setattr(_runner, "IN_PROCESS", True)


def _json(*parts: str) -> dict:
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def test_reproduce_summ_end_to_end_resume_and_later_test_file(tmp_path, capsys, in_process):
    data, work = str(tmp_path / "data"), str(tmp_path / "work")
    os.makedirs(data)
    extra = _write_data(data)
    assert reproduce_summ.main([data, "--work-dir", work, *TINY]) == 0
    assert "[run ]" in capsys.readouterr().out

    # the selection: seed 3 branched once per eps of the default grid, each decoded on the held-out slice
    chosen = {}
    for p in ("b", "c"):
        sel = _json(work, f"selection_{p}.json")
        assert sel["seed"] == 3 and sel["grid"] == [0.0, 0.1] and [r["smoothing"] for r in sel["rows"]] == [0.0, 0.1]
        for r in sel["rows"]:
            ev = _json(work, "seed3", f"{p}_eps{r['smoothing']:g}", "eval_heldout_beam_logarithmic", "results.json")
            assert r["selection_score"] == pytest.approx(
                sum(ev["generation"][k] for k in ("rouge1", "rouge2", "rougeL")) / 3
            )
            assert ev["num_examples"] == r["num_examples"]
        scores = {r["smoothing"]: r["selection_score"] for r in sel["rows"]}
        assert sel["chosen"] == reproduce_summ.choose_smoothing(scores)
        chosen[p] = sel["chosen"]
        other = 0.1 if sel["chosen"] == 0.0 else 0.0
        # the chosen candidate is seed 3's run (decoded on dev); the other one is not
        assert os.path.isfile(
            os.path.join(work, "seed3", f"{p}_eps{chosen[p]:g}", "eval_dev_beam_logarithmic", "results.json")
        )
        assert not os.path.exists(os.path.join(work, "seed3", f"{p}_eps{other:g}", "eval_dev_beam_logarithmic"))
        assert _json(work, "seed3", f"{p}_eps{other:g}", "results.json")["config"]["smoothing"] == other
    run = {"a": "a", "b": f"b_eps{chosen['b']:g}", "c": f"c_eps{chosen['c']:g}"}

    md = open(os.path.join(work, "results.md"), encoding="utf-8").read()
    for p in "abc":  # the default protocols (a0, the control, is not one)
        assert f"| {reproduce_summ.PROTOCOLS[p].label} | 1 |" in md
    assert "(a0)" not in md
    assert "R-L multi" in md and "best over each example's references" in md and "sign test p" in md
    assert os.path.getsize(os.path.join(work, "training_curves.png")) > 0
    assert "smoothing chosen on the held-out training slice" in md and "**chosen**" in md
    summary = _json(work, "results.json")
    assert summary["smoothing"]["a"] == 0.1
    assert {p: summary["smoothing"][p] for p in "bc"} == chosen
    assert summary["smoothing"]["selection_examples"] == len(open(os.path.join(work, "heldout.jsonl")).readlines())
    row_b = summary["per_seed"]["b"]["3"]
    assert row_b["smoothing"] == chosen["b"]
    assert {
        "rouge1_dev_logarithmic",
        "rougeL_multi_dev_logarithmic",
        "rouge2_dev_spherical",
        "rougeL_multi_dev_spherical",
        "score_logarithmic_dev",
        "score_brier_dev",
        "score_spherical_dev",
        "ece_dev",
    } <= set(row_b)
    assert row_b["rouge1_multi_dev_logarithmic"] >= row_b["rouge1_dev_logarithmic"] - 1e-9
    assert "rouge-score" in row_b["rouge_settings"]
    for p in ("b", "c"):
        for name in ("rouge1", "rouge2", "rougeL", "rouge1_multi", "rougeL_multi"):
            cmp = summary["comparisons"][f"{p}_dev_{name}"]
            assert cmp["seeds"] == [3] and 0 <= cmp["sign_test_p"] <= 1
            assert len(cmp["bootstrap"]) == 1 and 0 < cmp["bootstrap"][0]["p"] <= 1
            assert cmp["delta"][0] == pytest.approx(
                summary["per_seed"][p]["3"][f"{name}_dev_logarithmic"]
                - summary["per_seed"]["a"]["3"][f"{name}_dev_logarithmic"]
            )
            # the bootstrap's document-level mean difference is the ROUGE difference itself
            assert cmp["bootstrap"][0]["delta"] == pytest.approx(cmp["delta"][0], abs=1e-9)
    assert summary["checkpoint_t1"]["3"]["rouge1"] is not None

    # the branches trained T1 steps of log (copied from a), then T2 of their rule, from a's checkpoint
    res = {p: _json(work, "seed3", run[p], "results.json") for p in "abc"}
    assert {p: r["config"]["smoothing"] for p, r in res.items()} == {"a": 0.1, **chosen}
    assert res["b"]["rule_stages"] == [["logarithmic", 4], ["brier", 2]]
    assert res["c"]["rule_stages"] == [["logarithmic", 4], ["spherical", 2]]
    assert res["b"]["resumed_from"].endswith("checkpoint-4") and res["c"]["global_step"] == 6
    log_a, log_b = (_runner.read_log(os.path.join(work, "seed3", run[p], "metrics.jsonl")) for p in "ab")
    assert [r for r in log_b if r["step"] <= 4] == [r for r in log_a if r["step"] <= 4]
    assert {r["rule"] for r in log_b if r["step"] > 4} == {"brier"}
    # every run holds out the same slice of train (5 of 48) and cuts documents at 24 tokens, as evaluate does
    assert {r["num_validation_examples"] for r in res.values()} == {5}
    assert res["a"]["config"]["validation_seed"] == 0 and res["a"]["config"]["max_source_length"] == 24
    ev = _json(work, "seed3", run["b"], "eval_dev_beam_logarithmic", "results.json")
    assert ev["truncation"]["max_source_length"] == 24 and ev["truncation"]["max_length"] == 25
    assert ev["truncation"]["max_source_length_from"].startswith("training run")
    assert ev["truncation"]["num_sources_cut"] >= 1
    assert os.path.isfile(os.path.join(work, "seed3", run["c"], "final", "model.safetensors"))

    # a rerun skips every finished step and rebuilds the same report: the slice, 1 + 2 x 2 trains, 4 held-out
    # decodings, 2 selections, 3 x 2 dev decodings, a's checkpoint
    assert reproduce_summ.main([data, "--work-dir", work, *TINY]) == 0
    out = capsys.readouterr().out
    assert "[run ]" not in out and out.count("[skip]") == 1 + 5 + 4 + 2 + 3 * 2 + 1
    assert open(os.path.join(work, "results.md"), encoding="utf-8").read() == md

    # --test-file later: only the new decodings run; the final models are reused
    assert reproduce_summ.main([data, "--work-dir", work, *TINY, "--test-file", extra]) == 0
    out = capsys.readouterr().out
    assert out.count("[run ]") == 3 and "train ..." not in out
    summary = _json(work, "results.json")
    assert "rouge1_extra_emails_logarithmic" in summary["per_seed"]["a"]["3"]
    assert "b_extra_emails_rougeL" in summary["comparisons"]
    assert "b_extra_emails_rougeL_multi" not in summary["comparisons"]  # that file has no annotations
    assert f"--test-file {extra}" in open(os.path.join(work, "results.md"), encoding="utf-8").read()

    # --archive: the finished steps' small outputs (no weights) go to DIR; a new work directory gets
    # them back (with the selection records), so nothing trains or decodes again
    archive, work2 = str(tmp_path / "archive"), str(tmp_path / "work2")
    assert reproduce_summ.main([data, "--work-dir", work, *TINY, "--test-file", extra, "--archive", archive]) == 0
    out = capsys.readouterr().out
    assert "0 finished step(s) restored" in out and "[run ]" not in out
    assert os.path.isfile(os.path.join(archive, "selection_b.json"))
    assert os.path.isfile(os.path.join(archive, "seed3", run["b"], "eval_dev_beam_logarithmic", "hypotheses.txt"))
    assert not [f for _, _, fs in os.walk(archive) for f in fs if f.endswith(".safetensors")]
    assert reproduce_summ.main([data, "--work-dir", work2, *TINY, "--test-file", extra, "--archive", archive]) == 0
    out = capsys.readouterr().out
    assert "[run ]" not in out and "finished step(s) restored" in out
    before = _json(work, "results.json")["per_seed"]
    assert _json(work2, "results.json")["per_seed"] == before
    # --report-only from the archive alone (no action step runs: no held-out slice file) gives the same tables
    work3 = str(tmp_path / "work3")
    argv3 = [data, "--work-dir", work3, *TINY, "--test-file", extra, "--archive", archive, "--report-only"]
    assert reproduce_summ.main(argv3) == 0
    capsys.readouterr()
    assert not os.path.exists(os.path.join(work3, "heldout.jsonl"))
    tables = [open(os.path.join(w, "results.md"), encoding="utf-8").read() for w in (work, work3)]
    assert tables[1] == tables[0] and "not written yet" not in tables[1]


def test_control_a0_continues_a_with_smoothing_0_from_its_checkpoint(tmp_path, capsys, in_process):
    """(a0), the control of the switch: (a) continued from its own step-T1 checkpoint with the branches' smoothing
    (0), no selection; (a), (b), (c) are compared against it too."""
    data, work = str(tmp_path / "data"), str(tmp_path / "work")
    os.makedirs(data)
    _write_data(data)
    argv = [data, "--work-dir", work, *TINY, "--smoothing", "0", "--protocols", "a,a0,c"]
    assert reproduce_summ.main(argv) == 0
    a0 = _json(work, "seed3", "a0_eps0", "results.json")
    assert a0["config"]["smoothing"] == 0.0 and a0["resumed_from"].endswith("checkpoint-4")
    assert a0["rule_stages"] == [["logarithmic", 6]] and a0["global_step"] == 6
    log_a, log_a0 = (_runner.read_log(os.path.join(work, "seed3", d, "metrics.jsonl")) for d in ("a", "a0_eps0"))
    assert [r for r in log_a0 if r["step"] <= 4] == [r for r in log_a if r["step"] <= 4]
    summary = _json(work, "results.json")
    assert summary["smoothing"]["a0"] == 0.0
    cmp = summary["comparisons"]["vs_a0_c_dev_rouge1"]
    assert cmp["delta"][0] == pytest.approx(
        summary["per_seed"]["c"]["3"]["rouge1_dev_logarithmic"]
        - summary["per_seed"]["a0"]["3"]["rouge1_dev_logarithmic"]
    )
    assert "vs_a0_a_dev_rouge1" in summary["comparisons"] and "c_dev_rouge1" in summary["comparisons"]
    md = open(os.path.join(work, "results.md"), encoding="utf-8").read()
    assert "| (a0) log → log, smoothing 0 after T1 | 1 |" in md and "| vs (a0) |" in md
    with pytest.raises(SystemExit, match="include a"):
        reproduce_summ.main([data, "--work-dir", str(tmp_path / "w2"), *TINY, "--protocols", "a0"])


def test_archive_restores_a_finished_seed_while_a_later_seed_runs(tmp_path):
    """The plan's lineages for ``--archive``: the first seed (its (a), the candidates the smoothing
    was chosen from, the chosen one's decodings) comes back while the second seed's branches have
    not run; the recorded choice, not the candidates' weights, is what the later branches need."""
    from _archive import ResultsArchive

    data, work, root = tmp_path / "data", tmp_path / "work", tmp_path / "archive"
    os.makedirs(data)
    _write_data(str(data))
    args = reproduce_summ.build_parser().parse_args([str(data), "--work-dir", str(work), *TINY, "--seeds", "1,2"])
    reproduce_summ.check_args(args)
    os.makedirs(root)
    for p in "bc":
        _write(os.path.join(root, f"selection_{p}.json"), [{"protocol": p, "seed": 1, "chosen": 0.0}])
    archive = ResultsArchive(str(root), str(work))
    for p in "bc":
        assert archive.restore_file(f"selection_{p}.json")
    steps = _runner.archive_steps(str(work), reproduce_summ.plan(args))
    later = {n for n, _, _ in steps if n.startswith(("train 2b", "train 2c", "eval 2b", "eval 2c"))}
    assert len(later) == 2 * (1 + 2)  # seed 2: (b), (c) and their two dev decodings each
    for name, out, _ in steps:
        if out is not None and name not in later:
            _finish_archived(root, work, out)
    restored = set(archive.restorable(steps))
    second_a = {"train 2a", "eval 2a dev logarithmic", "eval 2a dev spherical", "checkpoint 2a"}
    assert restored == {n for n, out, _ in steps if out is not None} - later - second_a
    assert {"train 1a", "train 1b eps0", "eval 1b dev logarithmic", "eval 1c dev spherical"} <= restored
    # a candidate that must train again takes the chosen branch's decodings with it (they are of its weights)
    os.remove(os.path.join(root, "seed1", "b_eps0.1", "results.json"))
    restored = set(archive.restorable(steps))
    assert not {n for n in restored if n.startswith(("train 1", "eval 1", "checkpoint 1", "heldout 1"))}


def _finish_archived(root, work, out) -> None:
    d = os.path.join(str(root), os.path.relpath(out, str(work)))
    os.makedirs(d, exist_ok=True)
    _write(os.path.join(d, "results.json"), [{"done": True}])


def test_reproduce_summ_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="lacks train.jsonl, dev.jsonl"):
        reproduce_summ.main([str(tmp_path), "--work-dir", str(tmp_path / "w")])
    _write_data(str(tmp_path))
    with pytest.raises(SystemExit, match="allowed values are a, b, c"):
        reproduce_summ.main([str(tmp_path), "--protocols", "a,d"])
    with pytest.raises(SystemExit, match="include a"):
        reproduce_summ.main([str(tmp_path), "--protocols", "b"])
    with pytest.raises(SystemExit, match="multiple of --save-every"):
        reproduce_summ.main([str(tmp_path), "--t1", "10", "--save-every", "3"])
    with pytest.raises(SystemExit, match="no such file"):
        reproduce_summ.main([str(tmp_path), "--test-file", str(tmp_path / "nope.jsonl")])
    with pytest.raises(SystemExit, match="the name 'dev' is taken"):
        reproduce_summ.main([str(tmp_path), "--test-file", str(tmp_path / "dev.jsonl")])
    with pytest.raises(SystemExit, match="exceeds the model's 17 positions"):
        reproduce_summ.main([str(tmp_path), "--max-source-length", "16", "--max-new-tokens", "20"])
    with pytest.raises(SystemExit, match="--smoothing must be in"):
        reproduce_summ.main([str(tmp_path), "--smoothing", "1"])


def test_paired_bootstrap_means():
    base = [0.1 * (i % 7) for i in range(200)]
    same = _stats.paired_bootstrap_means(base, base, n_samples=200)
    assert same["delta"] == 0 and same["p"] == 1.0
    gain = [0.05 + 0.01 * (i % 3) for i in range(200)]
    better = _stats.paired_bootstrap_means(base, [b + g for b, g in zip(base, gain)], n_samples=200)
    assert better["delta"] == pytest.approx(sum(gain) / 200) and better["p"] == pytest.approx(2 / 201)
    assert better["ci95"][0] <= better["delta"] <= better["ci95"][1]
    noisy = [b + (0.3 if i % 2 else -0.3) for i, b in enumerate(base)]  # mean difference 0 +- noise
    assert _stats.paired_bootstrap_means(base, noisy, n_samples=200)["p"] > 0.5
    worse = _stats.paired_bootstrap_means(base, [b - 0.05 for b in base], n_samples=100)
    assert worse["delta"] < 0 and worse["p"] == pytest.approx(2 / 101)
    with pytest.raises(ValueError, match="paired scores needed"):
        _stats.paired_bootstrap_means([1.0], [1.0, 2.0])


def test_choose_smoothing_best_score_ties_to_the_smaller_eps():
    choose = reproduce_summ.choose_smoothing
    assert choose({0.0: 10.0, 0.1: 12.5}) == 0.1
    assert choose({0.1: 12.5, 0.0: 13.0, 0.05: 12.9}) == 0.0
    assert choose({0.1: 11.0, 0.0: 11.0}) == 0.0  # a tie: the smaller eps, whatever the order
    assert choose({0.2: 11.0, 0.05: 11.0 - 1e-12, 0.0: 10.0}) == 0.05  # within the tolerance is a tie
    assert choose({0.0: float("nan"), 0.1: 3.0}) == 0.1  # a NaN never wins
    with pytest.raises(ValueError, match="no finite selection score"):
        choose({0.0: float("nan")})
    assert reproduce_summ.parse_grid("0.1, 0") == [0.0, 0.1]
    for bad, msg in (
        ("0,x", "numbers expected"),
        ("", "names no value"),
        ("0,1", r"in \[0, 1\)"),
        ("0.1,0.10", "repeats"),
    ):
        with pytest.raises(ValueError, match=msg):
            reproduce_summ.parse_grid(bad)


def _dry_run(data: str, work: str, capsys, *extra: str) -> list[str]:
    capsys.readouterr()
    assert reproduce_summ.main([data, "--work-dir", work, *TINY, "--seeds", "1,2", *extra, "--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()


def _line(lines: list[str], start: str) -> str:
    found = [line for line in lines if line.startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


def _fake_selection(work: str, protocol: str, chosen: float, scores: dict[float, float]) -> None:
    rows = [
        {
            "smoothing": e,
            "rouge1": s,
            "rouge2": s,
            "rougeL": s,
            "selection_score": s,
            "score_logarithmic": -2.0,
            "score_brier": -0.5,
            "score_spherical": 0.4,
            "num_examples": 5,
        }
        for e, s in scores.items()
    ]
    os.makedirs(work, exist_ok=True)
    _write(
        os.path.join(work, f"selection_{protocol}.json"),
        [{"seed": 1, "grid": sorted(scores), "rows": rows, "chosen": chosen}],
    )


def test_reproduce_summ_plans_the_selection_before_the_seed_runs(tmp_path, capsys):
    data, work = str(tmp_path / "data"), str(tmp_path / "work")
    os.makedirs(data)
    _write_data(data)
    lines = _dry_run(data, work, capsys)
    # seed 1 branches once per candidate eps and decodes each on the held-out slice; seed 2 waits for the choice
    assert _line(lines, "[dry-run] heldout slice:")
    for p, label in (("b", "(b) log → brier"), ("c", "(c) log → spherical")):
        for eps in ("0", "0.1"):
            train = _line(lines, f"[dry-run] seed 1 {label} train, smoothing {eps} (selection):")
            assert f"--smoothing {eps} " in train and f"--output-dir {work}/seed1/{p}_eps{eps} " in train
            assert "--validation-fraction 0.1 --validation-seed 0" in train
            ev = _line(lines, f"[dry-run] seed 1 {p} smoothing {eps} heldout beam-logarithmic:")
            assert f"--data-file {work}/heldout.jsonl" in ev and f"{work}/seed1/{p}_eps{eps}/final" in ev
        assert _line(lines, f"[dry-run] select {p}:")
        seed2 = _line(lines, f"[dry-run] seed 2 {label} train:")
        assert "--smoothing CHOSEN" in seed2 and f"seed2/{p}_epsCHOSEN" in seed2
    a = _line(lines, "[dry-run] seed 2 (a) log → log train:")
    assert "--smoothing 0.1 " in a and f"--output-dir {work}/seed2/a " in a
    assert not any("dev.jsonl" in line for line in lines if "heldout" in line or "selection" in line)
    assert not os.path.exists(work)  # a dry run writes nothing

    # the dependencies: the seed runs of a branch and the first seed's decodings wait for its selection
    args = reproduce_summ.build_parser().parse_args([data, "--work-dir", work, *TINY, "--seeds", "1,2"])
    reproduce_summ.check_args(args)
    deps = {s.name: set(s.deps) for s in reproduce_summ.plan(args)}
    assert deps["select b"] == {"heldout 1b eps0", "heldout 1b eps0.1"}
    assert deps["heldout 1b eps0.1"] == {"train 1b eps0.1", "heldout slice"}
    assert deps["train 1b eps0"] == {"train 1a"}
    assert deps["train 2b"] == {"train 2a", "select b"} and deps["train 2c"] == {"train 2a", "select c"}
    # the chosen candidate's decodings need its weights as well as the choice
    assert deps["eval 1b dev logarithmic"] == {"select b", "train 1b eps0", "train 1b eps0.1"}
    assert deps["eval 2c dev spherical"] == {"train 2c"}
    assert "train 1b" not in deps  # the first seed's run is the chosen candidate, not another training

    # once the selection has chosen, the seed runs (and the first seed's decodings) use its eps
    _fake_selection(work, "b", 0.0, {0.0: 12.0, 0.1: 11.0})
    _fake_selection(work, "c", 0.1, {0.0: 9.0, 0.1: 9.5})
    lines = _dry_run(data, work, capsys)
    assert _line(lines, "[skip] select b:").endswith("(smoothing 0)")
    seed2 = _line(lines, "[dry-run] seed 2 (b) log → brier train:")
    assert "--smoothing 0 " in seed2 and f"--output-dir {work}/seed2/b_eps0 " in seed2
    seed2 = _line(lines, "[dry-run] seed 2 (c) log → spherical train:")
    assert "--smoothing 0.1 " in seed2 and f"--output-dir {work}/seed2/c_eps0.1 " in seed2
    assert f"--model {work}/seed1/b_eps0/final " in _line(lines, "[dry-run] seed 1 b dev beam-logarithmic:")
    assert not any("CHOSEN" in line for line in lines)

    # a selection made with another first seed is refused
    with pytest.raises(SystemExit, match=r"selected with seed 1 \(.*\); list that seed first"):
        _dry_run(data, work, capsys, "--seeds", "2,1")

    # --report-only on these partial results: the selection table, no seed results yet
    assert reproduce_summ.main([data, "--work-dir", work, *TINY, "--seeds", "1,2", "--report-only"]) == 0
    md = open(os.path.join(work, "results.md"), encoding="utf-8").read()
    assert "smoothing chosen on the held-out training slice: (b) 0, (c) 0.1" in md
    assert "| (b) log → brier | 0 | 12.00 |" in md and "**chosen**" in md
    assert "| (a) log → log | 0 |" in md  # no seed has finished
    summary = _json(work, "results.json")
    assert summary["smoothing"]["b"] == 0.0 and summary["smoothing"]["c"] == 0.1
    assert summary["smoothing"]["selection"]["c"]["rows"][1]["selection_score"] == 9.5


def test_reproduce_summ_explicit_smoothing_skips_the_selection(tmp_path, capsys):
    data, work = str(tmp_path / "data"), str(tmp_path / "work")
    os.makedirs(data)
    _write_data(data)
    lines = _dry_run(data, work, capsys, "--smoothing", "0.05")
    assert not any("select" in line or "heldout" in line for line in lines)
    trains = [line for line in lines if " train" in line.split(":")[0]]
    assert len(trains) == 2 * 3
    for seed in (1, 2):
        for p in ("b", "c"):
            train = next(line for line in trains if line.startswith(f"[dry-run] seed {seed} ({p})"))
            assert "--smoothing 0.05 " in train and f"--output-dir {work}/seed{seed}/{p}_eps0.05 " in train
        assert "--smoothing 0.1 " in next(line for line in trains if line.startswith(f"[dry-run] seed {seed} (a)"))
    args = reproduce_summ.build_parser().parse_args([data, "--work-dir", work, *TINY, "--smoothing", "0.05"])
    reproduce_summ.check_args(args)
    assert {s.name: set(s.deps) for s in reproduce_summ.plan(args)}["train 3b"] == {"train 3a"}
    assert reproduce_summ.smoothing_report(args)[1]["b"] == 0.05


def test_reproduce_summ_selection_slice_is_disjoint_from_the_training_data(tmp_path, capsys):
    import argparse

    from properlm.cli.train import build_parser, options_from_args
    from properlm.training import make_config
    from properlm.training.loading import load_data

    data, work = str(tmp_path / "data"), str(tmp_path / "work")
    os.makedirs(data)
    rows = _rows(60, random.Random(1), False)
    for i in range(0, 60, 4):  # verbatim duplicates, some of which land on both sides of the split
        rows[i + 1] = {**rows[i], "id": f"dup{i}"}
    _write(os.path.join(data, "train.jsonl"), rows)
    _write(os.path.join(data, "dev.jsonl"), _rows(4, random.Random(2), True))
    args = reproduce_summ.build_parser().parse_args([data, "--work-dir", work, *TINY, "--heldout-fraction", "0.25"])
    reproduce_summ.check_args(args)
    reproduce_summ.write_heldout(args)
    assert "[done] heldout slice:" in capsys.readouterr().out
    heldout = [json.loads(line) for line in open(os.path.join(work, "heldout.jsonl"), encoding="utf-8")]

    # what properlm train itself trains on and holds out, with the command the benchmark runs
    argv = reproduce_summ.train_argv(args, 3, "a", 0.1, str(tmp_path / "run"))  # --resume is the runner's
    cfg = make_config(options_from_args(build_parser(argparse.ArgumentParser()).parse_args(argv[1:])))
    trained, validation = load_data(cfg)
    assert len(trained) + len(validation) == 60 and len(validation) == 15
    trained_docs = {e.source for e in trained}
    assert heldout and not any(r["document"] in trained_docs for r in heldout)
    validation_pairs = [(e.source, e.target) for e in validation]
    assert [(r["document"], r["summary"]) for r in heldout] == [p for p in validation_pairs if p[0] not in trained_docs]
    assert len(heldout) < len(validation)  # this data has duplicates across the split, and they were dropped
    kept, dropped = reproduce_summ.heldout_examples(args)
    assert len(kept) == len(heldout) and dropped == len(validation) - len(heldout)
