import pytest

pytest.importorskip("pytestqt")


def test_window_opens_a_model_in_a_worker_and_shows_its_summary(qtbot, tiny_folder):
    from studio.gui.app import MainWindow

    window = MainWindow()
    qtbot.addWidget(window)
    window.show()
    window.load(str(tiny_folder))
    qtbot.waitUntil(lambda: window.loaded is not None, timeout=60_000)
    assert "decoder blocks 3" in window.view.toPlainText()
    assert "parameters" in window.statusBar().currentMessage()


def test_a_failed_load_is_shown_and_the_window_stays_usable(qtbot, tmp_path, monkeypatch):
    from studio.gui import app

    shown = []
    monkeypatch.setattr(app.QMessageBox, "critical", lambda parent, title, text: shown.append(text))
    window = app.MainWindow()
    qtbot.addWidget(window)
    window.load(str(tmp_path / "missing"))
    qtbot.waitUntil(lambda: bool(shown), timeout=30_000)
    assert "does not exist" in shown[0] and window.isEnabled()
