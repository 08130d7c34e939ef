"""The dependency rule of DESIGN.md: flextron ← profiler ← search, reports reads artifacts and imports
no torch, and `flextron/cli/` is the one place that wires stages (the only exception)."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# package -> packages it must never import (directly or lazily inside a function)
FORBIDDEN = {"flextron": {"profiler", "search", "reports"}, "profiler": {"search", "reports"}, "search": {"reports"}}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def violations(root: Path) -> list[str]:
    out = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            if package == "flextron" and path.relative_to(root / package).parts[0] == "cli":
                continue  # the wiring place
            bad = imported_packages(path) & forbidden
            if bad:
                out.append(f"{path.relative_to(root)} imports {sorted(bad)}")
    return out


def test_packages_import_only_downward_and_only_the_cli_wires_stages():
    assert violations(REPO) == []


def test_the_rule_check_catches_an_upward_import(tmp_path):
    """The scan above is not vacuous: a lazy upward import inside a function is found."""
    for package in FORBIDDEN:
        (tmp_path / package).mkdir()
    (tmp_path / "flextron" / "x.py").write_text("def f():\n    from search.lookup import Lookup\n")
    (tmp_path / "flextron" / "cli").mkdir()
    (tmp_path / "flextron" / "cli" / "ok.py").write_text("import reports.build\n")
    assert violations(tmp_path) == ["flextron/x.py imports ['search']"]


def test_reports_build_a_report_without_torch(profiled_copy, tiny_run, tmp_path):
    """The report stage runs where torch cannot even be imported (a None entry makes `import torch`
    raise), on a profiled and fitted run."""
    run = profiled_copy(tiny_run, tmp_path / "r", "decode:b1:ctx32", e2e_random=8)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from reports.build import ReportConfig, build_report\n"
            f"print(build_report(ReportConfig(run={str(run)!r}))['report'])\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip().splitlines()[-1]).is_file()


def test_the_no_torch_check_is_not_vacuous():
    """Blocking torch the same way does stop a module that needs it."""
    code = "import sys; sys.modules['torch'] = None\nimport flextron.elastic\n"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr
