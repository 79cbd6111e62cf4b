"""The command line: run, check, status, watch, enroll, schema, demo (SPEC section 3)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
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

    The exit status counts only what stops `run` (it is systemd's ExecStartPre): warnings (a
    damaged buffer, which `run` recovers from by moving the file aside; an override of a metric
    the codec is not known to give; a map file with no devices) are printed as `warning:` lines.
    """
    from gateway.config import examine_config
    from gateway.status import certificate_status, likely_typos, read_status

    path = _config_path(args.config)
    report = examine_config(path)
    for problem in report.problems:
        print(problem)
    for warning in report.warnings:
        print(f"warning: {warning}")
    config = report.config
    if config is None:
        n, w = len(report.problems), len(report.warnings)
        warned = f" and {w} warning{'s' if w != 1 else ''}" if w else ""
        print(f"{n} problem{'s' if n != 1 else ''}{warned} found in {path} and the files it names")
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
        try:
            heard = read_status(buffer_path, dead_letters=0)
        except (sqlite3.DatabaseError, OSError):
            heard = {}  # a first-version file `run` has not migrated yet: no hints from it
        mapped = [
            {"device": str(key), "sensor_id": m.entry.sensor_id, "where": m.where}
            for key, m in config.devices.by_key.items()
        ]
        for typo in likely_typos(mapped, heard):
            print(f"warning: {typo}")
    else:
        buffer_state = "not created yet"
    certificate = certificate_status(config.settings.cloud)
    days = f", certificate {certificate['days_left']} days left" if certificate and "days_left" in certificate else ""
    print(
        f"{path}: OK ({len(config.settings.sources)} sources, {len(config.devices)} devices, "
        f"cloud {config.settings.cloud.kind}{days}; buffer {buffer_state})"
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


def cmd_enroll(args: argparse.Namespace) -> int:
    """Fleet provisioning by claim: a key made here, CreateCertificateFromCsr, RegisterThing; the
    certificate and key written where gateway.yaml's cloud section names them."""
    from pydantic import ValidationError

    from gateway.config import load_settings
    from gateway.config.settings import IotCoreCloud, Provisioning
    from gateway.enroll import EnrollRequest, enroll
    from gateway.errors import EnrollError

    path = _config_path(args.config)
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    cloud = settings.cloud
    if not isinstance(cloud, IotCoreCloud):
        print(
            f"hub-gateway enroll: {path} has cloud.kind {cloud.kind}; enroll needs cloud.kind iot-core "
            "(its endpoint, ca, cert and key)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    section = settings.provisioning or Provisioning()
    try:  # the options override gateway.yaml key by key, and pass the same checks
        given = Provisioning(template=args.template, claim_cert=args.claim_cert, claim_key=args.claim_key)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            print(
                f"hub-gateway enroll: --{str(error['loc'][0]).replace('_', '-')}: "
                f"{error['msg'].removeprefix('Value error, ')}",
                file=sys.stderr,
            )
        return EXIT_CONFIG
    template = given.template or section.template
    claim_cert = given.claim_cert or section.claim_cert
    claim_key = given.claim_key or section.claim_key
    missing = [
        f"--{option} (or provisioning.{key} in {path})"
        for option, key, value in (
            ("template", "template", template),
            ("claim-cert", "claim_cert", claim_cert),
            ("claim-key", "claim_key", claim_key),
        )
        if value is None
    ]
    if template is None or claim_cert is None or claim_key is None:
        print(f"hub-gateway enroll: missing {', '.join(missing)}", file=sys.stderr)
        return EXIT_CONFIG
    request = EnrollRequest(
        endpoint=cloud.endpoint,
        port=cloud.port,
        ca=cloud.ca,
        claim_cert=claim_cert,
        claim_key=claim_key,
        template=template,
        thing_name=settings.gateway.id,
        tenant_id=settings.gateway.tenant_id,
        site_id=settings.gateway.site_id,
        cert=cloud.cert,
        key=cloud.key,
        timeout_s=args.timeout,
        force=args.force,
    )
    try:
        enroll(request, say=lambda line: print(line, flush=True))
    except EnrollError as exc:
        print(f"hub-gateway enroll: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(f"hub-gateway enroll: {note}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(
        f"enrolled. Next: hub-gateway check -c {path} (as the daemon's user: sudo -u hub-gateway ...), "
        "then systemctl start hub-gateway"
    )
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of gateway.yaml and of device maps."""
    from gateway.schemas import schemas

    all_schemas = schemas()
    chosen = all_schemas if args.which == "all" else all_schemas[args.which]
    print(json.dumps(chosen, indent=2))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Show the backlog, last publish, dead letters and devices, from the buffer file; or, with
    DEVICE, a diagnosis of one device."""
    from gateway.config import load_settings, read_device_maps
    from gateway.status import (
        certificate_status,
        device_table,
        find_device,
        format_device,
        format_status,
        maps_in_use,
        read_status,
        suggest,
    )

    path = _config_path(args.config)
    try:
        # gateway.yaml only: a broken device map must not hide the daemon's state, which is
        # exactly when an engineer needs it.
        settings = load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    buffer_path = settings.buffer.path
    try:
        report = read_status(buffer_path)
    except (sqlite3.DatabaseError, OSError) as exc:
        # Damaged, cut short, or not a file: what an operator finds after an exit 3.
        print(
            f"hub-gateway: the buffer {buffer_path} cannot be read: {exc}\n"
            "`hub-gateway check` says more; `run` moves a damaged buffer aside and starts a new one.",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    report["certificate"] = certificate_status(settings.cloud)
    devices, problems = read_device_maps(path, settings)
    on_disk = [
        {"device": str(key), "sensor_id": m.entry.sensor_id, "codec": m.entry.codec, "where": m.where}
        for key, m in devices.by_key.items()
    ]
    report["maps"] = maps_in_use(report, on_disk, [str(p) for p in problems])
    report["device_table"] = device_table(report, report["maps"])
    if args.device is not None:
        entry = find_device(args.device, report["device_table"])
        if entry is None:
            near = suggest(args.device, report["device_table"])
            hint = f"; did you mean {' or '.join(near[:3])}?" if near else ""
            print(
                f"hub-gateway: unknown device {args.device!r}: in no device map, not among the devices the "
                f"daemon runs with, never heard{hint}",
                file=sys.stderr,
            )
            return EXIT_PROBLEMS
        print(json.dumps(entry, indent=2) if args.json else format_device(entry, report))
        return EXIT_OK
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    """Stream what the running daemon does with each uplink, from its socket beside the buffer."""
    from gateway.config import load_settings
    from gateway.watch import socket_path
    from gateway.watch_client import watch

    path = _config_path(args.config)
    try:
        settings = load_settings(path)  # gateway.yaml only, like status: a broken map must not stop it
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    try:
        return watch(socket_path(settings.buffer.path), args.ids, args.json)
    except KeyboardInterrupt:  # Ctrl-C before the stream started: as quiet as during it
        return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT."""
    # Until the service installs its handlers, SIGHUP (a `systemctl reload` racing the start)
    # must not end the process: the maps are being read fresh anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
    for warning in config.warnings:
        structlog.get_logger("gateway.config").warning("check warning", problem=str(warning))
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
    """Run the full pipeline against the built-in simulated site, through its own Mosquitto if
    one is installed."""
    from gateway.demo import run_demo
    from gateway.demo_broker import find_mosquitto

    return run_demo(minutes=args.minutes, out=Path(args.out), mosquitto=find_mosquitto())


def version() -> str:
    """The installed distribution's version; the package's own when it runs from a source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("hub-gateway")
    except PackageNotFoundError:
        import gateway

        return getattr(gateway, "__version__", "unknown")


_RUN_EPILOG = """\
exit status:
  0  stopped cleanly after SIGTERM or SIGINT
  1  a worker thread died of an unexpected error (systemd restarts the daemon)
  2  configuration error, or another daemon holds the buffer ("already running (pid N)")
  3  the buffer file was found damaged, or deleted and written back (systemd restarts; the
     new start moves a damaged file aside)
  4  the buffer cannot be written: read-only filesystem or I/O errors (not restarted)

signals:
  SIGTERM, SIGINT  stop intake, flush what is committed, exit within 5 s
  SIGHUP           reload the device maps (a map that fails validation is rejected and the
                   running one kept; systemctl reload hub-gateway sends it)

example:
  hub-gateway run -c /etc/hub-gateway/gateway.yaml
"""

_CHECK_EPILOG = """\
Prints each problem as FILE:LINE:COL: message, then warnings (lines starting "warning:"),
then a summary. Warnings (an override of a metric the codec is not known to give, a map
file with no devices, a buffer directory `run` will create, a damaged buffer `run` will move
aside) do not fail the check.

exit status:
  0  no problems (warnings allowed)
  1  problems: `run` would refuse this configuration

examples:
  hub-gateway check -c /etc/hub-gateway/gateway.yaml
  sudo -u hub-gateway hub-gateway check   (as the daemon's user: the rights `run` will have)
"""

_STATUS_EPILOG = """\
Reads the buffer file: works while `run` is running and while it is stopped, and while a
device map on disk is broken (it names the broken file and shows the devices the running
daemon uses). Every mapped device is listed, heard or not, with a verdict: ok, never heard,
an unmapped near-miss id heard, decode errors, other tenant, frame-counter reset, late.

exit status:
  0  status shown
  1  the buffer cannot be read, or DEVICE is unknown (in no map, never heard)
  2  gateway.yaml does not validate

examples:
  hub-gateway status -c /etc/hub-gateway/gateway.yaml
  hub-gateway status press-03-clamp        (or its dev_eui or osm_id)
  hub-gateway status --json | jq .backlog
"""

_WATCH_EPILOG = """\
One line per uplink, as the running daemon commits it: the readings with their units (after
the device map's rename and scale), a dead letter with its reason and payload in hex, an
uplink from an unmapped device or another ChirpStack tenant, a ChirpStack log event, a
duplicate. IDs (sensor_id, dev_eui or osm_id) are filtered by the daemon. A terminal that
does not keep up is told how many events it missed; the daemon never waits for it.
Read-only: it changes nothing in the daemon.

exit status:
  0  stopped with Ctrl-C
  1  no daemon is running (or it stopped while watching), or the socket cannot be opened
  2  gateway.yaml does not validate

examples:
  sudo -u hub-gateway hub-gateway watch
  sudo -u hub-gateway hub-gateway watch press-03-clamp 70b3d57ed0005678
  sudo -u hub-gateway hub-gateway watch --json | jq -c 'select(.event == "dead_letter")'
"""

_ENROLL_EPILOG = """\
AWS IoT fleet provisioning by claim. Connects to cloud.endpoint with the claim certificate and
client id gateway.id, makes a private key here (it never leaves the gateway), asks IoT Core for
a certificate (CreateCertificateFromCsr), then RegisterThing with the template and the
parameters ThingName (gateway.id), TenantId and SiteId. Only when both are accepted are the
certificate and key written where cloud.cert and cloud.key say (key mode 0600, owned by the
hub-gateway user when run as root). --template, --claim-cert and --claim-key override the
provisioning section of gateway.yaml. IoT Core's set-up: config/aws/README.md.

exit status:
  0  enrolled
  1  not enrolled: IoT Core refused (its code and message are printed), no answer in time
     (what was waited for is printed), or a working certificate is there and --force not given
  2  gateway.yaml does not validate, its cloud is not iot-core, or no template or claim is named

example:
  hub-gateway enroll -c /etc/hub-gateway/gateway.yaml --template hub-gateway \\
      --claim-cert /etc/hub-gateway/certs/claim.pem.crt \\
      --claim-key /etc/hub-gateway/certs/claim.private.pem.key
  (as root, with sudo: the key is then given to the hub-gateway user)
"""

_SCHEMA_EPILOG = """\
examples:
  hub-gateway schema gateway > config/schema/gateway.schema.json
  hub-gateway schema devices > config/schema/devices.schema.json
"""

_DEMO_EPILOG = """\
example:
  hub-gateway demo --minutes 2 --out ./demo-out
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hub-gateway",
        description="Factory gateway daemon: LoRaWAN/OSM readings from the local broker to AWS IoT Core.",
        epilog="example:\n  hub-gateway check -c /etc/hub-gateway/gateway.yaml\n"
        "  hub-gateway COMMAND --help   (each command's options, exit status and examples)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hub-gateway {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"gateway.yaml (default: $HUB_GATEWAY_CONFIG, then {DEFAULT_CONFIG})"
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "run",
        help="run the daemon in the foreground",
        description="Run the daemon in the foreground (systemd starts it as a Type=notify service).",
        epilog=_RUN_EPILOG,
        formatter_class=raw,
    )
    p.add_argument("-c", "--config", help=config_help)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "check",
        help="validate config, device maps and certificates",
        description="Validate gateway.yaml, every device map, the certificates and keys, and the buffer file.",
        epilog=_CHECK_EPILOG,
        formatter_class=raw,
    )
    p.add_argument("-c", "--config", help=config_help)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "status",
        help="backlog, last publish, dead letters, devices",
        description="Show the backlog, the last publish, dead letters and every device's last uplink.",
        epilog=_STATUS_EPILOG,
        formatter_class=raw,
    )
    p.add_argument("-c", "--config", help=config_help)
    p.add_argument("device", nargs="?", metavar="DEVICE", help="diagnose one device: its sensor_id, dev_eui or osm_id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "watch",
        help="live stream of what the running daemon does with each uplink",
        description="Show, live, what the running daemon does with each uplink (all devices, or those named).",
        epilog=_WATCH_EPILOG,
        formatter_class=raw,
    )
    p.add_argument("ids", nargs="*", metavar="ID", help="sensor_id, dev_eui or osm_id (default: every device)")
    p.add_argument("-c", "--config", help=config_help)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser(
        "enroll",
        help="get this gateway's certificate from IoT Core (fleet provisioning by claim)",
        description="Enrol this gateway in AWS IoT Core by claim: a key made here, its certificate, the thing.",
        epilog=_ENROLL_EPILOG,
        formatter_class=raw,
    )
    p.add_argument("-c", "--config", help=config_help)
    p.add_argument("--template", help="provisioning template name (default: provisioning.template)")
    p.add_argument("--claim-cert", metavar="FILE", help="claim certificate (default: provisioning.claim_cert)")
    p.add_argument("--claim-key", metavar="FILE", help="claim private key (default: provisioning.claim_key)")
    p.add_argument("--force", action="store_true", help="replace a working certificate and key")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the connection and for each answer (default 30)",
    )
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser(
        "schema",
        help="print the JSON Schema of gateway.yaml and device maps",
        description="Print the JSON Schema of gateway.yaml, of device maps, or both (for editors).",
        epilog=_SCHEMA_EPILOG,
        formatter_class=raw,
    )
    p.add_argument("which", nargs="?", choices=["all", "gateway", "devices"], default="all")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser(
        "demo",
        help="run the pipeline against a built-in simulated site",
        description="Run the full pipeline against a built-in simulated site, publishing to a directory.",
        epilog=_DEMO_EPILOG,
        formatter_class=raw,
    )
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
        # cannot fail again, and exit quietly: the reader chose to stop, nothing went wrong
        # (exit 0, so `set -o pipefail` scripts do not fail at random on how much fitted).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:  # stdout on a full disk (`> /dev/full`), a vanished terminal
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        print(f"hub-gateway: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    return code
