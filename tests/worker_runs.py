"""Running launchers and worker processes from tests, robustly on a loaded 2-core machine.

* One thread per process (``OMP_NUM_THREADS=1``...): two workers on two cores, not eight threads
  fighting for them.
* A generous timeout: a run that takes 3 minutes on a busy machine must not fail at 5.
* ``PYTHONFAULTHANDLER=1``: a worker that aborts (``exitcode: -6``) or segfaults prints the Python
  stack of every thread first, so the failure says where it happened.
* On failure the assertion message carries the workers' own tracebacks, picked out of the
  launcher's output (which otherwise ends with the launcher's summary and pushes them out).

Ports: launch with ``--main_process_port 0`` (accelerate binds port 0 for a free one) -- never a
fixed port, which two test runs on one machine would share.
"""

from __future__ import annotations

import os
import subprocess

import pytest

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

_STARTS = ("Traceback (most recent call last):", "Fatal Python error:", "terminate called", "ChildFailedError")


def worker_errors(output: str, max_lines: int = 60) -> str:
    """The tracebacks, fatal-error stacks and launcher failure summaries in ``output``, each once."""
    lines = output.splitlines()
    blocks: list[str] = []
    for start, line in enumerate(lines):
        if not any(marker in line for marker in _STARTS):
            continue
        end = start + 1
        while end < len(lines) and end - start < max_lines and not any(marker in lines[end] for marker in _STARTS):
            end += 1
        block = "\n".join(lines[start:end]).rstrip()
        if block not in blocks:
            blocks.append(block)
    return "\n\n".join(blocks)


def run_checked(cmd: list[str], cwd, timeout: float = 1800, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; fail the test with the workers' own tracebacks if it fails or does not finish."""
    full_env = {**os.environ, **THREAD_ENV, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    try:
        done = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        output = "".join(part if isinstance(part, str) else (part or b"").decode(errors="replace")
                         for part in (error.stdout, error.stderr))
        pytest.fail(f"{' '.join(cmd[:6])} ... did not finish in {timeout:.0f} s\n{worker_errors(output)}\n"
                    f"--- last output ---\n{output[-2000:]}")
    if done.returncode != 0:
        output = done.stdout + "\n" + done.stderr
        pytest.fail(f"{' '.join(cmd[:6])} ... exited with {done.returncode}\n--- worker errors ---\n"
                    f"{worker_errors(output) or '(no traceback printed)'}\n--- last output ---\n{output[-2000:]}")
    return done
