"""The shell scripts a fresh clone runs first (README's first lines): scripts/setup.sh,
run in a copy of the project's files with stand-in interpreters, so nothing is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from eum.settings import REPO_ROOT

OLD_PYTHON = "#!/bin/sh\n[ \"$1\" = -V ] && { echo 'Python 3.10.12'; exit 0; }\nexit 1\n"  # every other use fails


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "clone"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def _interpreter(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_setup_refuses_a_python_older_than_3_11_before_making_anything(tmp_path):
    """With Ubuntu 22.04's python3 (3.10) setup.sh made .venv anyway; pip then refused
    the project, and the 3.10 .venv was kept for good (new-user audit)."""
    root = _project(tmp_path)
    old = _interpreter(tmp_path / "python3.10", OLD_PYTHON)
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=root, env={"PATH": "/usr/bin:/bin", "PYTHON": str(old)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "needs Python 3.11 or newer" in done.stderr and "3.10.12" in done.stderr, done
    assert not (root / ".venv").exists()


def test_setup_makes_again_a_venv_made_by_an_older_python(tmp_path):
    """A .venv left by a failed run under 3.10 is made again with the Python given, where
    it was kept and every later run failed (new-user audit). The stand-in for `python -m
    venv` links the running interpreter and marks the project installed."""
    root = _project(tmp_path)
    (root / ".venv" / "bin").mkdir(parents=True)
    _interpreter(root / ".venv" / "bin" / "python", OLD_PYTHON)
    new = _interpreter(tmp_path / "python3.11", f"""#!/bin/bash
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin" && ln -s {sys.executable} "$3/bin/python"
  touch "$3/.installed-$(sha1sum pyproject.toml | cut -c1-12)"; exit 0
fi
exec {sys.executable} "$@"
""")
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=root, env={"PATH": "/usr/bin:/bin", "PYTHON": str(new)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "making it again" in done.stderr, done
    assert (root / ".venv" / "bin" / "python").resolve() == Path(sys.executable).resolve()


def test_setup_names_an_interpreter_that_is_not_there(tmp_path):
    root = _project(tmp_path)
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=root,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "no-python")},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no-python' is not found." in done.stderr, done
    assert not (root / ".venv").exists()
