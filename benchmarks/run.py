"""`make bench`: run every benchmark and rewrite docs/benchmarks.md with their tables.

`python benchmarks/run.py NAME ...` runs only those: their sections and target rows are replaced, and
every other benchmark's stay as the doc shows them (its section found by the `benchmarks/NAME.py` in its
heading, its target rows by the table's last column). `--render` rewrites the whole doc from the
results saved in build/bench/ instead.

Each benchmark module has `run() -> dict` (its result, kept as JSON in build/bench/), `sections(result)`
(its part of the doc) and, where it measures a target, `targets(result)` (rows of the doc's first table);
`python -m benchmarks.NAME` from the repo root prints its result as JSON (`benchmarks/cli.py`).
Benchmarks are not tests: they assert nothing about time and may take minutes and tens of GB.

`--smoke [NAME ...] [--out DIR]` runs each benchmark's `--smoke` instead (tiny sizes, seconds; all in one
child process, each as `python -m benchmarks.NAME --smoke` would run it) and renders its section from that result into DIR/benchmarks.md (default: a new
temporary directory), to show that every benchmark still runs and renders against today's code. It
writes nothing into docs/ or build/bench/; the figures mean nothing. tests/test_benchmarks.py runs it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import importlib
import io
import json
import os
import platform
import re
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cli import plain  # noqa: E402

# In the order they run: latency first (a page cache busy after the 14 GB runs disturbs it most).
BENCHMARKS = (
    "service",
    "fraction_of_peak",
    "pi05_engine",
    "guidance",
    "fp16_islands",
    "load_memory",
    "export_full",
    "lerobot_side_by_side",
    "ascend_estimate",
    "sim_harness",
)
# Benchmarks reported elsewhere (`make load`: docs/reliability.md): smoke-run only.
ELSEWHERE = ("load",)
RESULTS = ROOT / "build" / "bench"
DOC = ROOT / "docs" / "benchmarks.md"
SMOKE_TIMEOUT_S = 600


def module(name: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.{name}")


def benchmark_modules() -> list[str]:
    """Every module in benchmarks/ that is a benchmark (it defines `run`), read without importing it."""
    return sorted(
        path.stem
        for path in (ROOT / "benchmarks").glob("*.py")
        if any(isinstance(node, ast.FunctionDef) and node.name == "run" for node in ast.parse(path.read_text()).body)
    )


def unregistered() -> list[str]:
    """Benchmark modules that `make bench` neither renders nor smoke-runs: each must be in one of the two."""
    return sorted(set(benchmark_modules()) - set(BENCHMARKS) - set(ELSEWHERE))


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, {platform.system()} {platform.machine()}"


def targets_section(results: dict[str, dict], kept_rows: dict[str, list[str]] | None = None) -> list[str]:
    """Every benchmark's targets against its result, or its rows as `kept_rows` has them (the doc's own,
    for a benchmark not run now); the last column names the benchmark that measures each."""
    kept_rows = kept_rows or {}
    rows = []
    for name in BENCHMARKS:
        if name in results:
            measured = module(name).targets(results[name]) if hasattr(module(name), "targets") else []
            rows += [f"| {a} | {b} | {c} | {name} |" for a, b, c in measured]
        else:
            rows += kept_rows.get(name, [])
    return ["## Targets", "| target | wanted | measured | benchmark |\n|---|---|---|---|\n" + "\n".join(rows)]


def doc_parts(doc: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """What a rendered doc shows per benchmark: its section (from its heading, which names
    `benchmarks/NAME.py`, to the next heading) and its target rows (by their last column)."""
    headings = [(m.start(), m.group(1)) for m in re.finditer(r"^## (?:.*`benchmarks/(\w+)\.py`)?", doc, re.M)]
    bounds = [start for start, _ in headings] + [len(doc)]
    sections = {
        name: doc[bounds[i] : bounds[i + 1]].strip() for i, (_, name) in enumerate(headings) if name in BENCHMARKS
    }
    rows: dict[str, list[str]] = {}
    for line in doc.splitlines():
        cells = line.strip().strip("|").split("|")
        if line.startswith("| ") and len(cells) == 4 and cells[3].strip() in BENCHMARKS:
            rows.setdefault(cells[3].strip(), []).append(line.strip())
    return sections, rows


def render(saved: dict[str, dict], kept: str = "") -> str:
    """The doc from saved runs ({"when", "result"} by benchmark name); a benchmark without one keeps its
    section and target rows from `kept` (the doc as it was), else says it has not run."""
    kept_sections, kept_rows = doc_parts(kept)
    sections = [
        "# Benchmarks",
        f"Written by `make bench` (`python benchmarks/run.py [NAME ...]`).\n\nMachine: {machine()}.",
        *targets_section({name: run["result"] for name, run in saved.items()}, kept_rows),
    ]
    for name in BENCHMARKS:
        if name in saved:
            rendered = module(name).sections(saved[name]["result"])
            sections += [rendered[0], f"_Run {saved[name]['when']}._", *rendered[1:]]
        else:
            sections.append(kept_sections.get(name, f"## {name}\n\nNot run yet: `python benchmarks/run.py {name}`."))
    return "\n\n".join(sections) + "\n"


def bench(chosen: list[str], render_saved: bool = False) -> None:
    """Run the chosen benchmarks, keep each one's result as JSON in build/bench/, and rewrite
    docs/benchmarks.md (dated): the chosen ones from their new results, the others as the doc showed them.
    `render_saved`: run none, and render every benchmark from its result saved in build/bench/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    fresh = {}
    for name in chosen:
        print(f"[bench] {name} ...", flush=True)
        result = module(name).run()
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        fresh[name] = {"when": when, "result": result}
        (RESULTS / f"{name}.json").write_text(json.dumps(fresh[name], indent=1, default=plain))
    if render_saved:
        fresh = {
            name: json.loads(path.read_text()) for name in BENCHMARKS if (path := RESULTS / f"{name}.json").exists()
        }
    DOC.write_text(render(fresh, "" if render_saved or not DOC.exists() else DOC.read_text()))
    print(f"wrote {DOC}")


