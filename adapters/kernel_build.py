"""Compiling the native CPU LoRA kernel (`adapters/kernels/*.c`) into a cached shared library.

Plain C (no Python or torch headers), compiled with the system C compiler (`$CC`, else `cc`/`gcc`/`clang`) in about
a second, and cached under `~/.cache/lorafleet/kernels/` (`$LORAFLEET_KERNEL_CACHE`) by a hash of every file of the
sources' folder (headers included), the compiler, the flags and the CPU model/features (the default build uses
`-march=native`, so a cache shared by different machines keeps one build per CPU kind). Builds are atomic (a temp
file renamed into place), so concurrent builders are harmless.

When it is built (a choice, see README "Serving config"): on first use, in the process that uses it (the engine
builds it when it starts, not in a request), not at `pip install` time. The library is compiled for the CPU that
runs it (`-march=native`), and that is the Ray worker's node, which a wheel or an image built elsewhere does not
know; Ray jobs also run from their uploaded working dir, not from the installed package. A prebuilt library can be
named with `$LORAFLEET_NATIVE_LORA_LIB` (see `native_lora`); its ABI is checked before use either way.
`python -m adapters.native_lora` builds it ahead of time (e.g. in an image's last step, on the target machine).

    python -m adapters.kernel_build            # build (or find in the cache) and print the library's path
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

KERNELS = Path(__file__).parent / "kernels"
SOURCES = (KERNELS / "bgmv_cpu.c", KERNELS / "side_worker.c")  # (+ bgmv_cpu.h, which both include)
# compiler flags, best first: OpenMP (threads, via the libgomp PyTorch already loaded) and -march=native
BUILD_FLAGS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])


def compiler() -> str | None:
    """The C compiler a build uses: `$CC`, else the first of cc, gcc, clang on PATH; None if there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_fingerprint() -> str:
    """The CPU kind a `-march=native` build is for: machine, model name and feature flags."""
    parts = [os.uname().machine]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part"):
                parts.append(line)
                if len(parts) > 4:
                    break
    except OSError:
        pass
    return "\n".join(parts)


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_KERNEL_CACHE") or Path.home() / ".cache" / "lorafleet" / "kernels")


def build(sources: Path | Sequence[Path] = SOURCES, flags: Sequence[str] | None = None) -> Path:
    """Compile `sources` into one library in the cache and return it. `flags`: exactly these compiler flags (e.g. a
    sanitizer build); None: the best of `BUILD_FLAGS` the compiler accepts. Raises RuntimeError with the compiler's
    message if nothing builds."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc)")
    sources = (sources,) if isinstance(sources, Path) else tuple(sources)
    candidates = [list(flags)] if flags is not None else [list(f) for f in BUILD_FLAGS]
    inputs = sorted({*sources, *sources[0].parent.glob("*.h")})
    digest = hashlib.sha256(b"".join(path.name.encode() + path.read_bytes() for path in inputs))
    digest.update("\0".join([cc, cpu_fingerprint(), *candidates[0]]).encode())
    target = cache_dir() / f"{sources[0].stem}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        for candidate in candidates:  # OpenMP and this CPU's instructions if the compiler can, else less
            cmd = [cc, *candidate, "-std=gnu11", "-pthread", "-shared", "-fPIC", "-o", str(out), *map(str, sources)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"'{' '.join(cmd)}' failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        os.replace(out, target)
    return target


if __name__ == "__main__":
    print(build())
