"""Draws each pipeline step as a card (enabled check box, number, method, parameters, estimate or problem)
with an arrow down to the next step; the check box toggles the step."""

from __future__ import annotations

from PySide6.QtCore import QEvent, QPointF, QRect, QSize, Qt
from PySide6.QtGui import QColor, QFont, QPainter, QPainterPath, QPalette, QPen, QPolygonF
from PySide6.QtWidgets import QStyle, QStyledItemDelegate, QStyleOptionButton, QApplication

from studio.core.registry import Family, get_method
from studio.gui.formatting import human_bytes, human_seconds
from studio.gui.pipeline_model import STATUS_ROLE, STEP_ROLE

FAMILY_COLORS = {
    Family.QUANTIZATION: "#3d7bd9",
    Family.PRUNING: "#e08a1e",
    Family.DISTILLATION: "#8e5bd6",
    Family.COMPACT_ARCHITECTURE: "#3aa460",
    Family.DYNAMIC: "#1ea3a8",
}
ERROR_COLOR = QColor("#d32f2f")
ARROW = 22
MARGIN = 8
PADDING = 8
CHECK = 18


def params_text(params: dict) -> str:
    return "  ·  ".join(f"{k} {v}" for k, v in params.items()) or "default parameters"


def _method(step):
    try:
        return get_method(step.method)
    except KeyError:
        return None


class StepCardDelegate(QStyledItemDelegate):
    def _card_rect(self, option, index) -> QRect:
        last = index.row() == index.model().rowCount() - 1
        return option.rect.adjusted(MARGIN, 4, -MARGIN, -4 if last else -ARROW)

    def _check_rect(self, card: QRect) -> QRect:
        return QRect(card.left() + PADDING + 4, card.top() + PADDING, CHECK, CHECK)

    def sizeHint(self, option, index) -> QSize:
        line = option.fontMetrics.height()
        last = index.row() == index.model().rowCount() - 1
        return QSize(260, 3 * line + 2 * PADDING + 14 + (8 if last else ARROW))

    def paint(self, painter: QPainter, option, index) -> None:
        step, status = index.data(STEP_ROLE), index.data(STATUS_ROLE)
        if step is None:
            return
        method = _method(step)
        pal = option.palette
        card = self._card_rect(option, index)
        selected = bool(option.state & QStyle.StateFlag.State_Selected)
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)

        path = QPainterPath()
        path.addRoundedRect(card, 6, 6)
        base = pal.color(QPalette.ColorRole.Base)
        painter.fillPath(path, base if step.enabled else pal.color(QPalette.ColorRole.Window))
        stripe = QColor(FAMILY_COLORS.get(method.family, "#888") if method else "#888")
        painter.save()
        painter.setClipPath(path)
        painter.fillRect(QRect(card.left(), card.top(), 5, card.height()), stripe)
        painter.restore()
        border = ERROR_COLOR if status is not None and not status.valid else (
            pal.color(QPalette.ColorRole.Highlight) if selected else pal.color(QPalette.ColorRole.Mid)
        )
        pen = QPen(border, 2 if selected or (status is not None and not status.valid) else 1)
        if not step.enabled:
            pen.setStyle(Qt.PenStyle.DashLine)
        painter.setPen(pen)
        painter.drawPath(path)

        check = QStyleOptionButton()
        check.rect = self._check_rect(card)
        check.state = QStyle.StateFlag.State_Enabled | (
            QStyle.StateFlag.State_On if step.enabled else QStyle.StateFlag.State_Off
        )
        style = option.widget.style() if option.widget else QApplication.style()
        style.drawControl(QStyle.ControlElement.CE_CheckBox, check, painter, option.widget)

        text_color = pal.color(QPalette.ColorRole.Text if step.enabled else QPalette.ColorRole.PlaceholderText)
        line = option.fontMetrics.height()
        left = card.left() + PADDING + CHECK + 12
        width = card.right() - PADDING - left
        title_font = QFont(option.font)
        title_font.setBold(True)
        painter.setFont(title_font)
        painter.setPen(text_color)
        title = f"{index.row() + 1}.  {method.title if method else step.method}"
        if not step.enabled:
            title += "  (disabled)"
        painter.drawText(QRect(left, card.top() + PADDING, width, line), Qt.AlignmentFlag.AlignVCenter, title)
        painter.setFont(option.font)
        if method:
            painter.setPen(stripe)
            painter.drawText(QRect(left, card.top() + PADDING, width, line),
                             Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, method.family.value)
        painter.setPen(text_color)
        metrics = option.fontMetrics
        params = metrics.elidedText(params_text(step.params), Qt.TextElideMode.ElideRight, width)
        middle = Qt.AlignmentFlag.AlignVCenter
        painter.drawText(QRect(left, card.top() + PADDING + line + 4, width, line), middle, params)
        detail, color = self._detail(step, status, pal)
        painter.setPen(color)
        painter.drawText(QRect(left, card.top() + PADDING + 2 * line + 8, width, line), Qt.AlignmentFlag.AlignVCenter,
                         metrics.elidedText(detail, Qt.TextElideMode.ElideRight, width))

        if index.row() < index.model().rowCount() - 1:
            self._arrow(painter, card, option.rect, pal.color(QPalette.ColorRole.Mid))
        painter.restore()

    @staticmethod
    def _detail(step, status, pal) -> tuple[str, QColor]:
        if status is not None and not status.valid:
            text = status.message.split(": ", 1)[-1]
            return "⚠ " + text, ERROR_COLOR
        muted = pal.color(QPalette.ColorRole.PlaceholderText)
        if status is not None and status.estimate is not None:
            est = status.estimate
            layers = f"{status.layers} layers  ·  " if status.layers is not None else ""
            return f"{layers}needs ≈ +{human_bytes(est.extra_bytes)}  ·  ≈ {human_seconds(est.seconds)}", muted
        targets = step.targets
        scope = "default targets" if targets.include == ("*",) and not targets.exclude else "custom targets"
        return f"{scope}  ·  open a model for memory and time estimates", muted

    @staticmethod
    def _arrow(painter: QPainter, card: QRect, cell: QRect, color: QColor) -> None:
        x = card.center().x()
        top, bottom = card.bottom() + 3, cell.bottom() + 2
        painter.setPen(QPen(color, 2))
        painter.drawLine(QPointF(x, top), QPointF(x, bottom - 6))
        painter.setBrush(color)
        painter.setPen(Qt.PenStyle.NoPen)
        painter.drawPolygon(QPolygonF([QPointF(x - 5, bottom - 7), QPointF(x + 5, bottom - 7), QPointF(x, bottom)]))

    def editorEvent(self, event, model, option, index) -> bool:
        if event.type() == QEvent.Type.MouseButtonRelease and event.button() == Qt.MouseButton.LeftButton:
            hit = self._check_rect(self._card_rect(option, index)).adjusted(-3, -3, 3, 3)
            if hit.contains(event.position().toPoint()):
                step = index.data(STEP_ROLE)
                checked = Qt.CheckState.Unchecked if step.enabled else Qt.CheckState.Checked
                return model.setData(index, checked, Qt.ItemDataRole.CheckStateRole)
        return False
