"""Bad settings: one line naming the setting, the value and what was expected; the job goes on without the part
that cannot work. In-process (``Config``, ``instrument()``, the endpoint) and in real processes (``gradtel run``,
``gradtel check``, ``gradtel demo``, the Keras callback, ``opentelemetry-instrument``)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest

import gradtel
from gradtel import export
from gradtel.config import Config
from gradtel.endpoint import Endpoint, EndpointError, Security
from gradtel.exposition import Exposition
from tests.core.helpers import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent
MISSING_FILE = "/nonexistent/gradtel-test/cert.pem"

# --- the table: setting, bad value, what the line must say, the exporters left ---------------------------------
PROMETHEUS_OFF = "the Prometheus pull endpoint is off"
OTLP_OFF = "the OTLP push is off"
CASES = [
    ("OTEL_EXPORTER_PROMETHEUS_PORT", "abc", "expected a TCP port 0-65535; " + PROMETHEUS_OFF, {}, ()),
    ("OTEL_EXPORTER_PROMETHEUS_PORT", "70000", "expected a TCP port 0-65535; " + PROMETHEUS_OFF, {}, ()),
    ("OTEL_EXPORTER_PROMETHEUS_PORT", "-1", "expected a TCP port 0-65535; " + PROMETHEUS_OFF, {}, ()),
    (
        "OTEL_METRICS_EXPORTER",
        "bogus",
        "expected a comma-separated list of prometheus, otlp, console, none; no metrics are exported",
        {},
        (),
    ),
    ("OTEL_METRICS_EXPORTER", "prometheus,bogus", "bogus ignored, exporting through prometheus", {}, ("prometheus",)),
    ("TF_CONFIG", "notjson", "expected JSON like", {}, ("prometheus",)),
    ("GRADTEL_MAX_ABS", "maybe", "expected true or false; using the default, false", {}, ("prometheus",)),
    ("GRADTEL_MAX_SERIES", "lots", "expected an integer >= 1; using the default, 100000", {}, ("prometheus",)),
    ("GRADTEL_SERIES_BUDGET", "0", "expected an integer >= 1; using the default, 2000", {}, ("prometheus",)),
    ("GRADTEL_TOPK", "1.5", "expected an integer >= 1; using the default, 100", {}, ("prometheus",)),
    (
        "GRADTEL_VARIABLE_SERIES",
        "all",
        "expected one of auto, variable, layer, topk, none; using the default, auto",
        {},
        ("prometheus",),
    ),
    ("GRADTEL_VARIABLE_SERIES_WORKERS", "some", "expected chief or all; using the default, chief", {}, ("prometheus",)),
    ("GRADTEL_INCLUDE", "re:(", "is not a valid regular expression", {}, ("prometheus",)),
    ("GRADTEL_EXCLUDE", "re:[", "is not a valid regular expression", {}, ("prometheus",)),
    (
        "GRADTEL_PROMETHEUS_CPU_SHARE",
        "2",
        "expected a fraction of one core, > 0 and <= 1; using the default, 0.01",
        {},
        ("prometheus",),
    ),
    (
        "GRADTEL_PROMETHEUS_MIN_INTERVAL",
        "soon",
        "expected a number of seconds >= 0; using the default, 1.0",
        {},
        ("prometheus",),
    ),
    (
        "GRADTEL_TLS_CERT_FILE",
        MISSING_FILE,
        "expected a readable PEM file (No such file or directory); " + PROMETHEUS_OFF,
        {"GRADTEL_TLS_KEY_FILE": __file__},
        (),
    ),
    (
        "GRADTEL_TLS_CLIENT_CA_FILE",
        MISSING_FILE,
        "expected a readable PEM file of CA certificates (No such file or directory); " + PROMETHEUS_OFF,
        {"GRADTEL_TLS_CERT_FILE": __file__, "GRADTEL_TLS_KEY_FILE": __file__},
        (),
    ),
    (
        "GRADTEL_BASIC_AUTH_PASSWORD_FILE",
        MISSING_FILE,
        "expected a readable UTF-8 file (No such file or directory); " + PROMETHEUS_OFF,
        {"GRADTEL_BASIC_AUTH_USERNAME": "prometheus"},
        (),
    ),
    (
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "http/json",
        "expected http/protobuf or grpc; " + OTLP_OFF,
        {"OTEL_METRICS_EXPORTER": "otlp,prometheus"},
        ("prometheus",),
    ),
    (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "collector 4318",
        "expected an http:// or https:// URL with a host; " + OTLP_OFF,
        {"OTEL_METRICS_EXPORTER": "otlp"},
        (),
    ),
    (
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "ftp://collector",
        "expected an http:// or https:// URL",
        {"OTEL_METRICS_EXPORTER": "otlp"},
        (),
    ),
    (
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
        MISSING_FILE,
        "expected a readable file (No such file or directory); " + OTLP_OFF,
        {"OTEL_METRICS_EXPORTER": "otlp"},
        (),
    ),
    (
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        "soon",
        "expected a number of seconds > 0; " + OTLP_OFF,
        {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        (),
    ),
    (
        "OTEL_EXPORTER_OTLP_COMPRESSION",
        "zip",
        "expected gzip, deflate or none; " + OTLP_OFF,
        {"OTEL_METRICS_EXPORTER": "otlp"},
        (),
    ),
    (
        "OTEL_METRIC_EXPORT_INTERVAL",
        "often",
        "expected milliseconds, an integer >= 1; using the default, 60000",
        {"OTEL_METRICS_EXPORTER": "console"},
        ("console",),
    ),
]
IDS = [f"{setting}={value}" for setting, value, *_ in CASES]


@pytest.mark.parametrize(("setting", "value", "says", "others", "exporters"), CASES, ids=IDS)
def test_each_bad_setting_is_one_problem_naming_it_and_the_job_goes_on_without_that_part(
    setting, value, says, others, exporters
):
    config = Config.from_env({**others, setting: value})
    lines = [str(p) for p in config.problems]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"gradtel: {setting}={value!r}: ") and says in lines[0], lines[0]
    assert config.exporters == exporters


def test_settings_that_go_together_name_the_missing_one():
    config = Config.from_env({"GRADTEL_BASIC_AUTH_USERNAME": "prometheus"})
    assert [str(p) for p in config.problems] == [
        "gradtel: GRADTEL_BASIC_AUTH_PASSWORD is not set: expected it (or GRADTEL_BASIC_AUTH_PASSWORD_FILE) set "
        "together with GRADTEL_BASIC_AUTH_USERNAME; the Prometheus pull endpoint is off; training and the report "
        "go on."
    ]
    assert config.exporters == ()


def test_a_header_value_is_never_shown_it_may_be_a_credential():
    secret = "Authorization=Bearer s3cr3t-token,s3cr3t-without-key"
    config = Config.from_env({"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_HEADERS": secret})
    (line,) = [str(p) for p in config.problems]
    assert "s3cr3t" not in line and "OTEL_EXPORTER_OTLP_HEADERS" in line and "item 2 of 2 is not key=value" in line


def test_good_values_make_no_problem():
    env = {
        "OTEL_METRICS_EXPORTER": "prometheus,otlp",
        "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317",
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=abc%20def,x=1",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5",
        "GRADTEL_MAX_ABS": "on",
        "TF_CONFIG": json.dumps({"task": {"type": "worker", "index": 1}}),
        "GRADTEL_INCLUDE": "dense*,re:^enc",
    }
    config = Config.from_env(env)
    assert config.problems == () and config.exporters == ("prometheus", "otlp") and config.max_abs
    assert (config.prometheus_port, config.otlp_protocol, config.worker.label) == (0, "grpc", "worker:1")


def test_instrument_and_the_callback_train_with_a_bad_threshold(monkeypatch, caplog):
    """``GRADTEL_MAX_ABS=perhaps`` once made ``instrument()`` and the callback raise: now the default, one line."""
    monkeypatch.setenv("GRADTEL_MAX_ABS", "perhaps")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="d")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    callback = gradtel.keras.GradientTelemetry(name="bad-threshold", start_exporter=False)
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        opt = keras.optimizers.SGD()
        handle = gradtel.instrument(opt, name="bad-threshold-direct", start_exporter=False)
        history = model.fit(np.ones((8, 3)), np.ones((8, 1)), batch_size=4, epochs=2, verbose=0, callbacks=[callback])
    assert not handle.max_abs and not callback.handle.max_abs
    assert callback.handle.summary().steps == 4 and len(history.history["loss"]) == 2
    lines = [r.getMessage() for r in caplog.records if "GRADTEL_MAX_ABS" in r.getMessage()]
    assert lines == ["gradtel: GRADTEL_MAX_ABS='perhaps': expected true or false; using the default, false."]
    gradtel.uninstrument(opt)
    gradtel.uninstrument(model.optimizer)


def test_the_export_starts_without_the_part_a_bad_setting_turns_off(monkeypatch, caplog):
    export.shutdown()
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus,console")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "99999")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "3600000")
    with caplog.at_level(logging.WARNING, logger="gradtel"):
        exporter = export.ensure_started()
    try:
        assert exporter is not None and exporter.endpoint is None and exporter.config.exporters == ("console",)
        assert [r.getMessage() for r in caplog.records] == [
            "gradtel: OTEL_EXPORTER_PROMETHEUS_PORT='99999': expected a TCP port 0-65535; the Prometheus pull "
            "endpoint is off; training and the report go on."
        ]
    finally:
        export.shutdown()


# --- the endpoint: errors name their real cause ---------------------------------------------------------------
def _endpoint(host: str = "127.0.0.1", port: int = 0, **security: str) -> Endpoint:
    return Endpoint(lambda: Exposition(b""), host, port, Security(**security))


def test_a_port_in_use_says_it_is_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EndpointError) as info:
            _endpoint(port=port)
    assert str(info.value) == (
        f"cannot serve metrics on 127.0.0.1:{port}: the port is in use (set "
        "OTEL_EXPORTER_PROMETHEUS_PORT to a free port, or 0 for any free one)"
    )


def test_a_host_that_does_not_resolve_is_not_blamed_on_the_port():
    with pytest.raises(EndpointError) as info:
        _endpoint(host="no-such-host.invalid")
    message = str(info.value)
    assert message.startswith(
        "cannot serve metrics: the bind address 'no-such-host.invalid' (OTEL_EXPORTER_PROMETHEUS_HOST) does not resolve"
    ), message
    assert "port" not in message.split("(OTEL_EXPORTER_PROMETHEUS_HOST)")[1]


def test_an_address_of_another_machine_is_named():
    with pytest.raises(EndpointError) as info:
        _endpoint(host="192.0.2.1")  # TEST-NET-1: never an address of this machine
    assert str(info.value) == (
        "cannot serve metrics on 192.0.2.1:0: '192.0.2.1' is not an address of this machine "
        "(OTEL_EXPORTER_PROMETHEUS_HOST)"
    )


def test_a_missing_certificate_names_the_file(tmp_path):
    with pytest.raises(EndpointError) as info:
        _endpoint(certfile=str(tmp_path / "server.pem"), keyfile=str(tmp_path / "server.key"))
    assert str(info.value) == (
        f"cannot serve metrics: the TLS certificate (GRADTEL_TLS_CERT_FILE) "
        f"'{tmp_path / 'server.pem'}' cannot be read (No such file or directory)"
    )


def test_a_file_that_is_no_certificate_names_both_files_and_binds_nothing(tmp_path):
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    port = free_port()
    with pytest.raises(EndpointError) as info:
        _endpoint(port=port, certfile=str(cert), keyfile=str(key))
    assert f"the TLS certificate '{cert}' and key '{key}'" in str(info.value)
    assert "not a matching PEM certificate and private key" in str(info.value)
    with socket.socket() as probe:  # the port was never bound (the TLS context is made first)
        probe.bind(("127.0.0.1", port))


# --- real processes: the job finishes, one line, no traceback -------------------------------------------------
TRAIN = textwrap.dedent("""
    import keras, numpy as np
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="d")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(np.ones((8, 3)), np.ones((8, 1)), batch_size=4, epochs=1, verbose=0{callbacks})
    print("TRAINED", flush=True)
