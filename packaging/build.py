"""Build Compression Studio for this platform: the PyInstaller one-folder app, then its installer.

    python packaging/build.py [--dist DIR] [--work DIR] [--skip-app]

Linux: `DIST/compression-studio_VERSION_ARCH.deb` (the app in /opt/compression-studio, a launcher in /usr/bin, a
.desktop entry and icons). Windows: `DIST/CompressionStudio-VERSION-setup.exe` with Inno Setup's `iscc`.
macOS: `DIST/Compression Studio.app` and `DIST/CompressionStudio-VERSION.dmg` with `hdiutil`.

Run it in an environment that has the studio and `pyinstaller` installed, with the CPU build of torch (the
build refuses a CUDA torch: it would add gigabytes of CUDA libraries users of the CPU installer never run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
NAME = "compression-studio"
DISPLAY_NAME = "Compression Studio"


class BuildError(Exception):
    pass


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def check_environment() -> None:
    try:
        import PyInstaller  # noqa: F401
        import torch
    except ImportError as exc:
        raise BuildError(f"{exc.name} is not installed here: pip install pyinstaller, and the studio itself") from exc
    if torch.version.cuda or getattr(torch.version, "hip", None):
        raise BuildError(f"torch {torch.__version__} is a CUDA/ROCm build; install the CPU build first, e.g. "
                         "pip install torch --index-url https://download.pytorch.org/whl/cpu")


def stale_studio_files(installed: Path | None = None) -> list[str]:
    """Source files of the installed `studio` package that differ from this checkout's (PyInstaller bundles the
    installed one; an editable install is this checkout)."""
    import filecmp
    import importlib.util

    installed = installed or Path(importlib.util.find_spec("studio").origin).parent
    checkout = ROOT / "studio"
    if installed.resolve() == checkout.resolve():
        return []
    ours = {p.relative_to(checkout) for p in checkout.rglob("*.py")}
    theirs = {p.relative_to(installed) for p in installed.rglob("*.py")}
    differing = sorted(ours ^ theirs) + sorted(p for p in ours & theirs
                                               if not filecmp.cmp(checkout / p, installed / p, shallow=False))
    return [str(p) for p in differing]


def build_app(dist: Path, work: Path) -> Path:
    """PyInstaller's one-folder build: DIST/compression-studio/ (and the .app on macOS)."""
    stale = stale_studio_files()
    if stale:
        raise BuildError(f"the studio installed in this environment differs from {ROOT} ({stale[0]}, "
                         f"{len(stale)} file(s)): the app would bundle the installed one; pip install {ROOT} again")
    subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN",
                    "--distpath", str(dist), "--workpath", str(work), str(PACKAGING / "studio.spec")],
                   check=True, cwd=ROOT)
    return dist / NAME


# ---------------------------------------------------------------- Linux: .deb
def _elf_files(folder: Path) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def system_libraries(folder: Path) -> set[str]:
    """Shared libraries the bundle loads from the system (ldd of every ELF file, resolved outside the folder)."""
    bundled = {p.name for p in folder.rglob("*.so*")}
    outside = set()
    for elf in _elf_files(folder):
        result = subprocess.run(["ldd", str(elf)], capture_output=True, text=True)
        for line in result.stdout.splitlines():
            parts = line.split("=>")
            if len(parts) != 2 or "not found" in parts[1]:
                continue
            target = parts[1].split("(")[0].strip()
            if target and not target.startswith(str(folder)) and Path(target).name not in bundled:
                outside.add(os.path.realpath(target))
    return outside


def debian_depends(folder: Path) -> list[str]:
    """The Debian packages that own the system libraries the bundle needs (like dpkg-shlibdeps, without versions
    except glibc's, which must be at least the build host's)."""
    packages = set()
    for library in sorted(system_libraries(folder)):
        owner = subprocess.run(["dpkg", "-S", library], capture_output=True, text=True)
        if owner.returncode != 0:  # /lib is a link to /usr/lib on merged-/usr systems
            alias = library.replace("/usr/lib/", "/lib/", 1)
            owner = subprocess.run(["dpkg", "-S", alias], capture_output=True, text=True)
        if owner.returncode == 0:
            packages.add(owner.stdout.split(":")[0].strip())
    glibc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libc6"], capture_output=True, text=True).stdout
    return sorted(f"libc6 (>= {glibc.split('-')[0]})" if p == "libc6" and glibc else p for p in packages)


