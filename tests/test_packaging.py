"""The installer's pieces that run in seconds: the .deb layout from a stand-in app folder, the desktop entry,
where resources are found after a wheel install, and the checks the smoke test applies to a self-test report.
The full build is `python packaging/smoke_test.py` (minutes; see README, "Build an installer")."""

import configparser
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"packaging_{name}", ROOT / "packaging" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load("build")
smoke = _load("smoke_test")


def test_the_desktop_entry_runs_the_installed_app_with_its_icon():
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str
    entry.read(ROOT / "packaging" / "linux" / "compression-studio.desktop")
    section = entry["Desktop Entry"]
    assert section["Type"] == "Application" and section["Name"] == "Compression Studio"
    assert section["Exec"].split()[0] == "/opt/compression-studio/compression-studio"
    assert (ROOT / "resources" / "icons" / f"{section['Icon']}.png").exists()
    if shutil.which("desktop-file-validate"):
        subprocess.run(["desktop-file-validate", str(ROOT / "packaging" / "linux" / "compression-studio.desktop")],
                       check=True)


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs dpkg-deb (Debian, Ubuntu)")
def test_the_deb_holds_the_app_a_launcher_the_desktop_entry_and_icons(tmp_path):
    app = tmp_path / "dist" / "compression-studio"
    (app / "_internal").mkdir(parents=True)
    executable = app / "compression-studio"
    executable.write_text("#!/bin/sh\necho studio\n")
    executable.chmod(0o755)
    (app / "_internal" / "data.txt").write_text("x" * 5000)

    package = build.build_deb(app, tmp_path / "dist")

    assert package.name.startswith("compression-studio_") and package.suffix == ".deb"
    assert not list((tmp_path / "dist").glob("*.partial")) and not list((tmp_path / "dist").glob("studio-deb-*"))
    prefix = tmp_path / "prefix"
    subprocess.run(["dpkg-deb", "-x", str(package), str(prefix)], check=True)
    assert (prefix / "opt/compression-studio/compression-studio").stat().st_mode & 0o111
    assert (prefix / "opt/compression-studio/_internal/data.txt").read_text() == "x" * 5000
    assert (prefix / "usr/bin/compression-studio").readlink() == Path("/opt/compression-studio/compression-studio")
    assert (prefix / "usr/share/applications/compression-studio.desktop").exists()
    assert (prefix / "usr/share/icons/hicolor/256x256/apps/compression-studio.png").exists()
    assert (prefix / "usr/share/icons/hicolor/scalable/apps/compression-studio.svg").exists()

    def field(name: str) -> str:
        return subprocess.run(["dpkg-deb", "-f", str(package), name], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert field("Package") == "compression-studio" and field("Version") == build.version("compression-studio")
    assert int(field("Installed-Size")) >= 5  # KiB, counted from the files
    # A shell script loads no shared libraries, so nothing but what the control template writes is required.
    assert field("Depends") == ""


def test_the_debian_dependencies_are_the_packages_owning_the_libraries_an_elf_file_loads(tmp_path):
    if not shutil.which("dpkg") or not shutil.which("ldd"):
        pytest.skip("needs dpkg and ldd")
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(sys.executable, app / "python")  # an ELF file that links to libc (and here libpython)
    depends = build.debian_depends(app)
    assert any(d.startswith("libc6 (>= ") for d in depends), depends


def test_resources_are_found_in_the_prefix_after_a_wheel_install(tmp_path):
    from studio.core.paths import RESOURCES_DIR, resources_dir

    assert (RESOURCES_DIR / "presets").is_dir()  # this checkout
    installed = tmp_path / "prefix" / "share" / "compression-studio"
    (installed / "presets").mkdir(parents=True)
    site_packages_file = tmp_path / "site-packages" / "studio" / "core" / "paths.py"  # no resources/ beside it
    assert resources_dir(str(site_packages_file), str(tmp_path / "prefix")) == installed
    assert resources_dir(str(ROOT / "studio" / "core" / "paths.py"), str(tmp_path / "prefix")) == ROOT / "resources"


def _report(**changes):
    report = {"status": "passed", "platform": "xcb", "checks": {},
              "installation": {"frozen": True, "modules_outside_app": [], "python_libraries_outside_app": []}}
    report.update(changes)
    return report


def test_the_smoke_test_accepts_only_a_frozen_xcb_run_that_brought_everything():
    smoke.check_report(_report())
    for bad, expected in ((_report(platform="offscreen"), "not xcb"),
                          (_report(status="failed", reason="boom"), "boom"),
                          (_report(installation={"frozen": False}), "sys.frozen"),
                          (_report(installation={"frozen": True, "modules_outside_app": ["/usr/lib/python3/x.py"]}),
                           "modules_outside_app")):
        with pytest.raises(smoke.SmokeTestFailed, match=expected):
            smoke.check_report(bad)


def test_a_built_app_lists_the_modules_it_imported_from_outside_its_folder(tmp_path, monkeypatch):
    from studio.gui.self_test import installation

    assert installation()["frozen"] is False
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    about = installation()
    assert about["frozen"] is True and about["app_folder"] == str(tmp_path)
    assert any(path.endswith("self_test.py") for path in about["modules_outside_app"])


def test_the_build_refuses_an_installed_studio_that_differs_from_the_checkout(tmp_path):
    assert build.stale_studio_files() == []  # the tests run on an editable install of this checkout
    installed = tmp_path / "studio"
    shutil.copytree(ROOT / "studio", installed, ignore=shutil.ignore_patterns("__pycache__"))
    assert build.stale_studio_files(installed) == []
    (installed / "gui" / "app.py").write_text("# an older release\n")
    (installed / "old_module.py").write_text("")
    assert build.stale_studio_files(installed) == ["old_module.py", str(Path("gui") / "app.py")]
