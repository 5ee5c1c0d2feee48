"""The ``gradtel`` command line: ``demo``, ``run``, ``check``, ``report``, ``stack`` and ``assets``."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import time
from collections.abc import Sequence


def _port(text: str) -> int:
    from gradtel import config  # the same check as OTEL_EXPORTER_PROMETHEUS_PORT's

    try:
        return config.parse_port(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{config.PORT_EXPECTED} was expected, got {text!r}") from None


def _pattern(text: str) -> str:
    from gradtel.naming import PatternSet  # the check instrument() makes, before the script starts

    try:
        PatternSet([text])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a non-negative integer was expected, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a non-negative number of seconds was expected, got {text}")
    return value


def _run_id(text: str) -> str:
    from gradtel.identity import check_run_id

    try:
        return check_run_id(text, "--run-id")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_RUN_ID_HELP = (
    "the run label, the same for every restart of this job (sets GRADTEL_RUN_ID; default: derived "
    "from the job's own id, see the README)"
)


def _parser() -> argparse.ArgumentParser:
    from gradtel import __version__, assets

    parser = argparse.ArgumentParser(prog="gradtel", description="Gradient-health telemetry for TensorFlow training.")
    parser.add_argument("--version", action="version", version=f"gradtel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small model with a disconnected head and serve its metrics")
    demo.add_argument(
        "--steps",
        type=_non_negative,
        default=10000,
        help="optimizer steps (default 10000, about 30 s on 2 CPU cores); 0 runs until Ctrl-C",
    )
    demo.add_argument(
        "--port",
        type=_port,
        default=None,
        help="metrics port (default: $OTEL_EXPORTER_PROMETHEUS_PORT or 9464; 0: any free port)",
    )
    demo.add_argument(
        "--host", default=None, help="metrics bind address (default: $OTEL_EXPORTER_PROMETHEUS_HOST or 127.0.0.1)"
    )
    demo.add_argument("--batch-size", type=_non_negative, default=32)
    demo.add_argument(
        "--nan-at",
        type=_non_negative,
        default=None,
        metavar="STEP",
        help="make the 'calibration' variable's gradient NaN from STEP on",
    )
    demo.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep serving the metrics this long after training ends",
    )
    demo.add_argument("--run-id", type=_run_id, default=None, help=_RUN_ID_HELP)

    run = commands.add_parser(
        "run",
        help="run an unmodified training script with every optimizer instrumented",
        usage="gradtel run [options] -- python SCRIPT.py [ARGS]",
    )
    check = commands.add_parser(
        "check",
        help="pre-flight gate: run the script until N steps, print the diagnosis, "
        "exit 1 if any unexpected variable is unhealthy",
        usage="gradtel check [options] -- python SCRIPT.py [ARGS]",
    )
    for sub in (run, check):
        sub.add_argument("--report", metavar="FILE", help="write the JSON report (gradtel.report/v1) at the end")
        sub.add_argument(
            "--expect-missing",
            action="append",
            default=[],
            metavar="PATTERN",
            type=_pattern,
            help="variable paths (glob, or re:REGEX) meant to get no gradient; repeatable",
        )
        sub.add_argument("--port", type=_port, default=None, help="metrics port (OTEL_EXPORTER_PROMETHEUS_PORT)")
        sub.add_argument("--run-id", type=_run_id, default=None, help=_RUN_ID_HELP)
        sub.add_argument(
            "argv",
            nargs=argparse.REMAINDER,
            metavar="-- COMMAND",
            help="the command to run, e.g. -- python train.py --epochs 3",
        )
    check.add_argument("--steps", type=_non_negative, default=1, help="optimizer steps to measure (default 1)")
    check.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    check.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="once one optimizer has taken --steps steps, wait at most this long for the other "
        "optimizers the script created (a GAN's second one) before judging (default 30)",
    )

    report = commands.add_parser(
        "report",
        help="summarize a JSON report (gradtel run --report FILE) in the terminal, or as one self-contained HTML page",
    )
    report.add_argument("file", metavar="FILE", help="the JSON report (gradtel.report/v1)")
    report.add_argument("--html", metavar="OUT", help="also write one HTML page with the plots (no network needed)")

    stack = commands.add_parser(
        "stack",
        add_help=False,
        help="run Prometheus and Alertmanager on loopback with the shipped configs (gradtel stack --help)",
    )
    stack.add_argument("args", nargs=argparse.REMAINDER)  # handed to gradtel.localstack as they are
    assets.add_parser(commands)
    return parser


def _stack(args: argparse.Namespace) -> int:
    try:
        from gradtel import localstack
    except ImportError as error:
        print(f"gradtel stack needs PyYAML: pip install 'gradtel[stack]' ({error})", file=sys.stderr)
        return 2
    return localstack.main(args.args)


def _report(args: argparse.Namespace) -> int:
    from gradtel import htmlreport, render, reporting

    try:
        report = reporting.load(args.file)
    except (OSError, ValueError) as error:
        print(f"gradtel report: {error}", file=sys.stderr)
        return 2
    if args.html:  # first: a summary piped into `head` must not cost the page
        try:
            pathlib.Path(args.html).write_text(htmlreport.page(report), encoding="utf-8")
        except OSError as error:
            print(f"gradtel report: cannot write {args.html}: {error}", file=sys.stderr)
            return 2
    print(render.report_summary(report))
    if args.html:
        print(f"gradtel: wrote {args.html}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    """Replace this process with the user's command, gradtel's bootstrap first on its PYTHONPATH."""
    from gradtel import runner

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        print(
            f"gradtel {args.command}: expected a command after --, e.g. gradtel {args.command} -- python train.py",
            file=sys.stderr,
        )
        return 2
    checking = args.command == "check"
    options = runner.RunOptions(
        report=args.report,
        expect_missing=args.expect_missing,
        check_steps=max(1, args.steps) if checking else None,
        json_output=checking and args.json,
        check_timeout=args.timeout if checking else 0.0,
        launcher_version=_version(),
    )
    env = dict(os.environ)
    bootstrap = str(pathlib.Path(__file__).resolve().parent / "_bootstrap")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (bootstrap, env.get("PYTHONPATH")) if p)
    env[runner.ENV] = options.to_env()
    if args.port is not None:
        env["OTEL_EXPORTER_PROMETHEUS_PORT"] = str(args.port)
    if args.run_id is not None:
        env["GRADTEL_RUN_ID"] = args.run_id
    if checking:
        env.setdefault("OTEL_METRICS_EXPORTER", "none")  # a gate needs no endpoint
    try:
        os.execvpe(command[0], command, env)
    except OSError as error:
        print(f"gradtel {args.command}: cannot run {command[0]!r}: {error}", file=sys.stderr)
        return 127


def _version() -> str:
    from gradtel import __version__

    return __version__


def _demo(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [name for name in ("tensorflow", "keras") if importlib.util.find_spec(name) is None]
    if missing:  # a bare `pip install gradtel` has neither: say so before serving an endpoint that stays empty
        print(f"gradtel demo needs {' and '.join(missing)}: pip install 'gradtel[tensorflow]'", file=sys.stderr)
        return 2
    if args.port is not None:
        os.environ["OTEL_EXPORTER_PROMETHEUS_PORT"] = str(args.port)
    if args.host is not None:
        os.environ["OTEL_EXPORTER_PROMETHEUS_HOST"] = args.host
    if args.run_id is not None:
        os.environ["GRADTEL_RUN_ID"] = args.run_id
    from gradtel import demo, export

    exporter = export.ensure_started()
    if exporter is not None and exporter.endpoint is not None:
        host, port = exporter.endpoint
        print(f"gradtel: metrics at http://{host}:{port}/metrics", flush=True)
    status = demo.run(args.steps, batch_size=args.batch_size or 32, nan_at=args.nan_at)
    if args.linger > 0:
        print(f"gradtel: serving the final metrics for {args.linger:g} s", flush=True)
        time.sleep(args.linger)
    export.shutdown()
    return status


class _LogFormat(logging.Formatter):
    """``LEVEL logger: message``, the logger's name left out when the message names gradtel already.

    gradtel's messages begin with "gradtel:" so that they can be told apart in a training job's own log; the CLI's
    name prefix on top of that said it twice (``WARNING gradtel.export: gradtel: ...``).
    """

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self._named = logging.Formatter("%(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.getMessage().startswith("gradtel:"):
            return self._named.format(record)
        return super().format(record)


def main(argv: Sequence[str] | None = None) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormat())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stack"]:  # its options, --help included, belong to gradtel.localstack
        return _stack(argparse.Namespace(args=argv[1:]))
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command in ("run", "check"):
        return _launch(args)
    if args.command == "report":
        return _report(args)
    if args.command == "stack":
        return _stack(args)
    if args.command == "assets":
        from gradtel import assets

        return assets.main(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
