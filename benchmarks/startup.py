"""Start-up time of the ``rewrite`` command: ``rewrite --help`` and ``rewrite inspect`` of a small
checkpoint, each a fresh process, median of ``--runs`` runs (issue 22, item 7: goals 0.5 s and 2 s).

    python benchmarks/startup.py --runs 7 -o benchmarks/results/startup.json

Writes JSON: the host's CPU model, the Python used, per command the wall times of every run and
their median, and which heavy modules (TVM, onnxruntime, onnx, torch's compilers and exporters)
each command imported.  The checkpoint is a 4-table facebookresearch/dlrm ``--save-model`` file
(40 KB) written into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewrite.core.isa import cpu_model  # noqa: E402  (no torch: isa imports the standard library only)

HEAVY = ("tvm", "onnxruntime", "onnx", "torch._inductor", "torch.onnx", "torch.distributed.checkpoint",
         "scipy.stats")
CLI = "import sys; from rewrite.cli import main; main()"
MODULES = ("import json, sys, runpy; sys.argv = ['rewrite'] + sys.argv[1:]\n"
           "from rewrite.cli import main\n"
           "try:\n    main()\nexcept SystemExit:\n    pass\n"
           f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)")


def timed(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CLI, *args], env=env, cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def timed_code(code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True)
    return time.perf_counter() - start


def heavy_imported(args: list[str], env: dict[str, str]) -> list[str]:
    r = subprocess.run([sys.executable, "-c", MODULES, *args], env=env, cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return json.loads(r.stderr.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("-o", "--output", type=Path, help="write the JSON here (default: stdout only)")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.pt"
        subprocess.run([sys.executable, "-c",
                        "import sys; from rewrite.training import table_dlrm; from rewrite.formats import dlrm; "
                        "dlrm.write(table_dlrm([40, 300, 5, 2000], n_dense=13, dim=4, bottom=(8, 4), "
                        "top=(8, 1), seed=1), sys.argv[1], {'nepochs': 1})", str(model)],
                       env=env, cwd=ROOT, check=True)
        commands = {"rewrite --help": (["--help"], 0.5), "rewrite inspect model.pt": (["inspect", str(model)], 2.0)}
        results = {}
        floor = [timed_code("import torch", env) for _ in range(args.runs)]
        results["python -c 'import torch' (floor of any command that reads a checkpoint)"] = {
            "runs_s": [round(t, 3) for t in floor], "median_s": round(statistics.median(floor), 3)}
        for name, (argv, goal) in commands.items():
            timed(argv, env)                                    # warm the page cache
            runs = [timed(argv, env) for _ in range(args.runs)]
            results[name] = {"runs_s": [round(t, 3) for t in runs], "median_s": round(statistics.median(runs), 3),
                             "goal_s": goal, "meets_goal": statistics.median(runs) < goal,
                             "heavy_modules_imported": heavy_imported(argv, env)}
            print(f"{name:<28} median {results[name]['median_s']:.3f} s (goal {goal} s)  "
                  f"runs {results[name]['runs_s']}  heavy: {results[name]['heavy_modules_imported']}",
                  file=sys.stderr)
        print(f"import torch alone: median {statistics.median(floor):.3f} s", file=sys.stderr)
        out = {"benchmark": "startup", "cpu": cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0],
               "load_average": os.getloadavg(), "runs": args.runs, "commands": results}
    text = json.dumps(out, indent=1)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
