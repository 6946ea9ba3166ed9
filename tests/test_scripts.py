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
    shutil.copy(REPO_ROOT / "constraints.txt", root / "constraints.txt")
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
  touch "$3/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)"; exit 0
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


def test_the_install_is_held_to_the_versions_the_tests_passed_with():
    """A fresh clone installed whatever was newest: FastAPI 0.165 stopped reading a body
    with no Content-Type as JSON, which no change of ours did (issue-2 re-verification).
    setup.sh and the Dockerfile install with -c constraints.txt, which pins every
    package the project and its test extras pull in, as this .venv has them."""
    from importlib.metadata import distributions

    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, line  # pins, not ranges
            pins[name.lower().replace("_", "-")] = version
    for needed in ("fastapi", "starlette", "pydantic", "sqlalchemy", "polars", "psycopg", "redis", "hypothesis"):
        assert needed in pins, needed
    installed = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in distributions()}
    stale = {name: (version, installed.get(name)) for name, version in pins.items()
             if name in installed and installed[name] != version}
    assert not stale, stale  # the tests ran against other versions than the file says
    assert "-c constraints.txt" in (REPO_ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in (REPO_ROOT / "Dockerfile").read_text()


def _pytest_commands_in_code_blocks(text: str) -> list[str]:
    import re

    blocks = re.findall(r"^```(?:sh|bash)\n(.*?)^```", text, re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines() if "pytest" in line]


def test_the_docs_run_pytest_as_the_test_script_does():
    """`.venv/bin/pytest` does not put the repository on the import path, so every test
    module failed to import `tests` and the README's long schemathesis run collected
    nothing (55 errors; README walk-through). The docs' commands run it as
    scripts/test.sh does, `python -m pytest`."""
    docs = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    commands = [(doc.name, line) for doc in docs for line in _pytest_commands_in_code_blocks(doc.read_text())]
    assert any(name == "README.md" for name, _ in commands), commands  # the long run is found at all
    assert [(name, line) for name, line in commands if "python -m pytest" not in line] == []
