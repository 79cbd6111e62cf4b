"""The files gateway.yaml names: certificates and keys (exist, PEM, mode, unencrypted, the
certificate's own, days left, the CA file against the chain), password files, and the buffer's
directory."""

from __future__ import annotations

import os
import pwd
import ssl
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from gateway import pki
from gateway.config.settings import IotCoreCloud, Settings
from gateway.config.yamlfile import YamlDocument, load_yaml
from gateway.errors import ConfigError, Problem

_RENEW_CLOUD = "renew it: sudo hub-gateway enroll --force, or a new certificate from IoT Core (config/aws/README.md)"
_RENEW_BROKER = "renew it from the CA that signed it"


def check_files(settings: Settings, path: Path, strict: bool = True) -> tuple[list[Problem], list[Problem]]:
    """Problems and warnings about the files gateway.yaml names: certificates and keys (exist, PEM,
    mode, the key unencrypted and the certificate's own, days left, the CA file against the chain).

    `strict` (`check`) makes an expired certificate, or a CA file that contradicts the chain, a
    problem; without it (`run`) they are warnings: the daemon keeps buffering readings while the
    cloud refuses it, where refusing to start would leave them to the local broker's queue.
    """
    problems: list[Problem] = []
    warnings: list[Problem] = []
    try:
        doc = load_yaml(path)
    except ConfigError as exc:
        return exc.problems, []
    now = pki.now_utc()
    cloud = settings.cloud
    tls_clients: list[tuple[list[Any], Path, Path | None, Path | None, str]] = []
    if isinstance(cloud, IotCoreCloud):
        tls_clients.append((["cloud"], cloud.ca, cloud.cert, cloud.key, _RENEW_CLOUD))
    for i, source in enumerate(settings.sources):
        tls = source.broker.tls
        if tls is not None:
            tls_clients.append((["sources", i, "broker", "tls"], tls.ca, tls.cert, tls.key, _RENEW_BROKER))
        if source.broker.password_file is not None:
            loc = ["sources", i, "broker", "password_file"]
            problems += _check_secret_file(source.broker.password_file, doc, loc)
    for at, ca, cert, key, renew in tls_clients:
        problems += _check_tls_files(doc, at, ca, cert, key)
        if cert is not None:
            errors, notes = _check_certificate(doc, at, ca, cert, now, renew)
            (problems if strict else warnings).extend(errors)
            warnings += notes
    return problems, warnings


def _check_certificate(
    doc: YamlDocument, at: list[Any], ca: Path, cert: Path, now: datetime, renew: str
) -> tuple[list[Problem], list[Problem]]:
    """Days left (expired: an error; fewer than 30: a warning; not yet valid: a warning about the
    clock) and the CA file against the certificate's chain, where it names the issuer."""
    where = ".".join(map(str, at))
    name = str(doc.path)
    line, col = doc.locate([*at, "cert"])
    errors: list[Problem] = []
    warnings: list[Problem] = []
    try:
        validity = pki.certificate_validity(cert)
    except (OSError, ValueError):
        return [], []  # the PEM and pair checks have said why
    try:
        chain = pki.chain_problems(cert, ca, now)
    except OSError:
        chain = []  # the PEM check has said why
    except ValueError as exc:  # BEGIN CERTIFICATE, then nothing a certificate is made of
        chain = [str(exc)]
    if validity.expired(now):
        errors.append(Problem(name, line, col, f"{where}.cert: {cert} {validity.describe(now)}; {renew}"))
    elif validity.days_left(now) < pki.EXPIRY_WARNING_DAYS:
        warnings.append(Problem(name, line, col, f"{where}.cert: {cert} {validity.describe(now)}; {renew}"))
    if now < validity.not_before:
        warnings.append(
            Problem(
                name,
                line,
                col,
                f"{where}.cert: {cert} is not valid before {validity.not_before:%Y-%m-%d %H:%M} UTC by this "
                "gateway's clock: is the clock right (timedatectl)?",
            )
        )
    ca_line, ca_col = doc.locate([*at, "ca"])
    errors += [Problem(name, ca_line, ca_col, f"{where}.ca: {text}") for text in chain]
    return errors, warnings


def _check_tls_files(doc: YamlDocument, at: list[Any], ca: Path, cert: Path | None, key: Path | None) -> list[Problem]:
    """The CA, certificate and key of one TLS client; the pair is tried when both are PEM files."""
    problems: list[Problem] = []
    pair_readable = True
    for field, file, kind in (("ca", ca, "CERTIFICATE"), ("cert", cert, "CERTIFICATE"), ("key", key, "PRIVATE KEY")):
        if file is None:
            continue
        problem = _check_pem(file, kind, doc, [*at, field])
        if problem is not None:
            problems.append(problem)
            pair_readable = pair_readable and field == "ca"
        elif field == "key":
            problems += _check_secret_file(file, doc, [*at, field])
    # A key with a loose mode is still worth trying with its certificate: report both at once.
    if cert is not None and key is not None and pair_readable:
        problems += _check_key_pair(cert, key, doc, at)
    return problems


