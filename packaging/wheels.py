"""`make wheel`: the robot-side wheels, built from this checkout's `runtime/` package.

    pi0-client    what a robot controller imports (`pi0_client/`): the client, the protocol it speaks,
                  the metadata type and the chunk broker; numpy and pyzmq only.
    pi0-runtime   the daemon and its tools (`runtime/`): pi0-client (the same protocol), numpy, pyzmq,
                  onnxruntime, sentencepiece, Pillow; pyACL is CANN's, not PyPI's.

Neither depends on torch. Both carry the project's version.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DEPENDENCIES = ["numpy>=1.24", "pyzmq>=25"]
RUNTIME_DEPENDENCIES = [
    "numpy>=1.24",
    "pyzmq>=25",
    "onnxruntime>=1.17",
    "sentencepiece>=0.2",
    "pillow>=10",  # openpi's image resize is Pillow's
    "websockets>=13",  # openpi's websocket protocol, beside ZeroMQ
    "prometheus_client>=0.20",  # the metrics endpoint (pure Python)
    "tomli>=2; python_version < '3.11'",
]


def project_version() -> str:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def pyproject(name: str, package: str, description: str, dependencies: list[str], scripts: dict[str, str]) -> str:
    lines = [
        "[build-system]",
        'requires = ["setuptools>=64"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{name}"',
        f'version = "{project_version()}"',
        f'description = "{description}"',
        'requires-python = ">=3.10"',
        "dependencies = [" + ", ".join(f'"{d}"' for d in dependencies) + "]",
    ]
    if scripts:
        lines += ["", "[project.scripts]", *(f'{k} = "{v}"' for k, v in scripts.items())]
    lines += ["", "[tool.setuptools.packages.find]", f'include = ["{package}*"]']
    return "\n".join(lines) + "\n"


def build(name: str, source: Path, out: Path) -> Path:
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out)]
    subprocess.run([*command, str(source)], check=True)
    return next(out.glob(f"{name.replace('-', '_')}-{project_version()}-*.whl"))


def build_wheels(out: Path) -> dict[str, Path]:
    """Build both wheels into `out`; returns them by distribution name."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("pi0_*.whl"):
        old.unlink()
    wheels = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, package, description, dependencies, scripts in (
            ("pi0-client", "pi0_client", "Client for the pi0 policy daemon (numpy + pyzmq)", CLIENT_DEPENDENCIES, {}),
            (
                "pi0-runtime",
                "runtime",
                "pi0 policy daemon for Ascend 310P (pyACL) or onnxruntime, served over ZeroMQ",
                [f"pi0-client=={project_version()}", *RUNTIME_DEPENDENCIES],
                {"pi0-runtime": "runtime.cli:main"},
            ),
        ):
            source = Path(tmp) / name
            shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
            (source / "pyproject.toml").write_text(pyproject(name, package, description, dependencies, scripts))
            wheels[name] = build(name, source, out)
    return wheels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the wheels go (default dist/)")
    for name, wheel in build_wheels(parser.parse_args().out).items():
        print(f"{name}: {wheel}")


if __name__ == "__main__":
    main()
