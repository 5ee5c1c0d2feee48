"""Inside the process launched by ``gradtel run`` / ``gradtel check``: instrument everything, report at the end.

The CLI passes its options in ``GRADTEL_RUN_OPTIONS`` (JSON, parsed, never evaluated). The variable is removed
from the environment at once, so subprocesses the script starts (data loaders) run uninstrumented and never
overwrite the report. The report is written when the script ends normally, by an exception, by ``sys.exit``, by
SIGINT (KeyboardInterrupt) or by SIGTERM; the exit status stays the script's.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from gradtel import auto, export, instrumenting, registry, render, reporting

ENV = "GRADTEL_RUN_OPTIONS"
log = logging.getLogger("gradtel")

#: ``gradtel check`` exit codes (documented in the README).
EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_TOO_FEW_STEPS = 0, 1, 3
#: How often the check watcher looks at the step counters.
CHECK_POLL_S = 0.05
#: How long the check watcher waits, once the steps are counted, for an optimizer step still in progress to end.
STEP_GRACE_S = 10.0


@dataclass(frozen=True)
class RunOptions:
    report: str | None = None
    expect_missing: list[str] = field(default_factory=list)
    check_steps: int | None = None  # set by ``gradtel check``: stop after this many steps
    json_output: bool = False
    check_timeout: float = 30.0  # ``gradtel check``: how long to wait for the other optimizers once one is done
    launcher_version: str = ""  # the launching gradtel's: the bootstrap refuses a Python that imports another one

    def to_env(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_env(cls, raw: str) -> RunOptions:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"{ENV} must be a JSON object")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


_options = RunOptions()
#: ``check --json``: the original stdout, kept for the JSON alone (the script's own output goes to stderr).
_json_fd: int | None = None
_pid: int | None = None  # the launched process; forked children (data loaders) must not report or flush
_finished = threading.Event()
_lock = threading.Lock()
#: ``gradtel check``: held from building the report to ``os._exit``, by the watcher or by the exit hook, so the
#: script ending while the watcher judges waits for the verdict instead of ending the process without it.
_judging = threading.Lock()


def bootstrap_from_env() -> None:
    """Called from the bootstrap sitecustomize; does nothing in processes gradtel did not launch."""
    raw = os.environ.pop(ENV, None)
    if raw is None:
        return
    global _options, _pid
    _options = RunOptions.from_env(raw)
    _pid = os.getpid()
    if _options.json_output:
        _keep_stdout_for_json()
    auto.enable(expect_missing=_options.expect_missing)
    atexit.register(_at_exit)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    if _options.check_steps:
        threading.Thread(target=_watch_steps, name="gradtel-check", daemon=True).start()


def _keep_stdout_for_json() -> None:
    """Point fd 1 (and so the script's prints, Python's and C's) at stderr; keep a copy of it for the JSON."""
    global _json_fd
    sys.stdout.flush()
    _json_fd = os.dup(1)
    os.dup2(2, 1)


def _finish() -> dict[str, Any] | None:
    """Write the report and flush the export, once, whichever way the process ends."""
    with _lock:
        if _finished.is_set():
            return None
        _finished.set()
        report = None
        try:
            report = reporting.build()
            if _options.report:
                reporting.write(_options.report, report)
        except OSError as error:  # a --report path that cannot be written: a mistake to name, not a traceback
            log.warning(
                "gradtel: cannot write the report to %r (--report): %s", _options.report, error.strerror or error
            )
        except Exception:
            log.warning("gradtel: writing the report failed", exc_info=True)
        try:
            export.shutdown()
        except Exception:
            log.warning("gradtel: the final export flush failed", exc_info=True)
        return report


def _at_exit() -> None:
    if os.getpid() != _pid:
        return
    if _options.check_steps:
        with _judging:
            _judge_at_exit(_finish())
    report = _finish()
    if report is not None:
        _summarize(report)


def _judge_at_exit(report: dict[str, Any] | None) -> None:
    """The script ended before the watcher's next look: judge what was measured by then. A step that raised (every
    gradient None) is a verdict in itself, however few steps ran."""
    if report is None:
        return
    judged = verdict(report)
    enough = sum(o["steps"] for o in report["optimizers"]) >= _options.check_steps or judged == EXIT_UNHEALTHY
    if not enough:
        print(
            f"gradtel check: the script ended before {_options.check_steps} optimizer step(s) were measured",
            file=sys.stderr,
        )
    _print(report)
    sys.stdout.flush()
    os._exit(judged if enough else EXIT_TOO_FEW_STEPS)


def _summarize(report: dict[str, Any]) -> None:
    """``gradtel run``: the findings in a few lines on stderr, so a real bug is seen without opening the JSON. A
    script that created no optimizer (a data-prep step run under gradtel) gets nothing added to its output."""
    if not report["optimizers"]:
        return
    try:
        print(render.run_summary(report), file=sys.stderr, flush=True)
    except Exception:
        log.debug("gradtel: the summary could not be printed", exc_info=True)


def _on_sigterm(signum: int, frame: Any) -> None:
    if os.getpid() == _pid:
        _finish()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # die by the signal, as the script would have


def _watch_steps() -> None:
    """``gradtel check``: once every optimizer the script has created has taken N steps (or, after the first one
    has, ``check_timeout`` seconds went by), print the diagnosis and end the process with its verdict.

    A Keras ``model.compile()`` default that was never given a gradient, while an optimizer the same model holds
    has stepped, is not waited for: that is the GAN pattern, whose ``train_step`` steps its own optimizers only
    (gradtel/callback.py). Any other optimizer that has not stepped yet may still come (a generator stepped after
    five critic steps, in a function traced later), so it gets the timeout.
    """
    need, first_done, all_done = _options.check_steps or 1, None, None
    unused: list[Any] | None = None  # handles of compile() defaults beside stepping optimizers, looked for once
    while not _finished.is_set():
        try:
            handles = registry.handles(active_only=True)
            done = [h.summary().steps >= need for h in handles]
            if any(done) and unused is None:
                unused = _unused_compile_defaults(handles, done)
            waiting = [h.name for h, d in zip(handles, done, strict=True) if not d]
            # still never given a gradient: one that got one after all is waited for like any other
            idle = {h.name for h in unused or () if not h.tables.by_key}
            if done and all(name in idle for name in waiting):
                all_done = all_done or time.monotonic()
                if _between_steps(all_done):
                    if waiting:
                        print(
                            f"gradtel check: not waiting for {', '.join(waiting)}: the optimizer model.compile() "
                            "made, which train_step never stepped, while the optimizers the model holds did",
                            file=sys.stderr,
                            flush=True,
                        )
                    _stop_and_judge()
                    return
            if any(done):
                first_done = first_done or time.monotonic()
                expired = first_done + _options.check_timeout
                if time.monotonic() >= expired and _between_steps(expired):
                    print(
                        f"gradtel check: optimizer(s) {', '.join(waiting)} took fewer than {need} step(s) in the "
                        f"{_options.check_timeout:g} s after the first was done; judging what was measured",
                        file=sys.stderr,
                        flush=True,
                    )
                    _stop_and_judge()
                    return
        except Exception:
            log.debug("gradtel check: counters not readable yet", exc_info=True)
        time.sleep(CHECK_POLL_S)


def _unused_compile_defaults(handles: list[Any], done: list[bool]) -> list[Any]:
    """The handles not done whose optimizer never got a gradient (no table: not even traced) and is a
    ``model.compile()`` default beside held optimizers that stepped."""
    from gradtel.callback import compiled_beside_stepping

    optimizers = {id(registry.live(o)): o for o in registry.live_optimizers()}
    waiting = [h for h, d in zip(handles, done, strict=True) if not d and not h.tables.by_key and id(h) in optimizers]
    unused = compiled_beside_stepping([optimizers[id(h)] for h in waiting])
    return [h for h in waiting if any(optimizers[id(h)] is u for u in unused)]


def _between_steps(since: float) -> bool:
    """No optimizer step is in progress, or one has been for too long (``STEP_GRACE_S`` after ``since``)."""
    return not _step_in_progress() or time.monotonic() - since >= STEP_GRACE_S


def _step_in_progress() -> bool:
    """Whether another thread is inside an instrumented optimizer's apply. An eager step is counted when its
    gradients are measured, before Keras applies them, or raises 'No gradients provided' (the report keeps that
    message): the check judges between steps, never halfway through one."""
    here = threading.get_ident()
    for thread_id, top in sys._current_frames().items():
        if thread_id == here:
            continue
        frame: FrameType | None = top
        while frame is not None:
            if frame.f_code.co_filename == instrumenting.__file__:
                return True
            frame = frame.f_back
    return False


def _stop_and_judge() -> None:
    with _judging:
        report = _finish()
        if report is not None:
            _print(report)
            sys.stdout.flush()
            os._exit(verdict(report))


def verdict(report: dict[str, Any]) -> int:
    """1 when any variable not declared expected is missing, zero or non-finite, or is read in the step but
    untracked (it never reaches an optimizer); else 0."""
    bad = [v for v in report["variables"] if v["status"] != "ok" and not v["expected"]]
    untracked = [f for f in report["findings"] if f["category"] == "untracked_variable"]
    return EXIT_UNHEALTHY if bad or untracked else EXIT_HEALTHY


def _print(report: dict[str, Any]) -> None:
    if _options.json_output:
        text = json.dumps(report, indent=2) + "\n"
        if _json_fd is None:
            print(text, end="")
        else:
            sys.stdout.flush()
            with os.fdopen(_json_fd, "w", closefd=False) as out:  # a loop of os.write calls, as a pipe needs
                out.write(text)
    else:
        print(render.report_table(report))
