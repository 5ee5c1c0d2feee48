"""Imported by Python at start-up in the process that ``gradtel run`` / ``gradtel check`` launch (via PYTHONPATH).

It turns gradtel on from the options the CLI put in the environment, then hands over to any other
``sitecustomize`` further down the path, as opentelemetry-instrument does.

The launched command may be another Python than gradtel's own (``python`` of another virtual environment): one
that cannot import gradtel, or imports another version of it, would run the script uninstrumented, hours of
training with no telemetry and no report. It is refused instead: one line on stderr, exit status 4, the script
not run. This file is run by that other Python, so it sticks to syntax every Python 3.6+ reads.
"""

import importlib
import json
import os
import sys
from typing import NoReturn

#: ``gradtel run``/``check``: the command's Python cannot load the launching gradtel (see the README).
EXIT_WRONG_ENVIRONMENT = 4


def _refuse(problem: str) -> NoReturn:
    version = "{}.{}".format(*sys.version_info[:2])
    sys.stderr.write(
        f"gradtel: the command's Python ({sys.executable}, Python {version}) {problem}; the script is not run, as "
        "it would train without gradtel. Run it with the Python gradtel is installed in, or install gradtel "
        f"{_launcher_version()} into this one.\n"
    )
    sys.stderr.flush()
    os._exit(EXIT_WRONG_ENVIRONMENT)


def _launcher_version() -> str:
    try:
        return str(json.loads(os.environ.get("GRADTEL_RUN_OPTIONS", "{}")).get("launcher_version") or "")
    except (ValueError, AttributeError):
        return ""


if os.environ.get("GRADTEL_RUN_OPTIONS") is not None:  # else: a process the launched script started itself
    try:
        import gradtel
        from gradtel import runner
    except Exception as error:
        _refuse(f"cannot import gradtel ({type(error).__name__}: {error})")
    wanted, found = _launcher_version(), getattr(gradtel, "__version__", "?")
    if wanted and found != wanted:
        _refuse(f"imports gradtel {found} from {os.path.dirname(gradtel.__file__)}, not the launching gradtel {wanted}")
    try:
        runner.bootstrap_from_env()
    except Exception as error:  # the script must run even if gradtel cannot
        print(f"gradtel: not instrumenting this process: {error!r}", file=sys.stderr)

_here = os.path.dirname(os.path.abspath(__file__))
if _here in sys.path:
    _this = sys.modules.pop("sitecustomize", None)
    sys.path.remove(_here)
    try:
        importlib.import_module("sitecustomize")
    except ImportError:  # no other sitecustomize: this one stays the module of that name
        if _this is not None:
            sys.modules["sitecustomize"] = _this
    finally:
        sys.path.insert(0, _here)
