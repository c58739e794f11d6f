"""Self-signed serving certificates for the admission webhook.

``make_self_signed(dns_names)`` returns ``(cert_pem, key_pem)`` for a CA-less
self-signed certificate (the certificate is its own CA: the API server trusts
it through the MutatingWebhookConfiguration's ``caBundle``).

``run_webhook_cert(argv)`` (wired by the lead as ``pdsidecar webhook-cert``)
writes ``tls.crt`` / ``tls.key`` into a directory and prints the base64
``caBundle`` to put into the MutatingWebhookConfiguration. Needs the
``cryptography`` package (a dev/ops dependency, not in the sidecar image).

``make_control_certs()`` / ``run_control_certs(argv)`` (``pdsidecar control-certs``):
a CA and one engine certificate signed by it (``ca.crt``, ``tls.crt``, ``tls.key``)
for mutual TLS on the connector's gRPC control plane (``control_tls_dir``). Every
engine presents the same certificate; its name is ``pd-engine`` (peers are dialled by
IP, so clients check that fixed name, not the address).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import sys
from typing import Iterable

__all__ = ["make_self_signed", "service_dns_names", "run_webhook_cert", "make_control_certs",
           "run_control_certs", "CONTROL_CERT_NAME"]

CONTROL_CERT_NAME = "pd-engine"


def service_dns_names(service: str, namespace: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def make_self_signed(dns_names: list[str], *, ip_addresses: Iterable[str] = (), days: int = 365) -> tuple[bytes, bytes]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0] if dns_names else "pdsidecar-webhook")])
    now = dt.datetime.now(dt.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert_pem, key_pem


def make_control_certs(*, days: int = 365, name: str = CONTROL_CERT_NAME) -> tuple[bytes, bytes, bytes]:
    """``(ca_pem, cert_pem, key_pem)``: a fresh CA (its key is discarded) and an engine
    certificate it signed, valid as both TLS server and client, SAN ``name``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pdsidecar control-plane CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), cert.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def write_control_certs(out_dir: str, *, days: int = 365) -> None:
    """``ca.crt``, ``tls.crt`` and ``tls.key`` (0600) into ``out_dir``."""
    ca, cert, key = make_control_certs(days=days)
    os.makedirs(out_dir, exist_ok=True)
    for fname, data in (("ca.crt", ca), ("tls.crt", cert)):
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(data)
    fd = os.open(os.path.join(out_dir, "tls.key"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)


def _parse(p: argparse.ArgumentParser, argv: Iterable[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code argparse chose (``--help``, a usage error)."""
    try:
        return p.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:
        return int(e.code or 0)


def run_control_certs(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdsidecar control-certs",
                                description="Write a CA and an engine certificate (ca.crt, tls.crt, tls.key) for "
                                            "mutual TLS on the connector's control plane.")
    p.add_argument("--out-dir", default=".", help="where to write ca.crt, tls.crt and tls.key")
    p.add_argument("--days", type=int, default=365)
    ns = _parse(p, argv)
    if isinstance(ns, int):
        return ns
    try:
        write_control_certs(ns.out_dir, days=ns.days)
    except ImportError:
        sys.stderr.write("pdsidecar control-certs: error: needs the 'cryptography' package\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"pdsidecar control-certs: error: {e}\n")
        return 1
    sys.stdout.write(f"kubectl -n pdsidecar create secret generic pdsidecar-control-tls "
                     f"--from-file={ns.out_dir}/ca.crt --from-file={ns.out_dir}/tls.crt "
                     f"--from-file={ns.out_dir}/tls.key\n")
    return 0


def run_webhook_cert(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdsidecar webhook-cert",
                                description="Write a self-signed serving certificate for the webhook and print its caBundle.")
    p.add_argument("--service", default="pdsidecar-webhook")
    p.add_argument("--namespace", default="pdsidecar")
    p.add_argument("--out-dir", default=".", help="where to write tls.crt and tls.key")
    p.add_argument("--days", type=int, default=365)
    ns = _parse(p, argv)
    if isinstance(ns, int):
        return ns
    try:
        cert, key = make_self_signed(service_dns_names(ns.service, ns.namespace), days=ns.days)
        os.makedirs(ns.out_dir, exist_ok=True)
        with open(os.path.join(ns.out_dir, "tls.crt"), "wb") as f:
            f.write(cert)
        fd = os.open(os.path.join(ns.out_dir, "tls.key"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
    except ImportError:
        sys.stderr.write("pdsidecar webhook-cert: error: needs the 'cryptography' package\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"pdsidecar webhook-cert: error: {e}\n")
        return 1
    sys.stdout.write(base64.b64encode(cert).decode() + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run_webhook_cert())
