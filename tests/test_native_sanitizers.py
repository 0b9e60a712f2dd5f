"""The native CPU LoRA kernel and its side thread under gcc's sanitizers: the kernel built with -fsanitize=address
(out-of-bounds reads and writes of the weights, activations and outputs, use after free) and with
-fsanitize=thread (data races between the caller and the worker thread), each loaded into a fresh Python (the
sanitizer runtime preloaded, since python itself is not built with it) that runs the kernel's self-check, the side
thread's self-check and race test, and the plans' reference checks. Any report fails the test and is shown.

    pytest tests/test_native_sanitizers.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters import kernel_build

ROOT = Path(__file__).resolve().parent.parent
# ThreadSanitizer without OpenMP: libgomp is not instrumented, so its barriers would look like races
FLAGS = {
    "address": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address", "-fopenmp"],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
}
RUNTIME = {"address": "libasan.so", "thread": "libtsan.so"}
# what runs under each, in one process: the kernel's and the side thread's self-checks, then the side thread's race
# test (hundreds of back-to-back calls, the worker asleep between some) and the plans against the float64 reference
# (threads_split: calls big enough for OpenMP's threads, in the ASan build)
SCRIPT = """
import sys, pytest
from adapters import lora_side_thread, native_lora
assert native_lora.load() is not None, native_lora.unavailable_reason()
print("library", native_lora.load()._name)
print("kernel self-check", native_lora._self_check(), "side thread self-check", lora_side_thread._self_check())
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_lora_side_thread.py", "tests/test_native_lora.py",
                      "-k", "many_calls or never_finished or every_group or threads_split"]))
"""


def _runtime(kind: str) -> Path | None:
    cc = kernel_build.compiler()
    if cc is None or "gcc" not in Path(cc).resolve().name:  # (the flags and runtimes are gcc's)
        return None
    found = subprocess.run([cc, f"-print-file-name={RUNTIME[kind]}"], capture_output=True, text=True).stdout.strip()
    return Path(found) if os.path.isabs(found) and Path(found).exists() else None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["address", "thread"])
def test_kernel_and_side_thread_run_clean_under_the_sanitizer(kind: str, tmp_path: Path) -> None:
    runtime = _runtime(kind)
    if runtime is None:
        pytest.skip(f"no gcc with the {kind} sanitizer runtime here")
    library = kernel_build.build(flags=FLAGS[kind])
    reports = tmp_path / "report"
    options = f"log_path={reports}:exitcode=66" + (":detect_leaks=0" if kind == "address" else ":halt_on_error=0")
    env = {**os.environ, "LD_PRELOAD": str(runtime), "LORAFLEET_NATIVE_LORA_LIB": str(library),
           "ASAN_OPTIONS" if kind == "address" else "TSAN_OPTIONS": options, "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    found = "\n".join(path.read_text() for path in sorted(tmp_path.glob("report*")))
    assert not found, f"{kind} sanitizer report:\n{found[:6000]}"
    assert done.returncode == 0, f"exit {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}"
    assert f"library {library}" in done.stdout  # the sanitized build is what ran
    checks = [float(v) for v in done.stdout.split("self-check")[1:] for v in v.split()[:1]]
    assert len(checks) == 2 and checks[0] < 1e-5 and checks[1] == 0.0, done.stdout
    assert " passed" in done.stdout and "failed" not in done.stdout and "skipped" not in done.stdout, done.stdout
