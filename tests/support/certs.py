"""A throwaway PKI for integration tests: one CA, a loopback server cert, client certs.

The CA and the certificates of brokers and clients are made with the `openssl` CLI: RSA 2048
keys, SHA-256 signatures, 400 days of validity (`check` warns about a certificate with fewer than
30 days left, which every test would then see). Certificates with chosen dates (expired, about
to expire: openssl 3.0's `x509 -req` cannot date one in the past) and certificates for a CSR (the
fleet-provisioning stand-in) are signed with the `cryptography` package, with the same CA key.

File modes: private keys are 0600 (the gateway refuses a key readable by group or others),
certificates 0644. Mosquitto reads the CA, server cert and server key; when the tests run as
root it would drop to user `mosquitto` *before* opening them, so `brokers.Mosquitto` tells it
to stay root instead of making these files (and every parent directory) readable to it.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 400
KEY_BITS = 2048

# A config of our own so that the host's openssl.cnf (or an OPENSSL_CONF pointing
# elsewhere) cannot change what the certificates contain.
_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]

[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {server_san}

[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

_SERVER_SAN = "IP:127.0.0.1, DNS:localhost"
# A client id becomes a file name and a subject CN: keep it to what IoT Core allows and
# nothing a shell or openssl's -subj parser would treat specially.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


class CertError(RuntimeError):
    """openssl failed while making a test certificate."""


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertAuthority:
    """A CA that issues server and client certificates into its directory."""

    name: str
    directory: Path
    cert: Path
    key: Path

    def issue_server(self, name: str = "server") -> KeyPair:
        """Issue a server cert for 127.0.0.1 and localhost (SAN IP and DNS), CN=localhost."""
        return self._issue(name, subject="/CN=localhost", extensions="server")

    def issue_client(self, client_id: str) -> KeyPair:
        """Issue a client cert with CN=client_id; reuses an earlier one of the same name."""
        return self._issue(f"client-{client_id}", subject=f"/CN={client_id}", extensions="client")

    def issue_dated(self, client_id: str, not_before: datetime, not_after: datetime) -> KeyPair:
        """A client cert (CN=client_id, key ECDSA P-256, mode 0600) valid only between these times."""
        _check_name(client_id)
        pair = KeyPair(self.directory / f"dated-{client_id}.crt", self.directory / f"dated-{client_id}.key")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)])
        pair.cert.write_bytes(self._sign(key.public_key(), subject, not_before, not_after).public_bytes(_PEM))
        pair.cert.chmod(0o644)
        pair.key.unlink(missing_ok=True)
        os.close(os.open(pair.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        pair.key.write_bytes(key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return pair

    def sign_csr(self, csr_pem: str, days: int = VALID_DAYS) -> str:
        """A client certificate for the key of a PEM CSR, as IoT Core's CreateCertificateFromCsr
        returns one (subject CN "AWS IoT Certificate", whatever the CSR asked for)."""
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        if not csr.is_signature_valid:
            raise CertError("the CSR's signature does not verify")
        now = datetime.now(UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AWS IoT Certificate")])
        issued = self._sign(csr.public_key(), subject, now - timedelta(minutes=5), now + timedelta(days=days))
        return issued.public_bytes(_PEM).decode()

    def _sign(
        self, public_key: x509.CertificatePublicKeyTypes, subject: x509.Name, not_before: datetime, not_after: datetime
    ) -> x509.Certificate:
        ca_cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        ca_key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        assert isinstance(ca_key, rsa.RSAPrivateKey)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        return builder.sign(ca_key, hashes.SHA256())

    def _issue(self, name: str, *, subject: str, extensions: str) -> KeyPair:
        _check_name(name)
        pair = KeyPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        if pair.cert.exists() and pair.key.exists():
            return pair
        csr = self.directory / f"{name}.csr"
        _new_key(pair.key)
        _openssl("req", "-config", _cnf(self.directory), "-new", "-key", pair.key, "-subj", subject, "-out", csr)
        _openssl(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            self.cert,
            "-CAkey",
            self.key,
            # A random serial, not -CAcreateserial: no shared .srl file to race on.
            "-set_serial",
            f"0x{secrets.token_hex(16)}",
            "-days",
            str(VALID_DAYS),
            "-sha256",
            "-extfile",
            _cnf(self.directory),
            "-extensions",
            extensions,
            "-out",
            pair.cert,
        )
        csr.unlink()
        pair.cert.chmod(0o644)
        return pair


@dataclass(frozen=True)
class TestCerts:
    """The test PKI: the CA, Mosquitto's server pair, and client certs minted on demand."""

    __test__ = False  # not a pytest test class despite the name

    ca: CertAuthority
    server: KeyPair

    @property
    def ca_cert(self) -> Path:
        """The CA certificate every party trusts."""
        return self.ca.cert

    def client(self, client_id: str) -> KeyPair:
        """A client cert (CN=client_id) signed by the test CA; key mode 0600."""
        return self.ca.issue_client(client_id)


_PEM = serialization.Encoding.PEM


def make_ca(directory: Path, name: str = "test-ca") -> CertAuthority:
    """Create a self-signed CA in directory (created if missing)."""
    _check_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    cnf = _cnf(directory)
    if not cnf.exists():
        cnf.write_text(_OPENSSL_CNF.format(server_san=_SERVER_SAN))
    ca = CertAuthority(name, directory, directory / f"{name}.crt", directory / f"{name}.key")
    if not (ca.cert.exists() and ca.key.exists()):
        _new_key(ca.key)
        _openssl(
            "req",
            "-config",
            cnf,
            "-new",
            "-x509",
            "-key",
            ca.key,
            "-subj",
            f"/CN={name}",
            "-days",
            str(VALID_DAYS),
            "-sha256",
            "-extensions",
            "ca",
            "-out",
            ca.cert,
        )
        ca.cert.chmod(0o644)
    return ca


def make_test_certs(directory: Path) -> TestCerts:
    """Create the test CA and the loopback server pair in directory."""
    ca = make_ca(directory)
    return TestCerts(ca=ca, server=ca.issue_server())


def _cnf(directory: Path) -> Path:
    return directory / "openssl.cnf"


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not usable as a certificate file name or CN: {name!r}")


def _new_key(path: Path) -> None:
    # Create the file 0600 before openssl writes to it, so the key is never readable by others,
    # not even for a moment under a permissive umask.
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{KEY_BITS}", "-out", path)
    path.chmod(0o600)


def _openssl(*args: str | Path) -> None:
    argv = ["openssl", *map(str, args)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CertError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
