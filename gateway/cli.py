"""The command line: run, check, status, schema, demo (SPEC section 3)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sqlite3
import sys
from pathlib import Path

import structlog

from gateway.errors import BufferBusyError, ConfigError

DEFAULT_CONFIG = "/etc/hub-gateway/gateway.yaml"
EXIT_OK, EXIT_PROBLEMS, EXIT_CONFIG = 0, 1, 2


def _config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("HUB_GATEWAY_CONFIG") or DEFAULT_CONFIG)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate gateway.yaml, every device map, the certificates and the buffer file.

    The exit status counts only what stops `run` (it is systemd's ExecStartPre): a damaged buffer
    is a warning, because `run` recovers from it by moving the file aside.
    """
    from gateway.config import load_config

    path = _config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        n = len(exc.problems)
        print(f"{n} problem{'s' if n != 1 else ''} found in {path} and the files it names")
        return EXIT_PROBLEMS
    buffer_path = config.settings.buffer.path
    damage = buffer_problems(buffer_path)
    for text in damage:
        print(f"warning: {buffer_path}: {text}")
    if damage:
        print(
            f"warning: {buffer_path}: damaged; `run` will move the file aside (as "
            f"{buffer_path.name}.corrupt-<time>, unsent readings stay in it) and start a new buffer"
        )
        buffer_state = "damaged: `run` will move it aside"
    elif buffer_path.exists():
        buffer_state = "passes PRAGMA integrity_check"
    else:
        buffer_state = "not created yet"
    print(
        f"{path}: OK ({len(config.settings.sources)} sources, {len(config.devices)} devices, "
        f"cloud {config.settings.cloud.kind}; buffer {buffer_state})"
    )
    return EXIT_OK


def buffer_problems(path: Path) -> list[str]:
    """`PRAGMA integrity_check` of the buffer file (read-only), and the damage marker."""
    from gateway.buffer import damage_marker, integrity_problems

    if not path.exists():
        return []
    problems = [f"integrity_check: {p}" for p in integrity_problems(path, quick=False)]
    marker = damage_marker(path)
    if marker.exists():
        problems.append(f"the daemon found this file damaged ({marker.read_text().strip()})")
    return problems


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of gateway.yaml and of device maps."""
    from gateway.schemas import schemas

    all_schemas = schemas()
    chosen = all_schemas if args.which == "all" else all_schemas[args.which]
    print(json.dumps(chosen, indent=2))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Show the backlog, last publish, dead letters and devices, from the buffer file."""
    from gateway.config import load_config
    from gateway.status import format_status, read_status

    path = _config_path(args.config)
    try:
        config = load_config(path, check_certs=False)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    report = read_status(config.settings.buffer.path)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT."""
    from gateway import log
    from gateway.config import load_config
    from gateway.service import Service

    path = _config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"hub-gateway: not started: {len(exc.problems)} problem(s) in the configuration", file=sys.stderr)
        return EXIT_CONFIG
    log.configure(config.settings.log.level, config.settings.log.format)
    # A fatal signal (SIGBUS from a file mapped on a card that went away, SIGSEGV) still leaves
    # a traceback in the journal instead of a silent death.
    faulthandler.enable()
    try:
        service = Service(config)
    except BufferBusyError as exc:
        print(f"hub-gateway: not started: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, sqlite3.Error) as exc:
        from gateway.service import EXIT_STORAGE_FAILED

        buffer_path = config.settings.buffer.path
        print(f"hub-gateway: not started: cannot open the buffer {buffer_path}: {exc}", file=sys.stderr)
        return EXIT_STORAGE_FAILED
    service.install_signal_handlers()
    try:
        service.run()
    except Exception:  # a bug: logged as such (not a bare traceback), and systemd restarts us
        structlog.get_logger("gateway").critical("the daemon stopped on an unexpected error", exc_info=True)
        return 1
    return service.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the full pipeline against the built-in simulated site."""
    from gateway.demo import run_demo

    return run_demo(minutes=args.minutes, out=Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hub-gateway",
        description="Factory gateway daemon: LoRaWAN/OSM readings from the local broker to AWS IoT Core.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"gateway.yaml (default: $HUB_GATEWAY_CONFIG, then {DEFAULT_CONFIG})"

    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument("-c", "--config", help=config_help)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate config, device maps and certificates")
    p.add_argument("-c", "--config", help=config_help)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("status", help="backlog, last publish, dead letters, devices")
    p.add_argument("-c", "--config", help=config_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("schema", help="print the JSON Schema of gateway.yaml and device maps")
    p.add_argument("which", nargs="?", choices=["all", "gateway", "devices"], default="all")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("demo", help="run the pipeline against a built-in simulated site")
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes (default: Ctrl-C)")
    p.add_argument("--out", default="./demo-out", help="where batches and the buffer go (default ./demo-out)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hub-gateway` command."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        # Flush here, not at interpreter exit, so a reader that went away is caught below.
        sys.stdout.flush()
    except BrokenPipeError:
        # `hub-gateway status | head`: the reader closed the pipe. As the Python docs advise
        # (signal module, "Note on SIGPIPE"), point stdout at devnull so the flush at exit
        # cannot fail again, and exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PROBLEMS
    return code
