"""``bin/modelsrv``: the command line of CONTRACT.md section 1 (nginx's flags)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from server import __version__
from server.config import ConfigError, load_config

SIGNALS = {"reload": signal.SIGHUP, "reopen": signal.SIGUSR1, "quit": signal.SIGQUIT, "stop": signal.SIGTERM}
REPO_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="modelsrv", description="nginx-style multi-process inference server")
    parser.add_argument("-c", dest="config", type=Path, help="configuration file (default: PREFIX/conf/srv.conf)")
    parser.add_argument("-p", dest="prefix", type=Path, help="prefix for relative paths (default: the config file's parent's parent)")
    parser.add_argument("-t", dest="test", action="store_true", help="test the configuration and exit")
    parser.add_argument("-s", dest="signal", choices=sorted(SIGNALS), help="send a signal to the master process")
    parser.add_argument("-v", dest="version", action="store_true", help="print the version and exit")
    args = parser.parse_args(argv)

    if args.version:
        print(f"modelsrv version: modelsrv/{__version__}")
        return 0
    prefix = args.prefix.absolute() if args.prefix else None
    config = (args.config or (prefix or REPO_ROOT) / "conf" / "srv.conf").absolute()

    if args.test:
        try:
            load_config(config, prefix)
        except ConfigError as exc:
            print(f"modelsrv: [emerg] {exc}", file=sys.stderr)
            print(f"modelsrv: configuration file {config} test failed", file=sys.stderr)
            return 1
        print(f"modelsrv: the configuration file {config} syntax is ok", file=sys.stderr)
        print(f"modelsrv: configuration file {config} test is successful", file=sys.stderr)
        return 0

    if args.signal:
        return send_signal(config, prefix, args.signal)

    from server.processes.master import run_master

    # what a binary upgrade (USR2) re-executes: the same command, with absolute paths
    reexec = ["-m", "server.cli", "-c", str(config)] + (["-p", str(prefix)] if prefix else [])
    return run_master(config, prefix, reexec)


def send_signal(config: Path, prefix: Path | None, name: str) -> int:
    try:
        cfg = load_config(config, prefix, check_models=False)
    except ConfigError as exc:
        print(f"modelsrv: [emerg] {exc}", file=sys.stderr)
        return 1
    try:
        pid = int(cfg.pid.read_text().strip())
    except (OSError, ValueError) as exc:
        print(f'modelsrv: [error] invalid PID number in "{cfg.pid}": {exc}', file=sys.stderr)
        return 1
    try:
        os.kill(pid, SIGNALS[name])
    except ProcessLookupError:
        print(f"modelsrv: [error] kill({pid}, {SIGNALS[name].name}) failed (No such process)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
