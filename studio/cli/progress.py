"""Run events as progress bars on stderr: one bar per step counting decoder blocks, one per evaluation."""

import sys

from tqdm import tqdm

from studio.core import events as ev


class ProgressPrinter:
    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr  # looked up now: tests swap sys.stderr
        self.bar: tqdm | None = None
        self.step_label = ""

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.StepStarted):
            self._close()
            self.step_label = f"step {event.ordinal + 1}/{event.total_steps} {event.method}"
        elif isinstance(event, ev.Progress):
            self._advance(event)
        elif isinstance(event, ev.Metric) and event.name in ("perplexity", "kl"):
            what = "original" if event.index is None else f"after step {event.index + 1}"
            self._write(f"{event.name} {what}: {event.value:.4f}")
        elif isinstance(event, ev.Warning):
            self._write(f"warning: {event.message}")
        elif isinstance(event, (ev.RunFinished, ev.RunFailed, ev.RunCancelled)):
            self._close()

    def _advance(self, event: ev.Progress) -> None:
        if self.bar is None:
            label = self.step_label if event.unit == "block" else (
                "evaluating the original" if event.index < 0 else f"evaluating after step {event.index + 1}")
            self.bar = tqdm(desc=label, total=event.total, unit=event.unit, file=self.stream, leave=True)
        self.bar.n = event.done
        self.bar.refresh()
        if event.done >= event.total:
            self._close()

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._close()
