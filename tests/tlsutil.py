"""Certificates made at test time (trustme): a CA, a server certificate for 127.0.0.1/localhost."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class Certs:
    ca: trustme.CA
    certfile: Path  # the server's key and chain, PEM (what --certfile takes)
    ca_file: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        context.set_alpn_protocols(["http/1.1"])
        return context


def make_certs(directory: Path) -> Certs:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile = directory / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, certfile, ca_file)
