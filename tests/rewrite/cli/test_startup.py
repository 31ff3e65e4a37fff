"""Item 7 of issue 22: the command starts without the heavy backends (what is imported, not how
long it takes; benchmarks/startup.py measures the time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from rewrite.cli import main

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("tvm", "onnxruntime", "onnx", "torch._inductor", "torch.onnx", "torch.distributed.checkpoint",
         "scipy.stats")


def imported_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m in {HEAVY + ('torch',)!r})))"
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_importing_the_cli_and_its_help_import_no_backend_nor_torch():
    assert imported_after("import rewrite.cli") == []
    help_run = ("import sys; sys.argv = ['rewrite', '--help']\nfrom rewrite.cli import main\n"
                "try:\n    main()\nexcept SystemExit:\n    pass")
    assert imported_after(help_run) == []


def test_inspect_imports_torch_but_no_backend(day_files):
    code = ("import sys; sys.argv = ['rewrite', 'inspect', %r]\nfrom rewrite.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass" % str(day_files.model))
    assert imported_after(code) == ["torch"]


def test_apply_keeps_its_recovery_options_though_they_load_lazily():
    r = CliRunner().invoke(main, ["apply", "--help"])
    assert r.exit_code == 0 and "--recover PATH" in r.output and "--recover-top" in r.output
    names = [p.name for p in main.get_command(None, "apply").params]
    assert len(names) == len(set(names)) and "recover_path" in names and "output" in names
