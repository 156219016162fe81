"""Certificates and SuperNode keys for a TLS-protected, authenticated Flower federation.

Flower 1.42 secures a deployment with two independent mechanisms:

* **TLS** between every client (SuperNodes, the ``flwr`` CLI, the SuperLink's
  own SuperExec) and the SuperLink. The SuperLink is started with
  ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``;
  clients verify it against the CA certificate (``--root-certificates ca.crt``
  on a SuperNode, ``root-certificates = "/abs/path/ca.crt"`` in the CLI's
  connection in ``$FLWR_HOME/config.toml``). The server certificate must name
  every host name or IP address the clients dial (its subjectAltName).
* **SuperNode authentication**: the SuperLink runs with
  ``--enable-supernode-auth`` and only accepts SuperNodes whose public key an
  operator registered through the Control API
  (``flwr supernode register node.pub <connection>``). Each SuperNode signs
  its requests with its private key (``--auth-supernode-private-key node.key``).
  Keys are ECDSA on a NIST curve in OpenSSH format (what
  ``ssh-keygen -t ecdsa -b 384`` writes).

``make_tls_certificates`` creates a private CA and a server certificate signed
by it; ``make_supernode_keys`` creates one SuperNode key pair. Both are meant
for tests and pilots: in production take the server certificate from your
organisation's CA (or a public one), and generate each SuperNode's key on that
node so the private key never leaves it. Private keys are written with mode
0600 and existing files are never overwritten unless asked.

Command line::

    python -m fedsrd_kernels.flower.security tls certs --host 127.0.0.1 --host link.example.org
    python -m fedsrd_kernels.flower.security node keys alice bob
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CLOCK_SKEW = datetime.timedelta(minutes=5)  # a peer whose clock runs a little behind still accepts a fresh cert


@dataclass(frozen=True)
class TLSFiles:
    """The files ``make_tls_certificates`` wrote; ``ca_keyfile`` is None unless the CA key was kept."""

    ca_certfile: Path
    certfile: Path
    keyfile: Path
    ca_keyfile: Path | None = None

    def superlink_args(self) -> list[str]:
        """The ``flower-superlink`` flags that serve these certificates."""
        return ["--ssl-ca-certfile", str(self.ca_certfile), "--ssl-certfile", str(self.certfile),
                "--ssl-keyfile", str(self.keyfile)]

    def supernode_args(self) -> list[str]:
        """The ``flower-supernode`` flags that make a SuperNode trust this SuperLink."""
        return ["--root-certificates", str(self.ca_certfile)]


@dataclass(frozen=True)
class SuperNodeKeys:
    """One SuperNode's key pair: ``private_key`` stays on the node, ``public_key`` goes to the operator."""

    private_key: Path
    public_key: Path

    def supernode_args(self) -> list[str]:
        """The ``flower-supernode`` flag that makes the SuperNode sign its requests with this key."""
        return ["--auth-supernode-private-key", str(self.private_key)]


