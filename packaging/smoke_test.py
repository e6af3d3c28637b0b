"""Smoke test of the Linux installer: build it from a clean checkout, unpack it, and run the installed app's
self-test on a real X server.

    python packaging/smoke_test.py [--keep DIR] [--torch SPEC]

1. clones this repository's committed HEAD into a temporary folder (uncommitted changes are not built);
2. makes a virtual environment there with the CPU build of torch, the studio (not editable) and PyInstaller;
3. runs packaging/build.py: the PyInstaller one-folder app, then the .deb;
4. unpacks the .deb into a temporary prefix (`dpkg-deb -x`; nothing is installed on this machine);
5. starts Xvfb and runs `PREFIX/opt/compression-studio/compression-studio --self-test` on it with the xcb platform
   (offscreen would hide missing system libraries), with an empty environment and PATH, so no Python of the
   user's can be involved, and without a network (`unshare -n`);
6. checks the report: passed, on xcb, from the frozen app, no module or Python library from outside the app;
   and prints the .deb's size, the installed size and the time from launch to the first painted window.

Exit 0 when all of that holds. It takes about ten minutes on two cores, which is why it is not in `pytest`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "compression-studio"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
DEFAULT_TORCH = "torch==2.13.0"
SELF_TEST_TIMEOUT_S = 300


class SmokeTestFailed(Exception):
    pass


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, check=True, **kwargs)
    except subprocess.CalledProcessError as exc:
        raise SmokeTestFailed(f"`{' '.join(map(str, command[:4]))} …` exited {exc.returncode}") from exc


def mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def clean_checkout(work: Path) -> Path:
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        print("note: uncommitted changes in this checkout are not part of the build (it builds HEAD)")
    source = work / "src"
    run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(source)])
    return source


def cpu_index_reachable() -> bool:
    try:
        urllib.request.urlopen(f"{CPU_INDEX}/torch/", timeout=10)
        return True
    except OSError:
        return False


def build_environment(work: Path, source: Path, torch_spec: str) -> Path:
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # PyTorch's CPU index has CPU-only Linux wheels; without it (an offline mirror) the pinned version is taken
    # from the configured indexes, and build.py refuses it if it turns out to be a CUDA build.
    run(pip + ([torch_spec, "--index-url", CPU_INDEX] if cpu_index_reachable() else [torch_spec]))
    run(pip + [str(source), "-r", str(source / "packaging" / "requirements-build.txt")])
    return python


def start_xvfb(work: Path) -> tuple[subprocess.Popen, str]:
    if not shutil.which("Xvfb"):
        raise SmokeTestFailed("Xvfb is not installed: apt install xvfb")
    read_end, write_end = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1600x1000x24", "-nolisten",
                               "tcp"], pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_end)
    with os.fdopen(read_end) as display_number:
        number = display_number.readline().strip()
    if not number:
        server.kill()
        raise SmokeTestFailed("Xvfb did not start")
    return server, f":{number}"


def run_installed_self_test(executable: Path, work: Path) -> tuple[dict, bool]:
    server, display = start_xvfb(work)
    home, empty_path, report = work / "home", work / "empty-path", work / "self-test.json"
    home.mkdir()
    empty_path.mkdir()
    environment = {"HOME": str(home), "PATH": str(empty_path), "DISPLAY": display, "QT_QPA_PLATFORM": "xcb",
                   "LANG": "C.UTF-8", "XDG_RUNTIME_DIR": str(home)}
    command = [str(executable), "--self-test", "--report", str(report)]
    unshare = shutil.which("unshare")  # the app's own PATH is empty, so by its full path
    isolated = bool(unshare) and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0
    if isolated:
        command = [unshare, "-n", *command]
    else:
        print("note: `unshare -n` is not permitted here: the self-test runs with the network available")
    try:
        environment["STUDIO_LAUNCH_TIME"] = repr(time.time())  # the app reports its first paint from this
        result = subprocess.run(command, env=environment, timeout=SELF_TEST_TIMEOUT_S, capture_output=True,
                                text=True)
    finally:
        server.terminate()
        server.wait(10)
    if result.returncode != 0 or not report.exists():
        raise SmokeTestFailed(f"the installed app's self-test exited {result.returncode}:\n"
                              f"{result.stdout[-4000:]}{result.stderr[-4000:]}")
    return json.loads(report.read_text(encoding="utf-8")), isolated


def check_report(report: dict) -> None:
    installation = report.get("installation", {})
    problems = []
    if report.get("status") != "passed":
        problems.append(f"status {report.get('status')}: {report.get('reason')}")
    if report.get("platform") != "xcb":
        problems.append(f"the Qt platform was {report.get('platform')!r}, not xcb")
    if not installation.get("frozen"):
        problems.append("the self-test did not run in the built app (sys.frozen is not set)")
    for key in ("modules_outside_app", "python_libraries_outside_app"):
        if installation.get(key):
            problems.append(f"{key}: {installation[key][:5]}")
    if problems:
        raise SmokeTestFailed("the self-test report shows: " + "; ".join(problems))


def check_desktop_entry(prefix: Path) -> None:
    entry = prefix / "usr" / "share" / "applications" / f"{NAME}.desktop"
    icon = prefix / "usr" / "share" / "icons" / "hicolor" / "256x256" / "apps" / f"{NAME}.png"
    for path in (entry, icon, prefix / "opt" / NAME / NAME):
        if not path.exists():
            raise SmokeTestFailed(f"the package has no {path.relative_to(prefix)}")
    exec_line = next(line for line in entry.read_text().splitlines() if line.startswith("Exec="))
    target = exec_line.split("=", 1)[1].split()[0]
    if not (prefix / target.lstrip("/")).exists():
        raise SmokeTestFailed(f"the desktop entry runs {target}, which the package does not contain")
    if shutil.which("desktop-file-validate"):
        run(["desktop-file-validate", str(entry)])


def smoke_test(work: Path, torch_spec: str) -> None:
    started = time.perf_counter()
    step(f"clean checkout of {ROOT} (HEAD) in {work}")
    source = clean_checkout(work)
    step(f"build environment: {torch_spec} (CPU), the studio, PyInstaller")
    python = build_environment(work, source, torch_spec)
    step("build: packaging/build.py")
    build_started = time.perf_counter()
    run([str(python), str(source / "packaging" / "build.py"), "--dist", str(work / "dist"),
         "--work", str(work / "build")], cwd=source)
    build_seconds = time.perf_counter() - build_started
    packages = sorted((work / "dist").glob(f"{NAME}_*.deb"))
    if not packages:
        raise SmokeTestFailed(f"packaging/build.py made no .deb in {work / 'dist'}")
    package = packages[0]
    step(f"unpack {package.name} into a temporary prefix")
    prefix = work / "prefix"
    run(["dpkg-deb", "-x", str(package), str(prefix)])
    check_desktop_entry(prefix)
    step("installed app's self-test on Xvfb (xcb), empty environment, no network")
    report, isolated = run_installed_self_test(prefix / "opt" / NAME / NAME, work)
    check_report(report)
    control = run(["dpkg-deb", "-f", str(package), "Depends"], capture_output=True, text=True).stdout.strip()
    checks = report["checks"]
    print()
    print(f"smoke test passed in {time.perf_counter() - started:.0f} s (build {build_seconds:.0f} s)")
    print(f"  artefact              {package.name}: {mib(package.stat().st_size)} "
          f"({package.stat().st_size:,} bytes); installed {mib(folder_size(prefix))}")
    print(f"  depends on            {control}")
    print(f"  launch → first paint  {checks['first_paint_since_launch_seconds']:.2f} s "
          f"(platform {report['platform']}, network {'off' if isolated else 'on'})")
    print(f"  self-test             {report['seconds']} s: loaded {checks['model_loaded']}, "
          f"{checks['memory_samples']} memory samples, {checks['accuracy_points']} accuracy points, "
          f"export reload logit difference {checks['export_reload_max_logit_difference']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="work in DIR (must not exist) and keep it: the clone, build, .deb and unpacked prefix")
    parser.add_argument("--torch", default=DEFAULT_TORCH, help=f"torch requirement to bundle ({DEFAULT_TORCH})")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("the smoke test builds and runs the Linux .deb: run it on Linux", file=sys.stderr)
        return 2
    if args.keep and args.keep.exists():
        print(f"{args.keep} exists: give a new folder to --keep", file=sys.stderr)
        return 2
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="studio-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        smoke_test(work, args.torch)
        return 0
    except (SmokeTestFailed, subprocess.TimeoutExpired) as exc:
        print(f"\nsmoke test FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
