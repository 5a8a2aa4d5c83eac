"""rich rendering: the block progress bar and the result table."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class BlockProgress:
    """Draws engine events: block i/N, methods, tokens, elapsed and ETA."""

    def __init__(self, console):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("block {task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self.task = None
        self.lora = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def update(self, e: dict) -> None:
        if e["event"] == "phase":
            self.progress.console.print(f"[dim]{e['name']}…[/]")
        elif e["event"] == "start":
            self.task = self.progress.add_task(", ".join(e["methods"]), total=e["blocks"], info="")
        elif e["event"] == "block_end" and self.task is not None:
            self.progress.update(self.task, completed=e["index"] + 1,
                                 info=f"{e['tokens']:,} tokens, {e['seconds']:.1f}s/block")
        elif e["event"] == "train" and self.task is not None:      # block-wise training inside block i
            self.progress.update(self.task, info=f"block {e['index'] + 1}: step {e['step']}/{e['total']}, "
                                 f"loss {e['loss']:.4f}")
        elif e["event"] == "lora":                                  # a model-level fine-tune (preprocessing)
            if self.lora is None:
                self.lora = self.progress.add_task("restorative LoRA", total=e["total"], info="")
            self.progress.update(self.lora, completed=e["step"], info=f"loss {e['loss']:.4f}")


class EvalProgress:
    """Draws evaluation events (windows scored per dataset) and phase notices, on stderr so --json stays clean."""

    def __init__(self, console):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                                 "{task.total} windows"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=True)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def update(self, e: dict) -> None:
        if e["event"] == "phase":
            self.progress.console.print(f"[dim]{e['name']}…[/]")
        elif e["event"] == "eval":
            if e["dataset"] not in self.tasks:
                self.tasks[e["dataset"]] = self.progress.add_task(e["dataset"][-40:], total=e["total"])
            self.progress.update(self.tasks[e["dataset"]], completed=e["done"])


def report_table(report) -> Table:
    t = Table(title=f"calq: {report.model}")
    for c in ("dataset", "windows", "dense ppl", "compressed ppl", "ratio"):
        t.add_column(c)
    for e in report.evaluation:
        t.add_row(e.dataset, str(e.windows), f"{e.baseline_ppl:.3f}", f"{e.ppl:.3f}",
                  f"{e.ppl / e.baseline_ppl:.4f}")
    t.caption = (f"{report.bits_per_weight:.3f} bits/weight · checkpoint {report.checkpoint_bytes / 2**20:.2f} MiB "
                 f"(dense {report.dense_bytes / 2**20:.2f} MiB) · {report.timings['total']:.1f}s · "
                 f"peak RSS {report.peak_rss_bytes / 2**30:.2f} GiB")
    return t