class _PassphraseAsked(Exception):
    """OpenSSL asked for a passphrase: the key is encrypted."""


def _refuse_passphrase() -> NoReturn:
    # Called by OpenSSL instead of prompting on the terminal; raising makes load_cert_chain fail.
    raise _PassphraseAsked


# OpenSSL's reasons when a key loads but is not the certificate's (same type, or another type).
_MISMATCH_REASONS = frozenset({"KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED", "KEY_TYPE_MISMATCH"})


def _check_key_pair(cert: Path, key: Path, doc: YamlDocument, at: list[Any]) -> list[Problem]:
    """Load the pair as the TLS client will: the key must be unencrypted and the certificate's."""
    where = ".".join(map(str, at))
    key_line, key_col = doc.locate([*at, "key"])
    name = str(doc.path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=_refuse_passphrase)
    except _PassphraseAsked:
        return [
            Problem(
                name,
                key_line,
                key_col,
                f"{where}.key: {key} is encrypted with a passphrase; the daemon needs an unencrypted key "
                f"(openssl pkey -in {key} -out {key}.new)",
            )
        ]
    except ssl.SSLError as exc:
        if exc.reason in _MISMATCH_REASONS:
            return [
                Problem(
                    name,
                    key_line,
                    key_col,
                    f"{where}.cert and {where}.key do not belong together (the key is not the certificate's): "
                    f"{cert}, {key}",
                )
            ]
        reason = exc.reason or exc.library or "unreadable"
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
        except ssl.SSLError:
            line, col = doc.locate([*at, "cert"])
            text = f"{where}.cert: {cert} is not a usable PEM certificate (OpenSSL: {reason})"
            return [Problem(name, line, col, text)]
        text = f"{where}.key: {key} is not a usable private key (OpenSSL: {reason})"
        return [Problem(name, key_line, key_col, text)]
    except OSError as exc:
        return [Problem(name, key_line, key_col, f"{where}.cert/{where}.key: cannot read: {exc.strerror or exc}")]
    return []


def _check_secret_file(file: Path, doc: YamlDocument, loc: list[Any]) -> list[Problem]:
    line, col = doc.locate(loc)
    name = str(doc.path)
    try:
        mode = file.stat().st_mode
    except OSError as exc:
        return [Problem(name, line, col, f"{'.'.join(map(str, loc))}: {file}: {exc.strerror}")]
    if mode & 0o077:
        return [
            Problem(
                name,
                line,
                col,
                f"{'.'.join(map(str, loc))}: {file} is readable by group or others "
                f"(mode {mode & 0o777:04o}); run: chmod 600 {file}",
            )
        ]
    return []


def _check_pem(file: Path, kind: str, doc: YamlDocument, loc: list[Any]) -> Problem | None:
    """The file is readable and holds a PEM block of `kind`."""
    line, col = doc.locate(loc)
    name = str(doc.path)
    where = ".".join(map(str, loc))
    try:
        head = file.read_bytes()[: 1 << 16]
    except OSError as exc:
        hint = ""
        if isinstance(exc, FileNotFoundError) and loc in (["cloud", "cert"], ["cloud", "key"]):
            hint = "; not enrolled yet? sudo hub-gateway enroll (config/aws/README.md)"
        return Problem(name, line, col, f"{where}: cannot read {file}: {exc.strerror}{hint}")
    if b"-----BEGIN " not in head or kind.encode() not in head:
        return Problem(name, line, col, f"{where}: {file} is not a PEM {kind.lower()}")
    return None


def buffer_path_problems(path: Path, doc: YamlDocument) -> tuple[list[Problem], list[Problem]]:
    """Errors and warnings about `buffer.path`: `run` creates its directory (mkdir -p), so a missing
    one is a warning; one that cannot be created or written is an error."""
    line, col = doc.locate(["buffer", "path"])
    name = str(doc.path)
    directory = path.parent

    def problem(text: str) -> Problem:
        return Problem(name, line, col, f"buffer.path: {text}")

    if path.is_dir():
        return [problem(f"{path} is a directory; name the buffer file in it, e.g. {path / 'buffer.db'}")], []
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [problem(f"cannot create directory {directory}: {existing} is a file, not a directory")], []
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == directory:
            return [problem(f"directory {directory} is not writable by user {_user()}")], []
        return [problem(f"cannot create directory {directory}: {existing} is not writable by user {_user()}")], []
    if existing != directory:
        return [], [problem(f"directory {directory} does not exist; `run` will create it")]
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return [problem(f"{path} is not writable by user {_user()}")], []
    return [], []


def _user() -> str:
    """Who runs this check: `run` needs the same rights (run `check` as the daemon's user)."""
    uid = os.geteuid()
    try:
        return repr(pwd.getpwuid(uid).pw_name)
    except KeyError:
        return f"uid {uid}"
