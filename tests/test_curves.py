"""The training-curve plotter (:mod:`properlm.evaluation.curves`) and the run logs it reads: which lines, with which
points, are checked on the plan (:func:`curve_plan`), apart from the pixels; the PNG is only checked to be written."""

from __future__ import annotations

import json

import pytest

from properlm.cli.main import main
from properlm.evaluation.curves import (
    CurveSeries,
    curve_panels,
    curve_plan,
    panel_title,
    plot_curves,
    rule_switches,
)
from properlm.evaluation.run_records import RunRecord, latest_records, load_runs, read_run_log


def _record(label, directory, rows):
    """A record of a log of ``rows``: ``(step, rule, loss)`` training records, ``(step, rule, {key: value})``
    evaluation records."""
    log = []
    for step, rule, value in rows:
        if isinstance(value, dict):
            log.append({"step": step, "rule": rule, "eval_loss": 1.0, **value})
        else:
            log.append({"step": step, "rule": rule, "loss": value})
    return RunRecord(label=label, directory=directory, log=log)


def _write_log(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _lines(plan, panel):
    return [(ln.label, ln.steps, ln.values, ln.runs) for ln in plan.lines if ln.panel == panel]


def test_mean_line_over_runs_with_different_steps():
    """A series is one line through the mean of its runs at each step any of them logged: (1/n_t) sum_r v_r(t)
    over the n_t runs that logged step t."""
    a = _record("s1", "a", [(10, "logarithmic", 3.0), (20, "logarithmic", 2.0), (30, "logarithmic", 1.0)])
    b = _record("s2", "b", [(10, "logarithmic", 5.0), (30, "logarithmic", 3.0), (40, "logarithmic", 2.0)])
    single = _record("one", "c", [(10, "logarithmic", 7.0)])
    plan = curve_plan([CurveSeries("cfg", [a, b], {"color": "C3"}), single], panels=[("loss", None)])
    assert _lines(plan, ("loss", None)) == [
        ("cfg (mean of 2)", [10, 20, 30, 40], [4.0, 2.0, 2.0, 2.0], 2),
        ("one", [10], [7.0], 1),  # a bare record is a line of its own, named by its label
    ]
    assert plan.lines[0].style == {"color": "C3"} and plan.lines[1].style == {}


def test_per_run_lines_label_the_first_run_only():
    a = _record("s1", "a", [(10, "brier", 0.5), (20, "brier", 0.4)])
    b = _record("s2", "b", [(10, "brier", 0.7)])
    no_log = RunRecord(label="s3", directory="c")
    style = {"color": "C1", "linestyle": "--"}
    plan = curve_plan([CurveSeries("cfg", [a, no_log, b], style)], panels=[("loss", "brier")], per_run=True)
    assert _lines(plan, ("loss", "brier")) == [("cfg", [10, 20], [0.5, 0.4], 1), (None, [10], [0.7], 1)]
    assert all(ln.style == style for ln in plan.lines)


def test_a_directory_is_drawn_once_and_runs_without_logs_are_left_out():
    """load_runs gives a row per evaluation folder of a run, all with the run's log: one line."""
    a = _record("a", "runs/a", [(10, "logarithmic", 3.0)])
    again = RunRecord(label="a", directory="runs/a", log=a.log, split="test")
    plan = curve_plan([a, again, RunRecord(label="b", directory="runs/b")])
    assert [ln.label for ln in plan.lines] == ["a"]
    twice = CurveSeries("cfg", [a, again])
    assert _lines(curve_plan([twice]), ("loss", "logarithmic")) == [("cfg", [10], [3.0], 1)]


def test_chosen_panels_and_rules():
    """``panels`` chooses the quantities, in order: ``("loss", None)`` takes every rule's loss, ``("loss", rule)``
    that rule's only, a quantity nobody logged gets a panel without lines; by default each rule's loss has a
    panel of its own."""
    run = _record(
        "switch",
        "a",
        [
            (10, "logarithmic", 3.0),
            (20, "logarithmic", {"eval_score_brier": 0.2, "eval_score_logarithmic": -3.0}),
            (30, "spherical", 0.8),
            (40, "spherical", {"eval_score_brier": 0.3}),
        ],
    )
    chosen = [("eval_score_brier", None), ("eval_score_spherical", None), ("loss", None), ("loss", "spherical")]
    plan = curve_plan([run], panels=chosen)
    assert plan.panels == chosen
    assert _lines(plan, ("eval_score_brier", None)) == [("switch", [20, 40], [0.2, 0.3], 1)]
    assert _lines(plan, ("eval_score_spherical", None)) == []
    assert _lines(plan, ("loss", None)) == [("switch", [10, 30], [3.0, 0.8], 1)]
    assert _lines(plan, ("loss", "spherical")) == [("switch", [30], [0.8], 1)]
    assert not [ln for ln in plan.lines if ln.panel[0] == "eval_score_logarithmic"]
    default = curve_plan([run]).panels
    assert default == curve_panels([run])
    assert default[:2] == [("loss", "logarithmic"), ("loss", "spherical")]
    assert ("eval_score_logarithmic", None) in default and ("eval_loss", "spherical") in default
    assert curve_plan([run], max_panels=2).panels == default[:2]


def test_panel_titles_name_the_evaluation_set():
    assert panel_title("loss", "brier") == "training loss, brier"
    assert panel_title("loss", None) == "training loss"
    assert panel_title("eval_loss", "brier", what="held-out") == "held-out loss, brier"
    assert panel_title("eval_score_logarithmic", None) == "validation logarithmic score (higher is better)"
    assert panel_title("eval_score_spherical", None, what="Alpaca dev (64)") == (
        "Alpaca dev (64) spherical score (higher is better)"
    )


def test_marked_step_and_rule_switches():
    """Dotted lines: the marked step and every rule switch of the runs drawn, sorted, once each."""
    a = _record("a", "a", [(10, "logarithmic", 3.0), (20, "spherical", 0.9), (30, "spherical", 0.8)])
    b = _record("b", "b", [(10, "logarithmic", 3.0), (20, "spherical", 0.9), (25, "brier", 0.5)])
    # a rule switch is drawn after the last step logged with the previous rule
    assert rule_switches(a.log) == [10] and rule_switches(b.log) == [10, 20]
    # records without a rule (or without a numeric step) neither switch nor reset the rule
    assert (
        rule_switches([{"step": 1, "rule": "x"}, {"step": 2}, {"step": "?", "rule": "y"}, {"step": 3, "rule": "x"}])
        == []
    )
    assert curve_plan([CurveSeries("s", [a, b])], mark=15).marks == [10, 15, 20]
    assert curve_plan([a], mark=10).marks == [10]
    assert curve_plan([_record("c", "c", [(10, "brier", 0.5)])]).marks == []


def test_resumed_logs_keep_the_last_record_per_step_and_kind(tmp_path):
    """A run resumed from its step-20 checkpoint logs steps 30-40 again, and the final evaluation repeats the last
    scheduled one: the later record wins, an evaluation and a training record of one step are both kept."""
    records = [
        {"step": 10, "rule": "logarithmic", "loss": 3.0},
        {"step": 20, "rule": "logarithmic", "loss": 2.5},
        {"step": 20, "rule": "logarithmic", "eval_loss": 2.6, "eval_score_logarithmic": -2.6},
        {"step": 30, "rule": "logarithmic", "loss": 9.9},  # killed after this, resumed from step 20
        {"step": 30, "rule": "logarithmic", "loss": 2.2},
        {"step": 40, "rule": "logarithmic", "loss": 2.0},
        {"step": 40, "rule": "logarithmic", "eval_loss": 2.1, "eval_score_logarithmic": -2.05},
        {"step": 40, "rule": "logarithmic", "eval_loss": 2.1, "eval_score_logarithmic": -2.0},
        {"step": 40, "rule": "logarithmic", "train_runtime": 3.0},
    ]
    run = tmp_path / "run"
    _write_log(run, records)
    expected = [records[i] for i in (0, 2, 1, 4, 7, 5, 8)]  # by step; in a step: evaluation, training, other
    assert read_run_log(str(run / "metrics.jsonl")) == expected
    assert read_run_log(str(tmp_path / "missing.jsonl")) == []
    assert latest_records([{"note": 1}, *records[:2]]) == [records[0], records[1], {"note": 1}]
    from_log = RunRecord.from_log("r", str(run))
    assert from_log.log == expected and from_log.log_path == str(run / "metrics.jsonl")
    assert (
        RunRecord.from_log("none", str(tmp_path)).log == []
        and RunRecord.from_log("none", str(tmp_path)).log_path is None
    )
    assert load_runs([str(run)])[0].log == expected  # properlm compare reads logs the same way
    plan = curve_plan([from_log], panels=[("loss", None), ("eval_score_logarithmic", None)])
    assert _lines(plan, ("loss", None)) == [("r", [10, 20, 30, 40], [3.0, 2.5, 2.2, 2.0], 1)]
    assert _lines(plan, ("eval_score_logarithmic", None)) == [("r", [20, 40], [-2.6, -2.0], 1)]


def test_plot_writes_a_png_or_returns_none(tmp_path):
    a = _record(
        "a", "a", [(10, "logarithmic", 3.0), (20, "spherical", 0.8), (20, "spherical", {"eval_score_brier": 0.2})]
    )
    b = _record("b", "b", [(10, "logarithmic", 2.0), (20, "spherical", 0.9)])
    written = plot_curves(
        [CurveSeries("cfg", [a, b], {"color": "C2", "linestyle": "--"})],
        str(tmp_path / "sub" / "curves"),
        title="t",
        panels=[("eval_score_brier", None), ("eval_score_spherical", None), ("loss", None)],
        per_run=True,
        mark=15,
        what="held-out",
        log_scale={"loss"},
        ncols=2,
    )
    assert written == str(tmp_path / "sub" / "curves.png")
    with open(written, "rb") as f:
        assert f.read(4) == b"\x89PNG"
    # nothing to draw: no run with a log, or no logged value of the chosen quantities
    assert plot_curves([RunRecord(label="x", directory="x")], str(tmp_path / "none.png")) is None
    assert plot_curves([a], str(tmp_path / "none.png"), panels=[("eval_score_spherical", None)]) is None
    assert plot_curves([CurveSeries("empty", [])], str(tmp_path / "none.png")) is None
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("per_run", [False, True])
def test_empty_panels_are_drawn_with_the_others(tmp_path, per_run):
    a = _record("a", "a", [(10, "logarithmic", 3.0), (20, "logarithmic", 2.0)])
    out = plot_curves(
        [a], str(tmp_path / "p.png"), panels=[("loss", None), ("eval_score_brier", None)], per_run=per_run
    )
    assert out == str(tmp_path / "p.png")


def test_compare_draws_a_group_of_seeds_as_one_series(tmp_path, monkeypatch, capsys):
    """``properlm compare --plot`` hands the plotter a series per NAME=DIR,DIR group (drawn as the mean of its
    seeds) and one per single run."""
    import properlm.cli.compare as compare

    for name, losses in (("s1", [3.0, 2.0]), ("s2", [5.0, 4.0]), ("other", [1.0, 0.5])):
        _write_log(tmp_path / name, [{"step": 10 * i, "rule": "brier", "loss": v} for i, v in enumerate(losses, 1)])
    seen = []

    def fake_plot(series, path, *args, **kwargs):
        seen.append(series)
        return plot_curves(series, path, *args, **kwargs)

    monkeypatch.setattr(compare, "plot_curves", fake_plot)
    png = tmp_path / "c.png"
    argv = ["compare", f"cfg={tmp_path / 's1'},{tmp_path / 's2'}", str(tmp_path / "other"), "--plot", str(png)]
    assert main(argv) == 0
    assert f"training curves: {png}" in capsys.readouterr().out and png.is_file()
    (series,) = seen
    assert [(s.label, [r.label for r in s.runs]) for s in series] == [
        ("cfg", ["cfg #1", "cfg #2"]),
        (str(tmp_path / "other"), [str(tmp_path / "other")]),
    ]
    assert _lines(curve_plan(series), ("loss", "brier")) == [
        ("cfg (mean of 2)", [10, 20], [4.0, 3.0], 2),
        (str(tmp_path / "other"), [10, 20], [1.0, 0.5], 1),
    ]
    # a log without any loss or score: no plot, and the command says why
    _write_log(tmp_path / "bare", [{"step": 1, "rule": "brier", "learning_rate": 0.1}])
    assert main(["compare", str(tmp_path / "bare"), "--plot", str(tmp_path / "bare.png")]) == 0
    assert "no training curves plotted" in capsys.readouterr().err and not (tmp_path / "bare.png").exists()
