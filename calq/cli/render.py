"""rich rendering: the block progress bar and the result table."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class EventProgress:
    """Draws the API's progress events: compression (block i/N, methods, tokens, s/block, ETA), block-wise and
    LoRA training steps, evaluation (windows per dataset), and phase notices as dim lines."""

    def __init__(self, console, transient: bool = False):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[unit]}"),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=transient)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def _task(self, key: str, description: str, total: int):
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total, unit="", info="")
        return self.tasks[key]

    def update(self, e: dict) -> None:
        kind = e["event"]
        if kind == "phase":
            self.progress.console.print(f"[dim]{e['name']}…[/]")
        elif kind == "start":
            self.progress.update(self._task("blocks", ", ".join(e["methods"]), e["blocks"]),
                                 unit=f"block 0/{e['blocks']}")
        elif kind == "block_end" and "blocks" in self.tasks:
            self.progress.update(self.tasks["blocks"], completed=e["index"] + 1,
                                 unit=f"block {e['index'] + 1}/{e['total']}",
                                 info=f"{e['tokens']:,} tokens, {e['seconds']:.1f}s/block")
        elif kind == "train" and "blocks" in self.tasks:         # block-wise training inside block i
            self.progress.update(self.tasks["blocks"], info=f"block {e['index'] + 1}: step {e['step']}/{e['total']}, "
                                 f"loss {e['loss']:.4f}")
        elif kind == "lora":                                    # a model-level fine-tune (preprocessing)
            task = self._task("lora", "restorative LoRA", e["total"])
            self.progress.update(task, completed=e["step"], unit=f"step {e['step']}/{e['total']}",
                                 info=f"loss {e['loss']:.4f}")
        elif kind == "eval":
            task = self._task("eval:" + e["dataset"], e["dataset"][-40:], e["total"])
            self.progress.update(task, completed=e["done"], unit=f"{e['done']}/{e['total']} windows")


def report_table(report) -> Table:
    t = Table(title=f"calq: {report.model}")
    for c in ("dataset", "windows", "dense ppl", "compressed ppl", "ratio"):
        t.add_column(c)
    for e in report.evaluation:
        t.add_row(e.dataset, str(e.windows), f"{e.baseline_ppl:.3f}", f"{e.ppl:.3f}",
                  f"{e.ppl / e.baseline_ppl:.4f}")
    bpp = f" · {report.bits_per_parameter_blocks:.3f} bits/parameter over the blocks" \
        if report.bits_per_parameter_blocks is not None else ""
    t.caption = (f"{report.bits_per_weight:.3f} bits/weight{bpp} · "
                 f"checkpoint {report.checkpoint_bytes / 2**20:.2f} MiB "
                 f"(dense {report.dense_bytes / 2**20:.2f} MiB) · {report.timings['total']:.1f}s · "
                 f"peak RSS {report.peak_rss_bytes / 2**30:.2f} GiB")
    kv = report.kv_cache
    if kv:
        t.caption += (f" · KV cache {kv['label']}: {kv['bits_per_element']:.2f} bits/element, "
                      f"{kv['kv_cache_ratio']:.3f}× fp16 KV (compressed ppl measured under it)")
    return t
