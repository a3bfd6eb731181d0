"""Release metadata: one version (``properlm.__version__``) shown by ``properlm --version`` and recorded in the
changelog, the licence file that ``pyproject.toml`` declares, the type-hint marker. Building and installing the wheel
itself is ``.ci/wheel_smoke.sh`` (run by ``make test``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import properlm
from properlm.cli.main import main

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_version_is_defined_once():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "properlm.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", properlm.__version__)
    hits = [p for p in (ROOT / "src").rglob("*.py") if re.search(r"^__version__\s*=", p.read_text("utf-8"), re.M)]
    assert hits == [ROOT / "src" / "properlm" / "__init__.py"]


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"properlm {properlm.__version__}"


def test_console_module_version():
    out = subprocess.run(
        [sys.executable, "-m", "properlm.cli.main", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.strip() == f"properlm {properlm.__version__}"


def test_changelog_has_this_version():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    versions = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", text, re.M)
    assert versions and versions[0] == properlm.__version__, versions
    assert versions == sorted(versions, key=lambda v: tuple(map(int, v.split("."))), reverse=True)


def test_license_matches_pyproject():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_package_ships_type_hints():
    assert (Path(properlm.__file__).parent / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["properlm"]
    assert "Typing :: Typed" in PYPROJECT["project"]["classifiers"]
