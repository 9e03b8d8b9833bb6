"""tools/import_cycles.py: no import cycles among diffsr's modules (function-level imports included)."""

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).parents[1] / "tools" / "import_cycles.py"


def run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_diffsr_has_no_import_cycles():
    result = run()
    assert result.returncode == 0 and result.stdout == "no import cycles\n", result.stdout + result.stderr


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def later():\n    from ..c import helper\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from pkg import a\n")  # imports into the cycle, is not part of it
    result = run(package)
    assert result.returncode == 1 and result.stdout == "pkg.a -> pkg.sub.b -> pkg.c -> pkg.a\n"
