"""The ``gradtel`` command line: ``demo`` and ``stack``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port 0-65535 was expected, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a non-negative integer was expected, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradtel", description="Gradient-health telemetry for TensorFlow training.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small model with a disconnected head and serve its metrics")
    demo.add_argument("--steps", type=_non_negative, default=10000,
                      help="optimizer steps (default 10000, about 30 s on 2 CPU cores); 0 runs until Ctrl-C")
    demo.add_argument("--port", type=_port, default=None,
                      help="metrics port (default: $OTEL_EXPORTER_PROMETHEUS_PORT or 9464)")
    demo.add_argument("--host", default=None,
                      help="metrics bind address (default: $OTEL_EXPORTER_PROMETHEUS_HOST or 127.0.0.1)")
    demo.add_argument("--batch-size", type=_non_negative, default=32)
    demo.add_argument("--nan-at", type=_non_negative, default=None, metavar="STEP",
                      help="make the 'calibration' variable's gradient NaN from STEP on")
    demo.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                      help="keep serving the metrics this long after training ends")

    stack = commands.add_parser("stack", add_help=False,
                                help="run Prometheus and Alertmanager on loopback with the shipped configs "
                                     "(gradtel stack --help)")
    stack.add_argument("args", nargs=argparse.REMAINDER)  # handed to gradtel.localstack as they are
    return parser


def _stack(args: argparse.Namespace) -> int:
    try:
        from gradtel import localstack
    except ImportError as error:
        print(f"gradtel stack needs PyYAML: pip install 'gradtel[stack]' ({error})", file=sys.stderr)
        return 2
    return localstack.main(args.args)


def _demo(args: argparse.Namespace) -> int:
    if args.port is not None:
        os.environ["OTEL_EXPORTER_PROMETHEUS_PORT"] = str(args.port)
    if args.host is not None:
        os.environ["OTEL_EXPORTER_PROMETHEUS_HOST"] = args.host
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


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stack"]:  # its options, --help included, belong to gradtel.localstack
        return _stack(argparse.Namespace(args=argv[1:]))
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "stack":
        return _stack(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