def build_deb(app: Path, dist: Path) -> Path:
    if not shutil.which("dpkg-deb"):
        raise BuildError("dpkg-deb is not installed: apt install dpkg")
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()
    app_version = version(NAME)
    target = dist / f"{NAME}_{app_version}_{arch}.deb"
    with tempfile.TemporaryDirectory(prefix="studio-deb-", dir=dist) as staging_dir:
        staging = Path(staging_dir)
        shutil.copytree(app, staging / "opt" / NAME, symlinks=True)
        (staging / "usr" / "bin").mkdir(parents=True)
        (staging / "usr" / "bin" / NAME).symlink_to(f"/opt/{NAME}/{NAME}")
        applications = staging / "usr" / "share" / "applications"
        applications.mkdir(parents=True)
        shutil.copy(PACKAGING / "linux" / f"{NAME}.desktop", applications)
        icons = staging / "usr" / "share" / "icons" / "hicolor"
        for size_dir, source in (("256x256", f"{NAME}.png"), ("scalable", f"{NAME}.svg")):
            (icons / size_dir / "apps").mkdir(parents=True)
            shutil.copy(ROOT / "resources" / "icons" / source, icons / size_dir / "apps" / source)
        depends = debian_depends(app)
        control = PACKAGING / "linux" / "control.in"
        (staging / "DEBIAN").mkdir()
        fields = control.read_text().format(version=app_version, arch=arch,
                                            installed_kib=folder_size(staging) // 1024)
        if depends:
            fields = fields.replace("Maintainer:", f"Depends: {', '.join(depends)}\nMaintainer:", 1)
        (staging / "DEBIAN" / "control").write_text(fields, encoding="utf-8")
        for script in ("postinst", "postrm"):
            shutil.copy(PACKAGING / "linux" / script, staging / "DEBIAN" / script)
            (staging / "DEBIAN" / script).chmod(0o755)
        # zstd 9: 8% smaller than dpkg's default level for 20 s more; xz would save 14% more for 4 minutes more
        partial = target.with_suffix(".deb.partial")
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zzstd", "-z9", "--build", str(staging), str(partial)],
                       check=True)
        partial.replace(target)
    return target


# ---------------------------------------------------------------- Windows: Inno Setup
def build_windows_installer(app: Path, dist: Path) -> Path:
    iscc = shutil.which("iscc") or r"C:\Program Files (x86)\Inno Setup 6\ISCC.exe"
    if not Path(iscc).exists() and not shutil.which(iscc):
        raise BuildError("Inno Setup's iscc was not found: install Inno Setup 6 (choco install innosetup)")
    app_version = version(NAME)
    subprocess.run([iscc, f"/DAppVersion={app_version}", f"/DSourceDir={app}", f"/DOutputDir={dist}",
                    f"/DIconFile={ROOT / 'resources' / 'icons' / f'{NAME}.ico'}",
                    str(PACKAGING / "windows" / f"{NAME}.iss")], check=True)
    return dist / f"CompressionStudio-{app_version}-setup.exe"


# ---------------------------------------------------------------- macOS: .dmg
def build_dmg(dist: Path) -> Path:
    bundle = dist / f"{DISPLAY_NAME}.app"
    target = dist / f"CompressionStudio-{version(NAME)}.dmg"
    with tempfile.TemporaryDirectory(prefix="studio-dmg-") as staging_dir:
        staging = Path(staging_dir)
        shutil.copytree(bundle, staging / bundle.name, symlinks=True)
        (staging / "Applications").symlink_to("/Applications")  # drag the app onto it to install
        target.unlink(missing_ok=True)
        subprocess.run(["hdiutil", "create", "-volname", DISPLAY_NAME, "-srcfolder", str(staging), "-ov",
                        "-format", "UDZO", str(target)], check=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, default=ROOT / "dist", help="where the app and installer go (./dist)")
    parser.add_argument("--work", type=Path, default=ROOT / "build", help="PyInstaller's work folder (./build)")
    parser.add_argument("--skip-app", action="store_true", help="package an app already built in --dist")
    args = parser.parse_args(argv)
    dist, work = args.dist.resolve(), args.work.resolve()
    try:
        check_environment()
        app = dist / NAME if args.skip_app else build_app(dist, work)
        if not (app / NAME).exists() and not (app / f"{NAME}.exe").exists():
            raise BuildError(f"{app} has no {NAME} executable: build the app first (without --skip-app)")
        print(f"app: {app} ({folder_size(app) / 2**20:.0f} MiB)")
        if sys.platform.startswith("linux"):
            artefact = build_deb(app, dist)
        elif sys.platform == "win32":
            artefact = build_windows_installer(app, dist)
        elif sys.platform == "darwin":
            artefact = build_dmg(dist)
        else:
            raise BuildError(f"no installer recipe for {sys.platform}")
    except (BuildError, subprocess.CalledProcessError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print(f"installer: {artefact} ({artefact.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
