"""The configuration file: nginx syntax (parsed by crossplane), checked into plain dataclasses.

Every error names ``file:line``, whether it comes from ``-t``, from start-up or from a HUP, so
an operator can fix a reload that was refused. This module imports no torch: the master uses it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crossplane

from models.catalog import check_model_folder


class ConfigError(Exception):
    """A configuration mistake, located at ``file:line``."""

    def __init__(self, message: str, file: str | os.PathLike | None = None, line: int | None = None) -> None:
        self.message, self.file, self.line = message, file, line
        where = f" in {file}:{line}" if file and line else (f" in {file}" if file else "")
        super().__init__(f"{message}{where}")


@dataclass
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class ModelConf:
    name: str
    path: Path
    model_type: str = ""
    device: str = "auto"  # auto | cpu | cuda | cuda:0,1
    max_batch_size: int = 8
    batch_timeout: float = 0.002  # seconds a partial batch may wait while the device is busy
    max_queue_size: int = 256  # requests waiting per worker; beyond that: 503 / overload
    request_timeout: float = 60.0
    tensor_parallel: int = 1  # > 1: groups of that many slots each hold one sharded copy (rank 0 serves)
    tensor_parallel_port: int | None = None  # first rendezvous port to try; None = a free one
    workers: list[int] | None = None  # slots hosting the model; None = every worker
    kv_cache_tokens: int | None = None  # generation (BLOOM): KV pool in tokens ...
    kv_cache_size: int | None = None  # ... or in bytes; neither: 512m
    max_num_seqs: int = 32  # generation: sequences in the running batch
    max_image_pixels: int | None = None  # image models: decoded pixels per image; None = the model's default
    peer_timeout: float | None = None  # a forwarded / split request's deadline at a peer; None = the main one

    def slots(self, worker_processes: int) -> list[int]:
        return list(range(worker_processes)) if self.workers is None else list(self.workers)


@dataclass(frozen=True)
class TPGroup:
    """One tensor-parallel group: ``slots[r]`` runs rank r of ``model`` (rank 0 serves it)."""

    model: str
    index: int  # the model's group number (several groups = replicas)
    slots: tuple[int, ...]
    port_base: int | None = None

    @property
    def key(self) -> str:
        return f"{self.model}/{self.index}"

    @property
    def size(self) -> int:
        return len(self.slots)


@dataclass
class Config:
    file: Path
    prefix: Path
    worker_processes: int = 1
    worker_cpu_affinity: str | list[list[int]] = "auto"  # auto | off | per-worker core lists
    worker_shutdown_timeout: float = 30.0
    worker_timeout: float = 60.0  # heartbeat: a worker silent that long is killed and respawned
    peer_timeout: float = 10.0  # a forwarded / split request unanswered that long is retried elsewhere
    worker_load_timeout: float = 600.0  # the same bound while a worker is loading its models
    worker_preload: bool = True  # fork workers from a process that has imported torch (shared pages)
    worker_malloc_trim: int = 64 << 20  # an idle worker grown by this much since its last trim trims; 0: off
    pid: Path = Path("run/modelsrv.pid")
    error_log: Path = Path("logs/error.log")
    error_log_level: str = "info"
    daemon: bool = False
    http_listen: list[Listen] = field(default_factory=list)
    access_log: Path | None = None
    client_max_body_size: int = 64 << 20
    client_body_timeout: float = 60.0
    client_header_timeout: float = 60.0  # the request line and headers must arrive within this (408)
    send_timeout: float = 60.0  # a reply that makes no progress this long: the connection is closed
    keepalive_timeout: float = 75.0
    worker_connections: int = 512  # events { worker_connections N; }: HTTP connections per worker
    auth_token_file: Path | None = None  # http { auth_token_file PATH; }: Bearer tokens, one per line
    auth_tokens: tuple[str, ...] = ()  # read from auth_token_file at load (and so on every HUP)
    auth_metrics: bool = True  # /metrics needs a token too when auth_token_file is set
    zmq_listen: list[Listen] = field(default_factory=list)
    zmq_curve_server_key: Path | None = None  # CURVE: the server's secret certificate (zmq.auth format)
    zmq_curve_allowed: Path | None = None  # CURVE: a directory of allowed clients' public certificates, or one file
    models: dict[str, ModelConf] = field(default_factory=dict)
    run_dir: Path = Path("run")
    gpus: int = 0  # visible GPUs, counted without touching CUDA

    def models_on(self, slot: int) -> list[ModelConf]:
        return [m for m in self.models.values() if m.workers is None or slot in m.workers]

    def tp_groups(self) -> list[TPGroup]:
        """The tensor-parallel groups: each model's slots cut into runs of ``tensor_parallel``."""
        groups = []
        for m in self.models.values():
            if m.tensor_parallel > 1:
                slots = m.slots(self.worker_processes)
                k = m.tensor_parallel
                groups += [TPGroup(m.name, i // k, tuple(slots[i:i + k]), m.tensor_parallel_port)
                           for i in range(0, len(slots), k)]
        return groups

    def tp_of(self, slot: int) -> tuple[TPGroup, int] | None:
        """(group, rank) of the tensor-parallel group ``slot`` belongs to, or None."""
        for g in self.tp_groups():
            if slot in g.slots:
                return g, g.slots.index(slot)
        return None


NO_LIMIT = 1 << 62
LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")
_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_time(value: str) -> float:
    """nginx times: ``500ms``, ``30s``, ``2m``, ``1h``; a bare number is seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", value)
    if not m:
        raise ValueError(f'invalid time "{value}"')
    return float(m.group(1)) * _TIME_UNITS[m.group(2) or "s"]


def parse_size(value: str) -> int:
    """nginx sizes: ``512``, ``64k``, ``64m``, ``1g`` (case-insensitive)."""
    m = re.fullmatch(r"(\d+)([kmg]?)", value.lower())
    if not m:
        raise ValueError(f'invalid size "{value}"')
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse_listen(value: str, scheme: str | None = None) -> Listen:
    if scheme:
        if not value.startswith(f"{scheme}://"):
            raise ValueError(f'listen "{value}" must look like {scheme}://HOST:PORT')
        value = value[len(scheme) + 3 :]
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "0.0.0.0"
    if host == "*":
        host = "0.0.0.0"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'invalid port in "{value}"')
    return Listen(host, int(port))


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (containers)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def count_gpus() -> int:
    """Visible NVIDIA GPUs, without initialising CUDA (the master must not: fork would break it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


class _Directive:
    """One crossplane directive with its location, for error messages."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.name: str = raw["directive"]
        self.args: list[str] = raw["args"]
        self.file: str = raw.get("file", "")
        self.line: int = raw["line"]
        self.block: list[dict[str, Any]] | None = raw.get("block")

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, self.file, self.line)

    def one(self) -> str:
        if len(self.args) != 1:
            raise self.error(f'invalid number of arguments in "{self.name}" directive')
        return self.args[0]

    def convert(self, fn: Any) -> Any:
        try:
            return fn(self.one())
        except ValueError as exc:
            raise self.error(f'{exc} in "{self.name}" directive') from None

    def flag(self) -> bool:
        value = self.one()
        if value not in ("on", "off"):
            raise self.error(f'invalid value "{value}" in "{self.name}" directive, it must be "on" or "off"')
        return value == "on"

    def positive_time(self) -> float:
        value = self.convert(parse_time)
        if value <= 0:
            raise self.error(f'"{self.name}" must be greater than 0')
        return value

    def positive_size(self) -> int:
        value = self.convert(parse_size)
        if value < 1:
            raise self.error(f'"{self.name}" must be greater than 0')
        return value

    def positive_int(self) -> int:
        value = self.one()
        if not value.isdigit() or int(value) < 1:
            raise self.error(f'invalid value "{value}" in "{self.name}" directive')
        return int(value)


def _flatten(parsed: dict[str, Any]) -> list[dict[str, Any]]:
    """crossplane's payload for the main file with includes spliced in place (combine)."""
    config = parsed["config"][0]
    return config["parsed"]


def load_config(path: str | os.PathLike, prefix: str | os.PathLike | None = None, check_models: bool = True) -> Config:
    """Parse and check the configuration; raise ConfigError with file:line on the first mistake."""
    path = Path(path).absolute()
    if not path.is_file():
        raise ConfigError(f'open() "{path}" failed (No such file or directory)')
    try:
        parsed = crossplane.parse(
            str(path), catch_errors=False, combine=True, check_ctx=False, check_args=False, single=False
        )
    except crossplane.errors.NgxParserBaseException as exc:
        raise ConfigError(exc.strerror, exc.filename, exc.lineno) from None
    if parsed["status"] != "ok":  # with combine=True, crossplane reports syntax errors here instead of raising
        err = parsed["errors"][0]
        file, line, message = err.get("file"), err.get("line"), err["error"]
        if not message:  # the lexer ran out of input inside a quoted string; crossplane says nothing
            message = "unexpected end of file (an unterminated quote?)"
            line = line or _last_line(file)
        raise ConfigError(message.removesuffix(f" in {file}:{line}"), file, line)  # crossplane appends the place

    cfg = Config(file=path, prefix=Path(prefix).absolute() if prefix else path.parent.parent)
    cfg.gpus = count_gpus()
    seen: set[str] = set()
    for raw in _flatten(parsed):
        d = _Directive(raw)
        if d.name in seen and d.name not in ("model",):
            raise d.error(f'"{d.name}" directive is duplicate')
        seen.add(d.name)
        _apply_main(cfg, d)
    _resolve(cfg, check_models)
    return cfg


def _last_line(file: str | None) -> int | None:
    try:
        return max(1, len(Path(file).read_text().splitlines())) if file else None
    except OSError:
        return None


def _apply_main(cfg: Config, d: _Directive) -> None:
    if d.name == "worker_processes":
        value = d.one()
        if value == "auto":
            cfg.worker_processes = 0  # resolved below
        else:
            cfg.worker_processes = d.positive_int()
    elif d.name == "worker_cpu_affinity":
        if d.args in (["auto"], ["off"]):
            cfg.worker_cpu_affinity = d.args[0]
        else:
            masks = []
            for mask in d.args:
                if not re.fullmatch(r"[01]+", mask):
                    raise d.error(f'invalid mask "{mask}" in "worker_cpu_affinity" directive')
                masks.append([i for i, bit in enumerate(reversed(mask)) if bit == "1"])
            cfg.worker_cpu_affinity = masks
    elif d.name == "worker_shutdown_timeout":
        cfg.worker_shutdown_timeout = d.convert(parse_time)
    elif d.name == "worker_timeout":
        cfg.worker_timeout = d.positive_time()
    elif d.name == "peer_timeout":
        cfg.peer_timeout = d.positive_time()
    elif d.name == "worker_load_timeout":
        cfg.worker_load_timeout = d.positive_time()
    elif d.name == "worker_preload":
        cfg.worker_preload = d.flag()
    elif d.name == "worker_malloc_trim":
        cfg.worker_malloc_trim = 0 if d.args == ["off"] else d.positive_size()
    elif d.name == "pid":
        cfg.pid = Path(d.one())
    elif d.name == "error_log":
        if not 1 <= len(d.args) <= 2:
            raise d.error('invalid number of arguments in "error_log" directive')
        cfg.error_log = Path(d.args[0])
        if len(d.args) == 2:
            if d.args[1] not in LOG_LEVELS:
                raise d.error(f'invalid log level "{d.args[1]}"')
            cfg.error_log_level = d.args[1]
    elif d.name == "daemon":
        cfg.daemon = d.flag()
    elif d.name == "events":
        _apply_block(cfg, d, _apply_events)
    elif d.name == "http":
        _apply_block(cfg, d, _apply_http)
    elif d.name == "zmq":
        _apply_block(cfg, d, _apply_zmq)
    elif d.name == "model":
        _apply_model(cfg, d)
    else:
        raise d.error(f'unknown directive "{d.name}"')


def _apply_block(cfg: Config, d: _Directive, apply: Any) -> None:
    if d.block is None:
        raise d.error(f'directive "{d.name}" has no opening "{{"')
    if d.args:
        raise d.error(f'invalid number of arguments in "{d.name}" directive')
    seen: set[str] = set()
    for raw in d.block:
        inner = _Directive(raw)
        if inner.name in seen and inner.name != "listen":
            raise inner.error(f'"{inner.name}" directive is duplicate')
        seen.add(inner.name)
        apply(cfg, inner)


def _apply_http(cfg: Config, d: _Directive) -> None:
    if d.name == "listen":
        cfg.http_listen.append(d.convert(parse_listen))
    elif d.name == "access_log":
        value = d.one()
        cfg.access_log = None if value == "off" else Path(value)
    elif d.name == "client_max_body_size":
        cfg.client_max_body_size = d.convert(parse_size) or NO_LIMIT  # 0 = no limit, as in nginx
    elif d.name == "client_body_timeout":
        cfg.client_body_timeout = d.positive_time()
    elif d.name == "keepalive_timeout":
        cfg.keepalive_timeout = d.convert(parse_time)
    elif d.name == "client_header_timeout":
        cfg.client_header_timeout = d.positive_time()
    elif d.name == "send_timeout":
        cfg.send_timeout = d.positive_time()
    elif d.name == "auth_token_file":
        cfg.auth_token_file = Path(d.one())
        cfg._auth_where = (d.file, d.line)  # type: ignore[attr-defined]
    elif d.name == "auth_metrics":
        cfg.auth_metrics = d.flag()
    else:
        raise d.error(f'unknown directive "{d.name}"')


def _apply_events(cfg: Config, d: _Directive) -> None:
    if d.name == "worker_connections":
        cfg.worker_connections = d.positive_int()
        if cfg.worker_connections < 2:
            raise d.error('"worker_connections" must be at least 2')
    else:
        raise d.error(f'unknown directive "{d.name}"')


def read_tokens(path: Path) -> tuple[str, ...]:
    """Bearer tokens: one per line; blank lines and ``#`` comments skipped. Raises ValueError."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f'cannot read auth_token_file "{path}": {exc}') from None
    tokens = []
    for line in text.splitlines():
        token = line.split("#", 1)[0].strip()
        if token:
            if any(c.isspace() for c in token) or not token.isascii():
                raise ValueError(f'auth_token_file "{path}": a token must be printable ASCII without spaces')
            tokens.append(token)
    if not tokens:
        raise ValueError(f'auth_token_file "{path}" holds no token')
    return tuple(tokens)


def _apply_zmq(cfg: Config, d: _Directive) -> None:
    if d.name == "listen":
        cfg.zmq_listen.append(d.convert(lambda v: parse_listen(v, "tcp")))
    elif d.name == "curve_server_key_file":
        cfg.zmq_curve_server_key = Path(d.one())
        cfg._curve_where = (d.file, d.line)  # type: ignore[attr-defined]
    elif d.name == "curve_allowed_clients":
        cfg.zmq_curve_allowed = Path(d.one())
        cfg._curve_where = (d.file, d.line)  # type: ignore[attr-defined]
    else:
        raise d.error(f'unknown directive "{d.name}"')


def _apply_model(cfg: Config, d: _Directive) -> None:
    if d.block is None:
        raise d.error('directive "model" has no opening "{"')
    if len(d.args) != 1 or not re.fullmatch(r"[A-Za-z0-9_.-]+", d.args[0]):
        raise d.error('"model" takes one name of letters, digits, "_", "-" or "."')
    name = d.args[0]
    if name in cfg.models:
        raise d.error(f'duplicate model "{name}"')
    model = ModelConf(name=name, path=Path())
    has_path = False
    seen: set[str] = set()
    for raw in d.block:
        inner = _Directive(raw)
        if inner.name in seen:
            raise inner.error(f'"{inner.name}" directive is duplicate')
        seen.add(inner.name)
        if inner.name == "path":
            model.path, has_path = Path(inner.one()), True
        elif inner.name == "device":
            value = inner.one()
            if not re.fullmatch(r"auto|cpu|cuda(:\d+(,\d+)*)?", value):
                raise inner.error(f'invalid device "{value}" (auto, cpu, cuda or cuda:0,1,...)')
            model.device = value
        elif inner.name == "max_batch_size":
            model.max_batch_size = inner.positive_int()
        elif inner.name == "batch_timeout":
            model.batch_timeout = inner.convert(parse_time)
        elif inner.name == "max_queue_size":
            model.max_queue_size = inner.positive_int()
        elif inner.name == "request_timeout":
            model.request_timeout = inner.positive_time()
        elif inner.name == "tensor_parallel":
            model.tensor_parallel = inner.positive_int()
        elif inner.name == "tensor_parallel_port":
            port = inner.positive_int()
            if port > 65535:
                raise inner.error(f'invalid port "{port}" in "tensor_parallel_port" directive')
            model.tensor_parallel_port = port
        elif inner.name == "kv_cache_tokens":
            model.kv_cache_tokens = inner.positive_int()
        elif inner.name == "kv_cache_size":
            model.kv_cache_size = inner.positive_size()
        elif inner.name == "max_num_seqs":
            model.max_num_seqs = inner.positive_int()
        elif inner.name == "max_image_pixels":
            model.max_image_pixels = inner.positive_size()
        elif inner.name == "peer_timeout":
            model.peer_timeout = inner.positive_time()
        elif inner.name == "workers":
            if not inner.args or not all(a.isdigit() for a in inner.args):
                raise inner.error('"workers" takes worker numbers (0, 1, ...)')
            model.workers = sorted({int(a) for a in inner.args})
        else:
            raise inner.error(f'unknown directive "{inner.name}"')
    if not has_path:
        raise d.error(f'model "{name}" has no "path"')
    if "kv_cache_tokens" in seen and "kv_cache_size" in seen:
        raise d.error(f'model "{name}": give "kv_cache_tokens" or "kv_cache_size", not both')
    model._generation = sorted(seen & GENERATION_DIRECTIVES)  # type: ignore[attr-defined]
    model._where = (d.file, d.line)  # type: ignore[attr-defined]
    cfg.models[name] = model


def _check_curve(cfg: Config, absolute: Any) -> None:
    """Both CURVE directives, readable certificates: a mistake fails the start, not every handshake."""
    import zmq.auth

    file, line = getattr(cfg, "_curve_where", (cfg.file, None))
    if cfg.zmq_curve_server_key is None or cfg.zmq_curve_allowed is None:
        raise ConfigError('"curve_server_key_file" and "curve_allowed_clients" go together', file, line)
    cfg.zmq_curve_server_key = absolute(cfg.zmq_curve_server_key)
    cfg.zmq_curve_allowed = absolute(cfg.zmq_curve_allowed)
    try:
        public, secret = zmq.auth.load_certificate(cfg.zmq_curve_server_key)
    except (OSError, ValueError) as exc:
        raise ConfigError(f'"curve_server_key_file": {exc}', file, line) from None
    if not secret:
        raise ConfigError(f'"curve_server_key_file": {cfg.zmq_curve_server_key} holds no secret key '
                          "(give the .key_secret file)", file, line)
    try:
        allowed = curve_allowed_keys(cfg.zmq_curve_allowed)
    except (OSError, ValueError) as exc:
        raise ConfigError(f'"curve_allowed_clients": {exc}', file, line) from None
    if not allowed:
        raise ConfigError(f'"curve_allowed_clients": no public key in {cfg.zmq_curve_allowed} (*.key files)', file, line)


def curve_allowed_keys(path: Path) -> set[bytes]:
    """The Z85 public keys of a directory of zmq.auth certificates (``*.key``) or of one certificate file."""
    import zmq.auth

    if path.is_dir():
        return set(zmq.auth.load_certificates(str(path)))
    return {zmq.auth.load_certificate(path)[0]}


GENERATION_DIRECTIVES = {"kv_cache_tokens", "kv_cache_size", "max_num_seqs"}
GENERATIVE_TYPES = {"bloom"}


def _resolve(cfg: Config, check_models: bool) -> None:
    """Fill in "auto" values and absolute paths; check what needs the whole file."""

    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else cfg.prefix / p

    cfg.pid = absolute(cfg.pid)
    cfg.error_log = absolute(cfg.error_log)
    cfg.run_dir = cfg.pid.parent
    if cfg.access_log is not None:
        cfg.access_log = absolute(cfg.access_log)
    if cfg.auth_token_file is not None:
        cfg.auth_token_file = absolute(cfg.auth_token_file)
        try:
            cfg.auth_tokens = read_tokens(cfg.auth_token_file)
        except ValueError as exc:
            raise ConfigError(str(exc), *cfg._auth_where) from None  # type: ignore[attr-defined]
    if cfg.worker_processes == 0:
        cfg.worker_processes = cfg.gpus or usable_cpus()
    if isinstance(cfg.worker_cpu_affinity, list) and len(cfg.worker_cpu_affinity) < cfg.worker_processes:
        raise ConfigError(
            f"worker_cpu_affinity names {len(cfg.worker_cpu_affinity)} masks for {cfg.worker_processes} workers",
            cfg.file,
        )
    if cfg.zmq_curve_server_key is not None or cfg.zmq_curve_allowed is not None:
        _check_curve(cfg, absolute)
    if not cfg.http_listen and not cfg.zmq_listen:
        raise ConfigError("no listen directive in an http or zmq block: nothing would be served", cfg.file)
    for model in cfg.models.values():
        file, line = model._where  # type: ignore[attr-defined]
        model.path = absolute(model.path)
        if model.workers is not None:
            bad = [w for w in model.workers if w >= cfg.worker_processes]
            if bad:
                raise ConfigError(f'model "{model.name}": no worker {bad[0]} (worker_processes {cfg.worker_processes})', file, line)
        if model.device.startswith("cuda") and cfg.gpus == 0:
            raise ConfigError(f'model "{model.name}": device {model.device} but no GPU is visible', file, line)
        if model.tensor_parallel > 1:
            _check_tensor_parallel(cfg, model, False, file, line)  # what needs no model folder, first
        if check_models:
            try:
                model.model_type = check_model_folder(model.path)
            except ValueError as exc:
                raise ConfigError(f'model "{model.name}": {exc}', file, line) from None
            extra = model._generation  # type: ignore[attr-defined]
            if extra and model.model_type not in GENERATIVE_TYPES:
                raise ConfigError(f'model "{model.name}": "{extra[0]}" applies to text generation models '
                                  f'({", ".join(sorted(GENERATIVE_TYPES))}), not {model.model_type}', file, line)
        if model.tensor_parallel > 1 and check_models:
            _check_tensor_parallel(cfg, model, True, file, line)
    taken: dict[int, str] = {}
    for g in cfg.tp_groups():
        for slot in g.slots:
            if slot in taken:
                raise ConfigError(f'worker {slot} is in two tensor-parallel groups ("{taken[slot]}" and "{g.model}")', cfg.file)
            taken[slot] = g.model


def _check_tensor_parallel(cfg: Config, model: ModelConf, check_models: bool, file: str, line: int) -> None:
    """k must divide the model's worker count and its head count (read from config.json, no torch)."""
    k = model.tensor_parallel
    n = len(model.slots(cfg.worker_processes))
    if n % k:
        raise ConfigError(f'model "{model.name}": tensor_parallel {k} does not divide its {n} worker(s)', file, line)
    if model.device.startswith("cuda:") and len(model.device[5:].split(",")) < k:
        raise ConfigError(f'model "{model.name}": tensor_parallel {k} needs {k} GPUs, device {model.device} names fewer', file, line)
    if not check_models:
        return
    from models.catalog import tensor_parallel_sizes

    try:
        heads, vocab = tensor_parallel_sizes(model.path)
    except ValueError as exc:
        raise ConfigError(f'model "{model.name}": {exc}', file, line) from None
    if heads % k:
        raise ConfigError(f'model "{model.name}": tensor_parallel {k} does not divide its {heads} attention heads', file, line)
    if vocab % k:
        raise ConfigError(f'model "{model.name}": tensor_parallel {k} does not divide its vocabulary of {vocab}', file, line)


def listener_keys(cfg: Config) -> list[str]:
    """The listening sockets a config needs, as the master names them: ``http:HOST:PORT``, ``zmq:HOST:PORT``."""
    return [f"http:{a}" for a in cfg.http_listen] + [f"zmq:{a}" for a in cfg.zmq_listen]


def split_listener_key(key: str) -> tuple[str, str, int]:
    """``"http:::1:8080"`` -> ``("http", "::1", 8080)`` (hosts may hold colons)."""
    kind, rest = key.split(":", 1)
    host, port = rest.rsplit(":", 1)
    return kind, host, int(port)


def slot_device(cfg: Config, model: ModelConf, slot: int) -> str:
    """The torch device a model uses in worker ``slot`` (inside the worker, GPUs are renumbered from 0)."""
    if model.device == "cpu" or (model.device == "auto" and cfg.gpus == 0):
        return "cpu"
    return "cuda:0"


def slot_gpu(cfg: Config, slot: int) -> int | None:
    """The physical GPU index of a slot (one GPU per worker, round robin), or None without GPUs."""
    if cfg.gpus == 0 or all(m.device == "cpu" for m in cfg.models.values()):
        return None
    explicit = [m.device for m in cfg.models_on(slot) if m.device.startswith("cuda:")]
    if explicit:
        ids = [int(x) for x in explicit[0][5:].split(",")]
        return ids[slot % len(ids)]
    return slot % cfg.gpus


def slot_threads(cfg: Config, slot: int) -> int:
    """Torch threads of a worker: its cores, or its share of a container's CPU quota."""
    if isinstance(cfg.worker_cpu_affinity, list):
        return len(cfg.worker_cpu_affinity[slot])
    return max(1, usable_cpus() // cfg.worker_processes)


def slot_cores(cfg: Config, slot: int) -> list[int] | None:
    """The CPU cores a worker is pinned to, or None (no pinning)."""
    if cfg.worker_cpu_affinity == "off":
        return None
    if isinstance(cfg.worker_cpu_affinity, list):
        return cfg.worker_cpu_affinity[slot]
    cores = sorted(os.sched_getaffinity(0))
    n = cfg.worker_processes
    if n >= len(cores):
        return [cores[slot % len(cores)]]
    per = len(cores) // n
    return cores[slot * per : (slot + 1) * per]
