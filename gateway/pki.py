"""The gateway's own X.509 identity: the key and CSR made here, how long a certificate has left,
whether a CA file verifies a certificate's chain, and certificate and key written into place.

`enroll` makes the key and its CSR here so the private key never leaves the gateway, and writes
both files atomically (a temporary file beside the destination, fsync, rename, fsync of the
directory): a power cut leaves the old file or the new one, never half of one. `check` and
`status` read validity from here, so they say the same number of days.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import pwd
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: The systemd unit's user (systemd/hub-gateway.service): it must be able to read the key.
SERVICE_USER = "hub-gateway"
#: Fewer days left than this is a warning in `check`, `status` and the log of `run`.
EXPIRY_WARNING_DAYS = 30
KEY_MODE = 0o600
CERT_MODE = 0o644
#: Longest issuer chain followed from a certificate towards a CA file.
_MAX_CHAIN = 8


class CertificateError(ValueError):
    """A file that should hold a PEM certificate holds none that can be read."""


@dataclass(frozen=True)
class Validity:
    """When one certificate may be used, and who it names."""

    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime

    def days_left(self, now: datetime) -> int:
        """Whole days until it expires (0 on its last day; negative once expired)."""
        return math.floor((self.not_after - now).total_seconds() / 86400)

    def expired(self, now: datetime) -> bool:
        """True once `not_after` has passed."""
        return now >= self.not_after

    def describe(self, now: datetime) -> str:
        """`valid until 2027-01-31 12:00 UTC, 364 days left`, or how long ago it expired."""
        until = f"{self.not_after:%Y-%m-%d %H:%M} UTC"
        if self.expired(now):
            ago = -self.days_left(now) - 1
            return f"EXPIRED {_days(ago)} ago, on {until}" if ago else f"EXPIRED on {until}, less than a day ago"
        days = self.days_left(now)
        return f"valid until {until}, {_days(days)} left" if days else f"valid until {until}, less than a day left"


def _days(n: int) -> str:
    return f"{n} day" if n == 1 else f"{n} days"


def now_utc() -> datetime:
    """The wall clock as an aware UTC datetime (what certificate times are compared with)."""
    return datetime.now(UTC)


def read_certificates(path: Path) -> list[x509.Certificate]:
    """Every PEM certificate in a file, in order (a certificate file may carry its chain, a CA
    file several roots); `CertificateError` when there is none, `OSError` when unreadable."""
    data = path.read_bytes()
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(f"{path} holds no readable PEM certificate ({exc})") from None
    if not certificates:
        raise CertificateError(f"{path} holds no PEM certificate")
    return certificates


def validity(certificate: x509.Certificate) -> Validity:
    """The dates and names of one certificate."""
    return Validity(
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
    )


def validity_of_pem(pem: bytes) -> Validity:
    """The validity of the first certificate in PEM bytes."""
    return validity(x509.load_pem_x509_certificate(pem))


def certificate_validity(path: Path) -> Validity:
    """The validity of the first certificate in a file (the gateway's own, before its chain)."""
    return validity(read_certificates(path)[0])


def chain_problems(cert_path: Path, ca_path: Path, now: datetime) -> list[str]:
    """What the CA file says against the certificate's chain, where it can say anything.

    From the certificate, follow issuers through the intermediates in its own file until one is
    named in the CA file: that CA must verify the signature and be valid now. When the chain
    leaves what the two files hold (IoT Core signs device certificates with its own CA, while
    `cloud.ca` is the root that verifies the *server*), nothing can be said and nothing is.
    """
    chain = read_certificates(cert_path)
    anchors = read_certificates(ca_path)
    current = chain[0]
    intermediates = chain[1:]
    for _ in range(_MAX_CHAIN):
        issuer = current.issuer
        named = [ca for ca in anchors if ca.subject == issuer]
        if named:
            signers = [ca for ca in named if _signed_by(current, ca) is not False]
            if not signers:
                return [
                    f"{cert_path} names its issuer {issuer.rfc4514_string()!r}, but the certificate of that "
                    f"name in {ca_path} did not sign it (a CA made again under the same name, or the wrong "
                    "CA file): the TLS handshake would fail"
                ]
            expired = [validity(ca) for ca in signers if validity(ca).expired(now)]
            if len(expired) == len(signers):
                return [f"the CA {expired[0].subject!r} in {ca_path} {expired[0].describe(now)}"]
            return []
        if current.subject == issuer:
            return []  # self-signed, and not a CA the file holds: nothing to compare
        parents = [c for c in intermediates if c.subject == issuer]
        if not parents:
            return []
        if _signed_by(current, parents[0]) is False:
            return [
                f"{cert_path}: the intermediate {issuer.rfc4514_string()!r} in the file did not sign the certificate"
            ]
        current = parents[0]
    return []


def _signed_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool | None:
    """True when `issuer`'s key verifies the signature; None when the algorithm cannot be
    checked here (RSA-PSS, say), which is never taken for a mismatch."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return False
    except ValueError:
        return False  # the names do not match, or the issuer's key cannot have signed it
    except (UnsupportedAlgorithm, TypeError):
        return None
    return True


def new_key_and_csr(common_name: str) -> tuple[bytes, str]:
    """A new private key (ECDSA P-256, which IoT Core signs, cheap on a Raspberry Pi) as an
    unencrypted PKCS#8 PEM, and a CSR for it naming `common_name`; the key stays in memory."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def certificate_is_for_key(certificate_pem: bytes, key_pem: bytes) -> bool:
    """True when the certificate carries the public half of this private key."""
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return certificate.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def service_owner() -> tuple[int, int] | None:
    """(uid, gid) of the service user when we are root and it exists: the owner a key must
    have for the daemon to read it; None otherwise (files stay ours)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


@dataclass(frozen=True)
class StagedFile:
    """A file written and fsynced beside its destination, not yet in place."""

    temp: Path
    dest: Path

    def commit(self) -> None:
        """Rename it over the destination and make the rename durable."""
        os.replace(self.temp, self.dest)
        _fsync_directory(self.dest.parent)

    def discard(self) -> None:
        """Remove the temporary file (nothing happened to the destination)."""
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()


def _temp_name(dest: Path, pid: int | str) -> Path:
    return dest.parent / f".{dest.name}.new-{pid}"


def discard_stale(dest: Path) -> None:
    """Remove what a killed enrolment left staged beside `dest` (a key among them)."""
    for stale in dest.parent.glob(glob.escape(_temp_name(dest, "").name) + "*"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def stage(dest: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> StagedFile:
    """Write `data` to a new file beside `dest` with exactly `mode` (whatever the umask) and
    `owner`, and fsync it; `commit()` then puts it in place. The file is created with its final
    mode, so a key is never readable by others, not even for a moment."""
    temp = _temp_name(dest, os.getpid())
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()  # left by an enrolment of this pid that was killed: never another's file
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    os.close(fd)
    return StagedFile(temp, dest)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