def make_tls_certificates(folder: str | os.PathLike, hosts: Iterable[str] = DEFAULT_HOSTS, *, days: int = 365,
                          organisation: str = "fedsrd pilot", keep_ca_key: bool = False,
                          overwrite: bool = False) -> TLSFiles:
    """Create a private CA and a SuperLink server certificate for ``hosts`` in ``folder``.

    Writes ``ca.crt`` (give it to every SuperNode and CLI user), ``server.pem``
    and ``server.key`` (SuperLink only). ``hosts`` are the IP addresses and DNS
    names the clients use to reach the SuperLink; each goes into the server
    certificate's subjectAltName, and a client dialling any other name fails
    the TLS handshake. The CA key is discarded unless ``keep_ca_key``, so nobody
    can mint more certificates that the clients would trust; with it, ``ca.key``
    is written (mode 0600) and must be kept offline.
    """
    names = _parse_hosts(hosts)
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 3650:
        raise ConfigError(f"days must be an integer in [1, 3650], got {days!r}")
    if not isinstance(organisation, str) or not 1 <= len(organisation) <= 60:  # the CA's name adds " CA" (X.509: 64)
        raise ConfigError(f"organisation must be a string of 1-60 characters, got {organisation!r}")
    out = _folder(folder)
    files = TLSFiles(out / CA_CERT, out / SERVER_CERT, out / SERVER_KEY, out / CA_KEY if keep_ca_key else None)
    _refuse_existing([f for f in (files.ca_certfile, files.certfile, files.keyfile, files.ca_keyfile) if f],
                     overwrite)

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - _CLOCK_SKEW, now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    common_name = next((n.value for n in names if isinstance(n, x509.DNSName)), str(names[0].value))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    pkcs8 = serialization.PrivateFormat.PKCS8
    _write(files.keyfile, server_key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()),
           private=True)
    if files.ca_keyfile is not None:
        _write(files.ca_keyfile, ca_key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()),
               private=True)
    _write(files.certfile, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.ca_certfile, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files


def make_supernode_keys(folder: str | os.PathLike, name: str, *, overwrite: bool = False) -> SuperNodeKeys:
    """Create the authentication key pair of SuperNode ``name``: ``<name>.key`` (0600) and ``<name>.pub``.

    The keys are ECDSA P-384 in OpenSSH format, which Flower 1.42 requires of
    ``flower-supernode --auth-supernode-private-key`` and of
    ``flwr supernode register``. Run this on the SuperNode's own machine and
    send only ``<name>.pub`` to the SuperLink operator.
    """
    if not isinstance(name, str) or not _NODE_NAME.match(name):
        raise ConfigError(f"a SuperNode key name is 1-64 letters, digits, '_', '.' or '-' not starting with "
                          f"a separator, got {name!r}")
    out = _folder(folder)
    keys = SuperNodeKeys(out / f"{name}.key", out / f"{name}.pub")
    _refuse_existing([keys.private_key, keys.public_key], overwrite)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(keys.private_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(keys.public_key, public + f" fedsrd-supernode-{name}\n".encode(), private=False)
    return keys


def _parse_hosts(hosts: Iterable[str]) -> list[x509.GeneralName]:
    if isinstance(hosts, str):  # a lone string would otherwise be split into characters
        hosts = [hosts]
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not isinstance(host, str) or not host:
            raise ConfigError(f"a host is a non-empty IP address or DNS name, got {host!r}")
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            labels = host.rstrip(".").split(".")
            if labels[0] == "*":  # a wildcard covers exactly one leftmost label
                labels = labels[1:]
            if len(host) > 253 or not labels or not all(_DNS_LABEL.match(label) for label in labels):
                raise ConfigError(f"{host!r} is neither an IP address nor a valid DNS name") from None
            name = x509.DNSName(host.rstrip(".").lower())
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError("at least one host (IP address or DNS name) is needed for the server certificate")
    return names


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _folder(folder: str | os.PathLike) -> Path:
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a folder")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)  # new folders hold private keys: owner only
    return path


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)} (pass overwrite=True / --overwrite)")


def _write(path: Path, data: bytes, *, private: bool) -> None:
    mode = 0o600 if private else 0o644
    # the mode is set at creation, so a private key is never readable by others, not even briefly
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an overwritten file keeps its old mode otherwise
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
    finally:
        if fd >= 0:
            os.close(fd)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedsrd_kernels.flower.security",
                                     description="Create TLS certificates and SuperNode keys for a test or pilot "
                                                 "Flower federation (production: use your organisation's CA).")
    sub = parser.add_subparsers(dest="command", required=True)
    tls = sub.add_parser("tls", help="a private CA and the SuperLink's server certificate")
    tls.add_argument("folder")
    tls.add_argument("--host", action="append", default=None,
                     help=f"IP address or DNS name clients use for the SuperLink (repeat; default "
                          f"{' and '.join(DEFAULT_HOSTS)})")
    tls.add_argument("--days", type=int, default=365)
    tls.add_argument("--keep-ca-key", action="store_true", help="also write ca.key, to sign more certificates later")
    tls.add_argument("--overwrite", action="store_true")
    node = sub.add_parser("node", help="SuperNode authentication key pairs (<name>.key, <name>.pub)")
    node.add_argument("folder")
    node.add_argument("names", nargs="+")
    node.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "tls":
            files = make_tls_certificates(args.folder, args.host or DEFAULT_HOSTS, days=args.days,
                                          keep_ca_key=args.keep_ca_key, overwrite=args.overwrite)
            print("flower-superlink", " ".join(files.superlink_args()), "--enable-supernode-auth")
            print("flower-supernode", " ".join(files.supernode_args()), "...")
        else:
            for name in args.names:
                keys = make_supernode_keys(args.folder, name, overwrite=args.overwrite)
                print(f"{name}: keep {keys.private_key} on the node; register with: "
                      f"flwr supernode register {keys.public_key} <connection>")
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
