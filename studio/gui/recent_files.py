"""A most-recent-first list of paths (or hub ids) kept in QSettings, shown as a submenu."""

from __future__ import annotations

from typing import Callable

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QMenu

MAX_RECENT = 8


class RecentFiles:
    def __init__(self, settings: QSettings, key: str, menu: QMenu, on_open: Callable[[str], None]):
        self.settings, self.key, self.menu, self.on_open = settings, key, menu, on_open
        menu.aboutToShow.connect(self._fill)

    def items(self) -> list[str]:
        value = self.settings.value(self.key)
        if value is None:
            return []
        return [value] if isinstance(value, str) else [str(v) for v in value]

    def add(self, item: str) -> None:
        items = [item] + [i for i in self.items() if i != item]
        self.settings.setValue(self.key, items[:MAX_RECENT])

    def clear(self) -> None:
        self.settings.remove(self.key)

    def _fill(self) -> None:
        self.menu.clear()
        items = self.items()
        for n, item in enumerate(items, 1):
            action = self.menu.addAction(f"&{n}  {item}")
            action.triggered.connect(lambda _=False, i=item: self.on_open(i))
        if not items:
            self.menu.addAction("(none yet)").setEnabled(False)
        else:
            self.menu.addSeparator()
            self.menu.addAction("Clear list", self.clear)