def smoke_processes(names: list[str]) -> dict[str, subprocess.CompletedProcess]:
    """Each named benchmark's `--smoke`, all in one child process started from the repo root: each module
    runs as `python -m benchmarks.NAME --smoke` runs it (as `__main__`, that argv), its exit status and
    printed output kept apart from the others'. One process pays the imports (torch, onnx: ~3 s) once.
    -> name: a CompletedProcess as its own process would have given (`args` says how it really ran)."""
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as tmp:
        results = Path(tmp) / "results.json"
        command = [sys.executable, "-m", "benchmarks.run", "--smoke-here", str(results), *names]
        child = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S * len(names))
        ran = json.loads(results.read_text()) if results.exists() else {}
    done = {}
    for name in names:
        if name in ran:
            done[name] = subprocess.CompletedProcess(
                command, ran[name]["exit"], ran[name]["stdout"], ran[name]["stderr"]
            )
            done[name].seconds = ran[name]["seconds"]
        else:  # the child died before (or while) running it
            why = f"the smoke process exited {child.returncode} before {name} finished:\n{child.stderr[-5000:]}"
            done[name] = subprocess.CompletedProcess(command, child.returncode or 1, "", why)
            done[name].seconds = 0.0
    return done


def smoke_here(names: list[str], results: Path) -> None:
    """In this process, each named benchmark's `--smoke` in turn; after each, every result so far into
    `results` (name: exit, stdout, stderr, seconds), so a crash keeps what ran before it."""
    ran = {}
    for name in names:
        out, err = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        sys.argv = [f"benchmarks/{name}.py", "--smoke"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
                status = 0
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:  # a broken benchmark: its traceback is its output, the others still run
                traceback.print_exc()
                status = 1
        seconds = time.perf_counter() - start
        ran[name] = {"exit": status, "stdout": out.getvalue(), "stderr": err.getvalue(), "seconds": seconds}
        results.write_text(json.dumps(ran))


def result_of(stdout: str) -> dict:
    """A benchmark's result: the last JSON object it printed (what it runs may print others before)."""
    return json.loads(stdout[stdout.rfind("\n{") + 1 :])


def smoke(chosen: list[str], out: Path) -> int:
    """Each chosen benchmark's smoke, its JSON in `out`, the doc rendered from them into out/benchmarks.md;
    what was skipped said by name. -> 0 when every one ran, else 1."""
    out.mkdir(parents=True, exist_ok=True)
    saved, failed = {}, []
    for name, done in smoke_processes(chosen).items():
        seconds = done.seconds
        try:
            result = result_of(done.stdout) if done.returncode == 0 else None
        except json.JSONDecodeError:  # no result printed: it has no --smoke, or printed something else last
            result = None
        if result is None:
            print(
                f"[smoke] {name}: FAILED (exit {done.returncode}, {seconds:.0f} s, no result):\n{done.stderr[-5000:]}"
            )
            failed.append(name)
            continue
        saved[name] = {
            "when": f"as a smoke test in {seconds:.0f} s, at tiny sizes: the figures mean nothing",
            "result": result,
        }
        (out / f"{name}.json").write_text(json.dumps(saved[name], indent=1))
        skipped = "".join(f"; SKIPPED {part}: {why}" for part, why in result.get("skipped", {}).items())
        print(f"[smoke] {name}: ran in {seconds:.0f} s{skipped}", flush=True)
    (out / "benchmarks.md").write_text(render({name: run for name, run in saved.items() if name in BENCHMARKS}))
    print(f"[smoke] {len(saved)} ran, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; wrote {out}")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    parser.add_argument("--render", action="store_true", help="run none: rewrite the doc from the saved results")
    parser.add_argument(
        "--smoke", action="store_true", help="each benchmark's --smoke instead (tiny sizes, seconds; not into docs/)"
    )
    parser.add_argument("--out", type=Path, help="--smoke: where its results and doc go (default: a new temp dir)")
    parser.add_argument("--smoke-here", type=Path, metavar="RESULTS", help=argparse.SUPPRESS)  # smoke_processes' child
    args = parser.parse_args()
    if args.smoke_here:
        return smoke_here(args.names, args.smoke_here)
    names = [*BENCHMARKS, *ELSEWHERE] if args.smoke else list(BENCHMARKS)
    unknown = set(args.names) - set(names)
    if unknown:
        raise SystemExit(f"unknown benchmarks {sorted(unknown)}; choose from {names}")
    if missing := unregistered():
        raise SystemExit(f"benchmarks/{missing[0]}.py defines run() but is in neither BENCHMARKS nor ELSEWHERE here")
    if args.smoke:
        sys.exit(smoke(args.names or names, args.out or Path(tempfile.mkdtemp(prefix="bench-smoke-"))))
    bench([] if args.render else args.names or names, render_saved=args.render)


if __name__ == "__main__":
    main()
