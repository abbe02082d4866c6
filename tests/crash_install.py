"""Kill a `pi0-runtime` store command (install-bundle, rollback) with SIGKILL at each of its file-system
calls in turn: the test helper behind tests/test_store_crash.py (the product code is not changed).

    python tests/crash_install.py TEMPLATE WORK [--service-fails] [--trace-only] -- ARGV...

ARGV is the command line of `pi0-runtime` with `{store}` where the store goes. This process imports the
runtime once, then forks one child per run, each on its own copy of the TEMPLATE store under WORK (hard
links: nothing in a store is written in place). In the child the calls that change the disk (os.mkdir,
rename, replace, fsync, symlink, unlink, rmdir, chmod, shutil.copyfile) are counted; a first child runs
the command to the end and records every call (`trace`: name and paths, an fsync's by its descriptor's
path), then the child of run k sends itself SIGKILL just before call k, for k = 1 .. the number of calls.
`--service-fails`: the restart after an install fails, so install-bundle takes the bundle out again;
`--trace-only`: the first child only.
Prints JSON: {"trace": [[name, path, ...], ...], "exit_code": N, "runs": [{"k", "store", "status"}, ...]}.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import runtime.cli as cli

CALLS = ("mkdir", "rename", "replace", "fsync", "symlink", "unlink", "rmdir", "chmod")


def describe(name: str, args: tuple) -> list[str]:
    if name == "fsync":
        return [name, os.readlink(f"/proc/self/fd/{args[0]}")]
    return [name, *(os.fspath(a) for a in args[:2] if isinstance(a, (str, os.PathLike)))]


def instrument(kill_at: int | None, trace: list[list[str]]) -> None:
    """Count (and record) every call that changes the disk; SIGKILL this process before call `kill_at`."""

    def wrap(owner: object, name: str) -> None:
        original = getattr(owner, name)

        def counted(*args: object, **kwargs: object) -> object:
            trace.append(describe(name, args))
            if len(trace) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    for name in CALLS:
        wrap(os, name)
    wrap(shutil, "copyfile")


def run(template: Path, store: Path, argv: list[str], kill_at: int | None, service_fails: bool) -> tuple[str, list]:
    """The command in a forked child on a fresh copy of the template -> (status, the child's trace)."""
    shutil.copytree(template, store, symlinks=True, copy_function=os.link)
    trace_file = store.with_suffix(".trace.json")
    log = store.with_suffix(".log")
    pid = os.fork()
    if pid == 0:  # the child: the command, its output to a file, nothing else
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if service_fails:
                cli.restart_service = lambda unit=None: False
            trace: list[list[str]] = []
            instrument(kill_at, trace)
            code = cli.main([a.replace("{store}", str(store)) for a in argv])
            trace_file.write_text(json.dumps(trace))
        finally:
            sys.stdout.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}", []
    trace = json.loads(trace_file.read_text()) if trace_file.exists() else []
    return f"exit {os.WEXITSTATUS(status)}", trace


def main(args: list[str]) -> int:
    split = args.index("--")
    options, argv = args[:split], args[split + 1 :]
    service_fails = "--service-fails" in options
    template, work = (Path(a) for a in options if not a.startswith("--"))
    status, trace = run(template, work / "complete", argv, None, service_fails)
    runs = []
    for k in range(1, 0 if "--trace-only" in options else len(trace) + 1):
        store = work / f"killed-at-{k:03d}"
        runs.append({"k": k, "store": str(store), "status": run(template, store, argv, k, service_fails)[0]})
    exit_code = int(status.split()[1]) if status.startswith("exit") else -1
    print(json.dumps({"trace": trace, "exit_code": exit_code, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
