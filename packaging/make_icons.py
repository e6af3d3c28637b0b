"""Draw the app's icons from resources/icons/compression-studio.svg: the PNG (Linux .desktop, window icon), the
Windows .ico and the macOS .icns. Run after editing the SVG: python packaging/make_icons.py"""

import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtGui import QGuiApplication, QImage, QPainter  # noqa: E402
from PySide6.QtSvg import QSvgRenderer  # noqa: E402

ICONS = Path(__file__).resolve().parents[1] / "resources" / "icons"


def render(renderer: QSvgRenderer, pixels: int) -> QImage:
    image = QImage(pixels, pixels, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    return image


def main() -> None:
    app = QGuiApplication([])  # noqa: F841 (QImage writers need one)
    renderer = QSvgRenderer(str(ICONS / "compression-studio.svg"))
    for suffix, pixels, image_format in (("png", 256, "PNG"), ("ico", 256, "ICO"), ("icns", 512, "ICNS")):
        path = ICONS / f"compression-studio.{suffix}"
        if not render(renderer, pixels).save(str(path), image_format):
            raise SystemExit(f"could not write {path}")
        print(path)


if __name__ == "__main__":
    main()
