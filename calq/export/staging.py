"""Write an output folder so that no failure or kill leaves half of one behind, nor loses the one it replaces.

Everything is written into `.NAME.tmp-XXXXXXXX` next to the output, which holds a run file (`RUN_FILE`: the
writer's pid, host and output name). Publishing moves an existing output aside into `.NAME.old-XXXXXXXX` (with a
run file of its own), renames the temp folder to the output, then deletes the old one: at every moment a
complete output sits at its path or aside. On any exception, KeyboardInterrupt and SIGTERM included (the CLI turns
SIGTERM into one), the temp folder and the parent folders made for it are removed. A SIGKILL cannot be caught:
the next run writing into the same folder sweeps the folders of runs whose process is gone, and puts an output
one of them had moved aside back in place.

A resumable run (`compress --resume`) writes into `.NAME.partial` instead, a fixed name a later run finds, and
keeps it on failure or interruption once it holds a finished block (calibration/resume.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from calq.errors import CalqError

RUN_FILE = ".calq-run"
PREVIOUS = "previous"       # the replaced output, inside an `.old-` folder
_FIXES = {errno.EACCES: "choose a folder you can write to", errno.EPERM: "choose a folder you can write to",
          errno.EROFS: "choose a folder on a writable file system", errno.ENAMETOOLONG: "use a shorter path",
          errno.ENOSPC: "free disk space or write elsewhere", errno.EDQUOT: "free disk space or write elsewhere"}


def _oserror(e: OSError, output: Path) -> CalqError:
    return CalqError(f"cannot write {output}: {e.strerror or e}", _FIXES.get(e.errno, "choose another --output"))


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, a non-empty folder without --overwrite, or a folder that is not a model
    (--overwrite replaces model folders only, never, say, a home directory), or a name too long to create."""
    try:
        root = _existing_ancestor(output)
        name_max = os.pathconf(root, "PC_NAME_MAX")
        if len(os.fsencode(output.name)) > name_max:
            raise CalqError(f"output name {output.name[:40]}… is {len(os.fsencode(output.name))} bytes long; the "
                            f"file system allows {name_max}", "use a shorter name")
        if output.exists() and not output.is_dir():
            raise CalqError(f"output {output} is a file", "give the path of a folder to create")
        if output.is_dir() and any(output.iterdir()):
            if not overwrite:
                raise CalqError(f"output directory {output} exists and is not empty",
                                "pass --overwrite or pick another")
            if not (output / "config.json").is_file():
                raise CalqError(f"output directory {output} holds no model (no config.json); --overwrite replaces "
                                "model folders only", "pick another --output")
    except OSError as e:
        raise _oserror(e, output) from None


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute().parent
    while not os.path.lexists(p):
        p = p.parent
    if not p.is_dir():
        raise CalqError(f"{p} is a file, so {path} cannot be created under it", "choose an output path in a folder")
    return p


@contextmanager
def staged(output: str | Path, overwrite: bool = False, resumable: bool = False) -> Iterator[Path]:
    """A temp folder to write the output into, published at `output` when the block ends without an exception.
    resumable: the folder is `partial_folder(output)`, kept (with the parents made for it) when the block fails
    after a block was finished."""
    output = Path(output)
    check_output(output, overwrite)
    created: list[Path] = []
    tmp = None
    try:
        try:
            root = _existing_ancestor(output)
            sweep(root)
            for d in reversed([p for p in output.absolute().parents if not p.exists()]):
                d.mkdir()
                created.append(d)
            tmp = _partial(output) if resumable else _run_folder(output, "tmp")
        except OSError as e:
            raise _oserror(e, output) from None
        try:
            yield tmp
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):     # the disk filled up while writing
                raise _oserror(e, output) from None
            raise
        publish(tmp, output)
    except BaseException:
        if resumable and tmp is not None and any((tmp / "resume").glob("block-*.json")):
            raise               # finished blocks to continue from
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            _rmdir_if_empty(d)
        raise


def _rmdir_if_empty(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass                    # something else was put there meanwhile: not ours to remove


def partial_folder(output: Path) -> Path:
    return output.absolute().parent / f".{output.name[:200]}.partial"


def _partial(output: Path) -> Path:
    """The resumable run folder of output, made or taken over (refused while another live run holds it)."""
    d = partial_folder(output)
    try:
        run = json.loads((d / RUN_FILE).read_text())
    except (OSError, ValueError):
        run = None
    if run and run.get("host") == socket.gethostname() and run.get("pid") != os.getpid() and _alive(int(run["pid"])):
        raise CalqError(f"another calq run (pid {run['pid']}) is writing {d}", "wait for it to end, or stop it")
    d.mkdir(exist_ok=True)
    (d / RUN_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "output": output.name}))
    return d


def _run_folder(output: Path, kind: str) -> Path:
    # Temp names stay within NAME_MAX however long the output's name is; the run file keeps the real one.
    prefix = f".{output.name[:200]}.{kind}-"
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=output.absolute().parent))
    (d / RUN_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "output": output.name}))
    return d


def publish(tmp: Path, output: Path) -> None:
    """Move the finished temp folder to output, replacing an existing one (the caller checked --overwrite).
    mkdtemp and safetensors create owner-only folders and files; give them the permissions of any new file."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [tmp, *tmp.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    aside = None
    if output.exists():
        aside = _run_folder(output, "old")
        os.replace(output, aside / PREVIOUS)
    os.replace(tmp, output)
    (output / RUN_FILE).unlink()
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True             # another user's live process
    return True


def sweep(folder: Path) -> list[Path]:
    """Remove the run folders in `folder` whose process is dead on this host, putting back an output one had
    moved aside when nothing has replaced it since. Returns what was removed."""
    removed = []
    host = socket.gethostname()
    for d in [*folder.glob(".*.tmp-*"), *folder.glob(".*.old-*")]:
        try:
            run = json.loads((d / RUN_FILE).read_text())
            if run["host"] != host or _alive(int(run["pid"])):
                continue
            target = folder / run["output"]
            if (d / PREVIOUS).is_dir() and not target.exists():
                os.replace(d / PREVIOUS, target)
            shutil.rmtree(d)
            removed.append(d)
        except (OSError, ValueError, KeyError, TypeError):
            continue            # not a calq run folder, or one being written: leave it
    return removed
