"""Configuration parsing from files: values, includes, units, and errors that name file:line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from server.config import (
    NO_LIMIT,
    ConfigError,
    Listen,
    listener_keys,
    load_config,
    parse_listen,
    parse_size,
    parse_time,
    slot_cores,
    slot_gpu,
    split_listener_key,
)

LISTEN = "http {\n    listen 127.0.0.1:8080;\n}\n"


@pytest.fixture(autouse=True)
def no_gpus(monkeypatch) -> None:
    """GPUs are counted from CUDA_VISIBLE_DEVICES: none here unless a test says otherwise."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def write(tmp_path: Path, text: str, name: str = "srv.conf") -> Path:
    path = tmp_path / "conf" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, **kw):
    return load_config(write(tmp_path, text), tmp_path, check_models=kw.pop("check_models", False), **kw)


def error(tmp_path: Path, text: str, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text, **kw)
    return e.value


def model_folder(tmp_path: Path, name: str = "m", model_type: str = "densenet", weights: bool = True) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    return folder


# -- good configurations ---------------------------------------------------------------------------

def test_every_directive_is_read(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
worker_processes 3;
worker_cpu_affinity 0001 0010 1100;
worker_shutdown_timeout 500ms;
worker_timeout 2m;
worker_load_timeout 1h;
peer_timeout 3s;
worker_preload off;
worker_malloc_trim 8m;
pid run/x.pid;
error_log logs/e.log warn;
daemon off;
http {
    listen 8081;
    listen *:8082;
    listen [::1]:8083;
    access_log logs/a.log;
    client_max_body_size 64k;
    client_body_timeout 1.5s;
    keepalive_timeout 0;
}
zmq {
    listen tcp://127.0.0.1:5555;
}
model m {
    path models/m;
    device cpu;
    max_batch_size 16;
    batch_timeout 0;
    max_queue_size 4;
    request_timeout 1d;
    workers 2 0 2;
    peer_timeout 500ms;
    max_image_pixels 4m;
}
""")
    assert cfg.worker_processes == 3
    assert cfg.worker_cpu_affinity == [[0], [1], [2, 3]]
    assert (cfg.worker_shutdown_timeout, cfg.worker_timeout, cfg.worker_load_timeout) == (0.5, 120.0, 3600.0)
    assert cfg.pid == tmp_path / "run" / "x.pid" and cfg.run_dir == tmp_path / "run"
    assert cfg.error_log == tmp_path / "logs" / "e.log" and cfg.error_log_level == "warn"
    assert cfg.daemon is False
    assert cfg.worker_preload is False and cfg.worker_malloc_trim == 8 << 20
    assert cfg.http_listen == [Listen("127.0.0.1", 8081), Listen("0.0.0.0", 8082), Listen("::1", 8083)]
    assert cfg.access_log == tmp_path / "logs" / "a.log"
    assert cfg.client_max_body_size == 64 << 10 and cfg.client_body_timeout == 1.5 and cfg.keepalive_timeout == 0
    assert cfg.zmq_listen == [Listen("127.0.0.1", 5555)]
    m = cfg.models["m"]
    assert m.path == tmp_path / "models" / "m" and m.device == "cpu"
    assert (m.max_batch_size, m.batch_timeout, m.max_queue_size, m.request_timeout) == (16, 0.0, 4, 86400.0)
    assert m.workers == [0, 2]
    assert (cfg.peer_timeout, m.peer_timeout, m.max_image_pixels) == (3.0, 0.5, 4 << 20)
    assert [mc.name for mc in cfg.models_on(1)] == [] and [mc.name for mc in cfg.models_on(2)] == ["m"]
    assert listener_keys(cfg) == ["http:127.0.0.1:8081", "http:0.0.0.0:8082", "http:::1:8083", "zmq:127.0.0.1:5555"]
    assert split_listener_key("http:::1:8083") == ("http", "::1", 8083)
    assert slot_cores(cfg, 2) == [2, 3]


def test_defaults_and_the_prefix(tmp_path: Path) -> None:
    cfg = load(tmp_path, LISTEN + "model m {\n    path /abs/m;\n}\n")
    assert cfg.worker_processes == 1 and cfg.worker_cpu_affinity == "auto" and cfg.daemon is False
    assert cfg.worker_timeout == 60 and cfg.worker_load_timeout == 600 and cfg.worker_shutdown_timeout == 30
    assert cfg.worker_preload is True and cfg.worker_malloc_trim == 64 << 20
    assert load(tmp_path, LISTEN + "worker_malloc_trim off;\n").worker_malloc_trim == 0
    assert cfg.pid == tmp_path / "run" / "modelsrv.pid" and cfg.error_log == tmp_path / "logs" / "error.log"
    assert cfg.access_log is None and cfg.client_max_body_size == 64 << 20
    m = cfg.models["m"]
    assert m.path == Path("/abs/m") and m.workers is None and m.device == "auto"
    assert (m.max_batch_size, m.batch_timeout, m.max_queue_size, m.tensor_parallel) == (8, 0.002, 256, 1)
    assert (cfg.peer_timeout, m.peer_timeout, m.max_image_pixels) == (10.0, None, None)
    # without -p, the prefix is the config file's parent's parent (PREFIX/conf/srv.conf)
    assert load_config(write(tmp_path, LISTEN), check_models=False).prefix == tmp_path


def test_off_and_no_limit_values(tmp_path: Path) -> None:
    cfg = load(tmp_path, "http {\n    listen 1;\n    access_log off;\n    client_max_body_size 0;\n}\n"
                         "worker_cpu_affinity off;\nworker_shutdown_timeout 0;\n")
    assert cfg.access_log is None and cfg.client_max_body_size == NO_LIMIT
    assert cfg.worker_cpu_affinity == "off" and slot_cores(cfg, 0) is None
    assert cfg.worker_shutdown_timeout == 0  # allowed: exit at once


def test_includes_with_globs_are_spliced_in_place(tmp_path: Path) -> None:
    write(tmp_path, "model a {\n    path /a;\n}\n", "conf.d/a.conf")
    write(tmp_path, "model b {\n    path /b;\n}\n", "conf.d/b.conf")
    write(tmp_path, "this is not included", "conf.d/readme.txt")
    cfg = load(tmp_path, LISTEN + "include conf.d/*.conf;\nmodel c {\n    path /c;\n}\n")
    assert list(cfg.models) == ["a", "b", "c"]


def test_worker_processes_auto_counts_gpus_or_cpus(tmp_path: Path, monkeypatch) -> None:
    from server.config import usable_cpus

    assert load(tmp_path, LISTEN + "worker_processes auto;\n").worker_processes == usable_cpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    cfg = load(tmp_path, LISTEN + "worker_processes auto;\nmodel m {\n    path /m;\n}\n")
    assert cfg.gpus == 2 and cfg.worker_processes == 2
    assert [slot_gpu(cfg, s) for s in (0, 1)] == [0, 1]


def test_model_folders_are_checked(tmp_path: Path) -> None:
    good = model_folder(tmp_path, "good")
    cfg = load(tmp_path, LISTEN + f"model m {{\n    path {good};\n}}\n", check_models=True)
    assert cfg.models["m"].model_type == "densenet"
    cases = {
        tmp_path / "missing": "does not exist",
        model_folder(tmp_path, "bad_type", model_type="alexnet"): "unknown model_type 'alexnet'",
        model_folder(tmp_path, "no_weights", weights=False): "no model.safetensors",
    }
    for folder, fragment in cases.items():
        e = error(tmp_path, LISTEN + f"\nmodel m {{\n    path {folder};\n}}\n", check_models=True)
        assert fragment in str(e) and e.line == 5, e


# -- units -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("30s", 30), ("30", 30), ("2m", 120), ("1h", 3600),
                                           ("1d", 86400), ("1.5s", 1.5), ("0", 0)])
def test_times(text: str, seconds: float) -> None:
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text, size", [("512", 512), ("64k", 65536), ("64K", 65536), ("2m", 2 << 20), ("1g", 1 << 30)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "ten", "5 s", "-1s", "1w", "1e3"])
def test_bad_times(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid time"):
        parse_time(bad)


@pytest.mark.parametrize("bad", ["", "1.5m", "64x", "-1", "k"])
def test_bad_sizes(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(bad)


def test_listen_forms() -> None:
    assert parse_listen("8080") == Listen("127.0.0.1", 8080)
    assert parse_listen(":8080") == Listen("0.0.0.0", 8080)
    assert parse_listen("tcp://[::]:5555", "tcp") == Listen("::", 5555)
    for bad in ("host:0", "host:65536", "host:http"):
        with pytest.raises(ValueError, match="invalid port"):
            parse_listen(bad)
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        parse_listen("127.0.0.1:5555", "tcp")


# -- errors name file:line -------------------------------------------------------------------------

ERRORS = [
    # (text inserted at line 3, fragment of the message, line of the error)
    ("bogus on;", 'unknown directive "bogus"', 3),
    ("worker_timeout 10", 'invalid number of arguments in "worker_timeout"', 3),  # the ";" is missing
    ("worker_timeout 1s 2s;", 'invalid number of arguments in "worker_timeout"', 3),
    ("worker_timeout ten;", 'invalid time "ten" in "worker_timeout" directive', 3),
    ("worker_timeout 0;", '"worker_timeout" must be greater than 0', 3),
    ("worker_load_timeout 0s;", '"worker_load_timeout" must be greater than 0', 3),
    ("peer_timeout 0;", '"peer_timeout" must be greater than 0', 3),
    ("model m {\n    path /m;\n    peer_timeout -1s;\n}", 'invalid time "-1s"', 5),
    ("model m {\n    path /m;\n    max_image_pixels 0;\n}", '"max_image_pixels" must be greater than 0', 5),
    ("model m {\n    path /m;\n    max_image_pixels lots;\n}", 'invalid size "lots"', 5),
    ("http {\n    listen 1;\n    client_body_timeout 0ms;\n}", '"client_body_timeout" must be greater than 0', 5),
    ("model m {\n    path /m;\n    request_timeout 0;\n}", '"request_timeout" must be greater than 0', 5),
    ("model m {\n    path /m;\n    max_batch_size 0;\n}", 'invalid value "0" in "max_batch_size"', 5),
    ("model m {\n    path /m;\n    max_queue_size -3;\n}", 'invalid value "-3" in "max_queue_size"', 5),
    ("model m {\n    path /m;\n    batch_timeout soon;\n}", 'invalid time "soon"', 5),
    ("http {\n    listen 1;\n    client_max_body_size 1.5m;\n}", 'invalid size "1.5m"', 5),
    ("worker_processes 0;", 'invalid value "0" in "worker_processes"', 3),
    ("worker_processes 2;\nworker_processes 2;", '"worker_processes" directive is duplicate', 4),
    ("daemon maybe;", 'it must be "on" or "off"', 3),
    ("worker_preload yes;", 'it must be "on" or "off"', 3),
    ("worker_malloc_trim 0;", '"worker_malloc_trim" must be greater than 0', 3),
    ("worker_malloc_trim lots;", 'invalid size "lots"', 3),
    ("error_log logs/e.log loud;", 'invalid log level "loud"', 3),
    ("worker_cpu_affinity 01 2;", 'invalid mask "2"', 3),
    ("http {\n    listen 127.0.0.1:99999;\n}", "invalid port", 4),
    ("http {\n    listen 1;\n    gzip on;\n}", 'unknown directive "gzip"', 5),
    ("http {\n    listen 1;\n    access_log a;\n    access_log b;\n}", '"access_log" directive is duplicate', 6),
    ("http on;", 'directive "http" has no opening "{"', 3),
    ("zmq {\n    listen 127.0.0.1:5555;\n}", "must look like tcp://HOST:PORT", 4),
    ("model {\n    path /m;\n}", '"model" takes one name', 3),
    ("model a/b {\n    path /m;\n}", '"model" takes one name', 3),
    ("model m {\n    device cpu;\n}", 'model "m" has no "path"', 3),
    ("model m {\n    path /m;\n    path /n;\n}", '"path" directive is duplicate', 5),
    ("model m {\n    path /m;\n}\nmodel m {\n    path /n;\n}", 'duplicate model "m"', 6),
    ("model m {\n    path /m;\n    device tpu;\n}", 'invalid device "tpu"', 5),
    ("model m {\n    path /m;\n    device cuda:0;\n}", "device cuda:0 but no GPU is visible", 3),
    ("model m {\n    path /m;\n    tensor_parallel 2;\n}", "tensor_parallel 2 does not divide its 1 worker(s)", 3),
    ("model m {\n    path /m;\n    workers 0 1;\n}", "no worker 1 (worker_processes 1)", 3),
    ("model m {\n    path /m;\n    workers first;\n}", '"workers" takes worker numbers', 5),
    ("model m {\n    path /m;\n    colour blue;\n}", 'unknown directive "colour"', 5),
    ("http {\n    listen 1;", 'unexpected end of file, expecting "}"', 7),  # where the file ends
    ("}", 'unexpected "}"', 3),
    ('error_log "logs/e.log;', "unexpected end of file (an unterminated quote?)", 6),
    ("include nothere.conf;", "No such file or directory", 3),
]


@pytest.mark.parametrize("mistake, fragment, line", ERRORS, ids=[f"{i}-{e[1][:30]}" for i, e in enumerate(ERRORS)])
def test_errors_name_file_and_line(tmp_path: Path, mistake: str, fragment: str, line: int) -> None:
    lines = ["# a comment", "worker_shutdown_timeout 1s;", mistake, *LISTEN.splitlines()]
    text = "\n".join(lines) + "\n"
    e = error(tmp_path, text)
    conf = tmp_path / "conf" / "srv.conf"
    assert fragment in str(e), str(e)
    assert (e.file, e.line) == (str(conf), line), str(e)
    assert str(e).endswith(f" in {conf}:{line}") and str(e).count(str(conf)) == 1, str(e)


def test_error_in_an_included_file_names_that_file(tmp_path: Path) -> None:
    inc = write(tmp_path, "\n\nmodel x {\n    path /x;\n    wrong_thing 1;\n}\n", "conf.d/x.conf")
    e = error(tmp_path, LISTEN + "include conf.d/*.conf;\n")
    assert 'unknown directive "wrong_thing"' in str(e) and (e.file, e.line) == (str(inc), 5)
    assert str(e).endswith(f"in {inc}:5")


def test_errors_that_concern_the_whole_file_name_the_file(tmp_path: Path) -> None:
    e = error(tmp_path, "worker_processes 1;\n")
    assert "no listen directive" in str(e) and e.file == tmp_path / "conf" / "srv.conf"
    e = error(tmp_path, LISTEN + "worker_processes 3;\nworker_cpu_affinity 01 10;\n")
    assert "2 masks for 3 workers" in str(e) and e.file == tmp_path / "conf" / "srv.conf"
    with pytest.raises(ConfigError, match=re.escape(f'open() "{tmp_path / "nope.conf"}" failed')):
        load_config(tmp_path / "nope.conf")


def test_curve_directives_read_the_certificates_at_load(tmp_path: Path) -> None:
    import zmq.auth

    keys = tmp_path / "keys"
    keys.mkdir()
    zmq.auth.create_certificates(keys, "server")
    zmq.auth.create_certificates(keys, "client")
    public = zmq.auth.load_certificate(keys / "client.key")[0]

    def zmq_block(*lines: str) -> str:
        return LISTEN + "zmq {\n    listen tcp://127.0.0.1:5555;\n" + "".join(f"    {x}\n" for x in lines) + "}\n"

    cfg = load(tmp_path, zmq_block("curve_server_key_file keys/server.key_secret;", "curve_allowed_clients keys;"))
    assert cfg.zmq_curve_server_key == keys / "server.key_secret" and cfg.zmq_curve_allowed == keys
    from server.config import curve_allowed_keys

    assert public in curve_allowed_keys(cfg.zmq_curve_allowed)
    assert curve_allowed_keys(keys / "client.key") == {public}  # one file of allowed keys
    for lines, fragment, line in [
        (["curve_allowed_clients keys;"], '"curve_server_key_file" and "curve_allowed_clients" go together', 6),
        (["curve_server_key_file keys/server.key;", "curve_allowed_clients keys;"], "holds no secret key", 7),
        (["curve_server_key_file keys/none;", "curve_allowed_clients keys;"], '"curve_server_key_file":', 7),
        (["curve_server_key_file keys/server.key_secret;", "curve_allowed_clients nowhere;"], '"curve_allowed_clients":', 7),
    ]:
        e = error(tmp_path, zmq_block(*lines))
        assert fragment in str(e) and e.line == line, str(e)
    (tmp_path / "empty").mkdir()
    e = error(tmp_path, zmq_block("curve_server_key_file keys/server.key_secret;", "curve_allowed_clients empty;"))
    assert "no public key" in str(e)
