"""Self-signed serving certificates for the admission webhook.

``make_self_signed(dns_names)`` returns ``(cert_pem, key_pem)`` for a CA-less
self-signed certificate (the certificate is its own CA: the API server trusts
it through the MutatingWebhookConfiguration's ``caBundle``).

``run_webhook_cert(argv)`` (wired by the lead as ``pdsidecar webhook-cert``)
writes ``tls.crt`` / ``tls.key`` into a directory and prints the base64
``caBundle`` to put into the MutatingWebhookConfiguration. Needs the
``cryptography`` package (a dev/ops dependency, not in the sidecar image).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import sys
from typing import Iterable

__all__ = ["make_self_signed", "service_dns_names", "run_webhook_cert"]


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


def run_webhook_cert(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdsidecar webhook-cert",
                                description="Write a self-signed serving certificate for the webhook and print its caBundle.")
    p.add_argument("--service", default="pdsidecar-webhook")
    p.add_argument("--namespace", default="pdsidecar")
    p.add_argument("--out-dir", default=".", help="where to write tls.crt and tls.key")
    p.add_argument("--days", type=int, default=365)
    try:
        ns = p.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:
        return int(e.code or 0)
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
