"""Light and dark palettes; "system" follows the platform's color scheme."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication

THEMES = ("system", "light", "dark")


def dark_palette() -> QPalette:
    p = QPalette()
    roles = QPalette.ColorRole
    for role, color in (
        (roles.Window, "#2b2d30"), (roles.WindowText, "#dfe1e5"), (roles.Base, "#1e1f22"),
        (roles.AlternateBase, "#26282b"), (roles.ToolTipBase, "#3c3f41"), (roles.ToolTipText, "#dfe1e5"),
        (roles.Text, "#dfe1e5"), (roles.Button, "#393b40"), (roles.ButtonText, "#dfe1e5"),
        (roles.BrightText, "#ff6b68"), (roles.Highlight, "#3d7bd9"), (roles.HighlightedText, "#ffffff"),
        (roles.Link, "#6ea8ff"), (roles.PlaceholderText, "#8c8f94"), (roles.Mid, "#55585e"),
        (roles.Dark, "#1b1c1e"), (roles.Light, "#4a4d52"), (roles.Midlight, "#43464b"), (roles.Shadow, "#111"),
    ):
        p.setColor(role, QColor(color))
    for role in (roles.Text, roles.WindowText, roles.ButtonText):
        p.setColor(QPalette.ColorGroup.Disabled, role, QColor("#6f7277"))
    return p


def apply_theme(name: str) -> None:
    """Apply 'system', 'light' or 'dark' to the running application."""
    app = QApplication.instance()
    if app is None:
        return
    hints = QGuiApplication.styleHints()
    scheme = {"light": Qt.ColorScheme.Light, "dark": Qt.ColorScheme.Dark}.get(name, Qt.ColorScheme.Unknown)
    if hasattr(hints, "setColorScheme"):  # Qt 6.8+
        hints.setColorScheme(scheme)
    if name == "dark":
        app.setPalette(dark_palette())
    elif name == "light" and not hasattr(hints, "setColorScheme"):
        app.setPalette(app.style().standardPalette())
    else:
        app.setPalette(QPalette())  # nothing set: the platform's (light or dark) palette


def follow_palette(plot) -> None:
    """Give a pyqtgraph PlotWidget the palette's colours (base background, text-coloured axes and title) instead
    of pyqtgraph's fixed black; call again when the palette changes."""
    palette = QApplication.palette(plot)  # the widget's own palette follows a new application palette only later
    text = palette.color(QPalette.ColorRole.WindowText)
    plot.setBackground(palette.color(QPalette.ColorRole.Base))
    item = plot.getPlotItem()
    for name in ("left", "bottom", "right", "top"):
        axis = item.getAxis(name)
        axis.setPen(text)
        axis.setTextPen(text)
    if item.titleLabel is not None:
        item.titleLabel.opts["color"] = text
        item.titleLabel.setText(item.titleLabel.text)
    if item.legend is not None:
        item.legend.setLabelTextColor(text)
