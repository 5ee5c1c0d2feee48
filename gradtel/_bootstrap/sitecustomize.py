"""Imported by Python at start-up in the process that ``gradtel run`` / ``gradtel check`` launch (via PYTHONPATH).

It turns gradtel on from the options the CLI put in the environment, then hands over to any other
``sitecustomize`` further down the path, as opentelemetry-instrument does.
"""

import importlib
import os
import sys

try:
    from gradtel import runner

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
