#!/usr/bin/env bash
# Release check: build the sdist and the wheel (the wheel from the sdist, as `python -m build` does), install the
# wheel into a fresh virtual environment outside the source tree and use it there. A module, data file or entry
# point missing from the package fails this script.
#
# Usage: .ci/wheel_smoke.sh [PYTHON]   (PYTHON: the project's venv interpreter, default .venv/bin/python)
#
# The fresh venv gets properlm only from the wheel. Its third-party dependencies (torch, transformers, ...) are
# reused from PYTHON's site-packages through a .pth file, which puts that directory on sys.path *after* the venv's
# own site-packages and without running the .pth files in it, so the editable install of src/ there is not seen;
# the script checks that `properlm` is imported from the venv's site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${1:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/properlm-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

step() { printf '%s [wheel_smoke] %s\n' "$(date +%T)" "$*"; }

step "build sdist + wheel"
# --no-isolation: build with the setuptools already in PYTHON's venv (offline, seconds); build-system.requires
# is still checked against it.
"$PY" -m build --no-isolation --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/properlm-*.whl)
SDIST=$(ls "$WORK"/dist/properlm-*.tar.gz)
VERSION=$("$PY" -c "import ast, sys; t = ast.parse(open('src/properlm/__init__.py').read()); \
print(next(n.value.value for n in t.body if isinstance(n, ast.Assign) and n.targets[0].id == '__version__'))")
case "$(basename "$WHEEL")" in properlm-"$VERSION"-py3-none-any.whl) ;; *)
    echo "wheel $(basename "$WHEEL") does not carry version $VERSION"; exit 1 ;; esac
SDIST_FILES=$(tar tzf "$SDIST")
for f in LICENSE README.md CHANGELOG.md pyproject.toml src/properlm/py.typed; do
    grep -qx "properlm-$VERSION/$f" <<<"$SDIST_FILES" || { echo "sdist lacks $f"; exit 1; }
done
# every module of the source tree is in the wheel
"$PY" - "$WHEEL" <<'EOF'
import pathlib, sys, zipfile

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
src = pathlib.Path("src")
wanted = {p.relative_to(src).as_posix() for p in src.joinpath("properlm").rglob("*")
          if p.is_file() and p.suffix in {".py", ".typed"} and "__pycache__" not in p.parts}
missing = sorted(wanted - names)
if missing:
    sys.exit(f"wheel lacks {missing}")
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
    sys.exit("wheel lacks its LICENSE")
EOF

step "fresh venv, install the wheel"
"$PY" -m venv --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
DEPS=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$DEPS" >"$SITE/_properlm_smoke_deps.pth"
# the venv has no pip of its own; PYTHON's pip, reached through the .pth file, runs on the venv's interpreter, so it
# installs into the venv (scripts included); --ignore-installed: leave PYTHON's editable properlm alone
where_installed() { "$PY" -c "import importlib.util as u; s = u.find_spec('properlm'); print(s and s.origin)"; }
BEFORE=$(where_installed)
"$VPY" -m pip install -q --disable-pip-version-check --no-deps --no-index --ignore-installed --no-compile "$WHEEL"
[ "$(where_installed)" = "$BEFORE" ] || { echo "installing the wheel changed PYTHON's own properlm ($BEFORE)"; exit 1; }

step "smoke test outside the source tree"
mkdir "$WORK/run"
cd "$WORK/run"
env -u PYTHONPATH "$VPY" - "$SITE" "$VERSION" "$ROOT" <<'EOF'
import os, sys

site, version, root = sys.argv[1:]
import torch

import properlm

where = os.path.realpath(properlm.__file__)
assert where.startswith(os.path.realpath(site)), f"properlm imported from {where}, not the wheel in {site}"
assert not where.startswith(os.path.realpath(root)), where
assert properlm.__version__ == version, properlm.__version__
assert os.path.exists(os.path.join(os.path.dirname(where), "py.typed"))
logits = torch.randn(2, 5, 11, requires_grad=True)
target = torch.randint(11, (2, 5))
for rule in ("logarithmic", "brier", "spherical", "0.5*logarithmic+0.5*spherical"):
    loss = properlm.scoring_rule_loss(logits, target, rule=rule, smoothing=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all(), rule
h, w = torch.randn(6, 4, requires_grad=True), torch.randn(11, 4, requires_grad=True)
properlm.fused_linear_scoring_rule_loss(h, w, torch.randint(11, (6,)), rule="brier").backward()
print(f"import, losses: ok (properlm {properlm.__version__} from {where})")
EOF
BIN="$WORK/venv/bin/properlm"
[ "$(env -u PYTHONPATH "$BIN" --version)" = "properlm $VERSION" ] || { echo "properlm --version is wrong"; exit 1; }
HELP=$(env -u PYTHONPATH "$BIN" --help)
for cmd in train evaluate generate compare demo; do
    grep -qw "$cmd" <<<"$HELP" || { echo "properlm --help lacks the '$cmd' command"; exit 1; }
done
for i in $(seq 0 39); do echo "$((i * 7 % 100))"; done >train.src
for i in $(seq 0 39); do echo "n $((i * 7 % 100)) m"; done >train.tgt
env -u PYTHONPATH OMP_NUM_THREADS=2 "$BIN" train --init tiny-seq2seq --source-file train.src --target-file train.tgt \
    --vocab-size 270 --hidden-size 16 --num-layers 1 --num-heads 2 --max-length 16 --max-steps 2 \
    --per-device-train-batch-size 8 --rule spherical --smoothing 0.1 --logging-steps 1 \
    --no-progress-bar --no-tensorboard --output-dir out >train.log 2>&1 || { cat train.log; exit 1; }
[ -f out/final/config.json ] && [ "$(grep -c '"loss"' out/metrics.jsonl)" -ge 2 ] || {
    cat train.log; ls -R out; echo "properlm train left no final model or no per-step losses"; exit 1; }
step "ok: properlm $VERSION wheel builds, installs and runs"
