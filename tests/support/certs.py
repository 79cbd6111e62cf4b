"""A throwaway PKI for integration tests: one CA, a loopback server cert, client certs.

Everything is made with the `openssl` CLI (no Python crypto dependency). RSA 2048 keys,
SHA-256 signatures and two-day validity, like the device certificates IoT Core issues.

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
from pathlib import Path

VALID_DAYS = 2
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

    def _issue(self, name: str, *, subject: str, extensions: str) -> KeyPair:
        _check_name(name)
        pair = KeyPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        if pair.cert.exists() and pair.key.exists():
            return pair
        csr = self.directory / f"{name}.csr"
        _new_key(pair.key)
        _openssl("req", "-config", _cnf(self.directory), "-new", "-key", pair.key,
                 "-subj", subject, "-out", csr)
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                 # A random serial, not -CAcreateserial: no shared .srl file to race on.
                 "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(VALID_DAYS),
                 "-sha256", "-extfile", _cnf(self.directory), "-extensions", extensions,
                 "-out", pair.cert)
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
        _openssl("req", "-config", cnf, "-new", "-x509", "-key", ca.key, "-subj", f"/CN={name}",
                 "-days", str(VALID_DAYS), "-sha256", "-extensions", "ca", "-out", ca.cert)
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
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{KEY_BITS}",
             "-out", path)
    path.chmod(0o600)


def _openssl(*args: str | Path) -> None:
    argv = ["openssl", *map(str, args)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CertError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