""")


def _script(tmp_path: pathlib.Path, callback: bool = False) -> pathlib.Path:
    path = tmp_path / ("train_callback.py" if callback else "train.py")
    code = TRAIN.format(callbacks=", callbacks=[gradtel.keras.GradientTelemetry()]" if callback else "")
    path.write_text(("import gradtel\n" if callback else "") + code)
    return path


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADTEL_", "OTEL_", "TF_CONFIG"))}
    return {
        **env,
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
        **settings,
    }


#: (how it is run, the bad setting, its value, other settings)
PROCESS_CASES = [
    ("run", "OTEL_EXPORTER_PROMETHEUS_PORT", "abc", {}),
    ("run", "OTEL_METRICS_EXPORTER", "bogus", {}),
    ("run", "TF_CONFIG", "notjson", {}),
    ("run", "GRADTEL_MAX_ABS", "maybe", {}),
    ("run", "OTEL_EXPORTER_PROMETHEUS_HOST", "no-such-host.invalid", {}),
    ("run", "GRADTEL_TLS_CERT_FILE", MISSING_FILE, {"GRADTEL_TLS_KEY_FILE": str(ROOT / "README.md")}),
    ("run", "OTEL_EXPORTER_OTLP_CERTIFICATE", MISSING_FILE, {"OTEL_METRICS_EXPORTER": "otlp"}),
    ("check", "GRADTEL_VARIABLE_SERIES", "all", {}),
    ("demo", "OTEL_EXPORTER_PROMETHEUS_PORT", "70000", {}),
    ("callback", "GRADTEL_MAX_ABS", "maybe", {}),
    ("opentelemetry-instrument", "OTEL_EXPORTER_PROMETHEUS_PORT", "abc", {}),
]


def _command(how: str, script: pathlib.Path, report: pathlib.Path) -> list[str]:
    python = [sys.executable, str(script)]
    if how in ("run", "check"):
        return [str(BIN / "gradtel"), how, "--report", str(report), "--", *python]
    if how == "demo":
        return [str(BIN / "gradtel"), "demo", "--steps", "3"]
    if how == "opentelemetry-instrument":
        return [str(BIN / "opentelemetry-instrument"), *python]
    return python


def _run_case(
    case: tuple[str, str, str, dict[str, str]], tmp_path: pathlib.Path, scripts: dict[bool, pathlib.Path]
) -> subprocess.CompletedProcess:
    """Run one case with its script, written before (by callback or not)."""
    how, setting, value, others = case
    report = tmp_path / f"{how}-{setting}.json"
    command = _command(how, scripts[how == "callback"], report)
    return subprocess.run(
        command, env=_env(**others, **{setting: value}), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )


@pytest.mark.slow
def test_bad_settings_in_real_processes_are_one_line_and_the_job_finishes(tmp_path):
    """Each way of running gradtel, with a bad setting: exit 0, training done, exactly one line naming the setting
    and its value, no traceback. The processes run three at a time (each is mostly TensorFlow's import); the
    scripts are written before any of them starts (rewriting one while another process reads it ran an empty
    file)."""
    scripts = {callback: _script(tmp_path, callback) for callback in (False, True)}
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda case: _run_case(case, tmp_path, scripts), PROCESS_CASES))
    for (how, setting, value, _), proc in zip(PROCESS_CASES, results, strict=True):
        where = f"{how} {setting}={value}:\n{proc.stderr[-3000:]}"
        assert proc.returncode == 0, where
        assert "Traceback" not in proc.stderr, where
        if how == "demo":
            assert "calibration/c" in proc.stdout, where  # its final table
        elif how != "check":  # the check stops the script once it has measured a step
            assert "TRAINED" in proc.stdout, where
        lines = [line for line in proc.stderr.splitlines() if setting in line]
        assert len(lines) == 1, where
        assert "gradtel: " in lines[0] and (repr(value) in lines[0] or value in lines[0]), where
        if how in ("run", "check"):
            report = json.loads((tmp_path / f"{how}-{setting}.json").read_text())
            steps = report["optimizers"][0]["steps"]
            assert steps == 2 or (how == "check" and steps >= 1), where


@pytest.mark.slow
def test_gradtel_run_refuses_a_python_that_cannot_import_it(tmp_path):
    """``gradtel run -- python train.py`` where ``python`` is another environment's: one line, exit 4, the script
    not run (it would train for hours without telemetry)."""
    venv = tmp_path / "other-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    other = venv / "bin" / "python"
    marker = tmp_path / "ran"
    script = tmp_path / "train.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    launcher = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from gradtel.cli import main; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", launcher, "run", "--", str(other), str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 4, proc.stderr
    assert not marker.exists()
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"gradtel: the command's Python ({other}, Python ") and "cannot import gradtel" in line
    assert "the script is not run" in line

    # The same command with gradtel's own Python runs the script.
    proc = subprocess.run(
        [sys.executable, "-c", launcher, "run", "--", sys.executable, str(script)],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()


def test_import_gradtel_does_not_import_tensorflow_and_reaches_the_callbacks():
    code = textwrap.dedent("""
        import sys
        import gradtel
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules, sorted(sys.modules)
        assert {"keras", "tf_keras"} <= set(dir(gradtel))
        callback = gradtel.keras.GradientTelemetry()
        assert type(callback).__module__ == "gradtel.keras"
        assert gradtel.tf_keras.GradientTelemetry.__module__ == "gradtel.tf_keras"
        try:
            gradtel.no_such_thing
        except AttributeError as error:
            assert "no_such_thing" in str(error)
        else:
            raise AssertionError("no AttributeError")
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_a_bad_expect_missing_pattern_is_named_before_anything_changes(capsys):
    from gradtel import cli

    opt = keras.optimizers.SGD()
    with pytest.raises(ValueError, match=r"'re:\(' is not a valid regular expression"):
        gradtel.instrument(opt, expect_missing=["dense/*", "re:("], start_exporter=False)
    assert not gradtel.is_instrumented(opt)
    with pytest.raises(ValueError, match=r"'re:\[' is not a valid regular expression"):
        gradtel.keras.GradientTelemetry(expect_missing="re:[")
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--expect-missing", "re:(", "--", sys.executable, "-c", "pass"])
    assert info.value.code == 2
    assert "argument --expect-missing: 're:(' is not a valid regular expression" in capsys.readouterr().err


@pytest.mark.slow
def test_a_report_path_that_cannot_be_written_is_one_line_and_the_exit_status_stays_the_scripts(tmp_path):
    report = tmp_path / "no-such-dir" / "report.json"
    proc = subprocess.run(
        [str(BIN / "gradtel"), "run", "--report", str(report), "--", sys.executable, str(_script(tmp_path))],
        env=_env(OTEL_METRICS_EXPORTER="none"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "TRAINED" in proc.stdout, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "report" in line]
    assert lines == [f"gradtel: cannot write the report to {str(report)!r} (--report): No such file or directory"]
