"""The import layers of pyproject.toml ([tool.importlinter]) hold: what `make lint` checks, CI checks too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"  # installed by the dev extra


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_no_module_imports_from_a_layer_above_it():
    res = lint_imports()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


def test_an_upward_import_is_reported(tmp_path):
    # formats imports errors; a contract that puts errors above formats must break, naming the import
    config = tmp_path / "upside_down.toml"
    config.write_text('[tool.importlinter]\nroot_package = "valle_cli"\n\n'
                      '[[tool.importlinter.contracts]]\nname = "upside down"\ntype = "layers"\n'
                      'layers = ["valle_cli.errors", "valle_cli.formats"]\n')
    res = lint_imports(str(config))
    assert res.returncode == 1 and "BROKEN" in res.stdout
    assert "valle_cli.formats -> valle_cli.errors" in res.stdout
