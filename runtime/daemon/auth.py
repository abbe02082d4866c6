"""Who may talk to the robot: ZeroMQ CURVE for network endpoints.

The daemon holds a key pair; the controllers' public keys sit in an allow-list directory. pyzmq's
authenticator (ZAP, in a thread of the daemon) admits only those keys: a client with any other key,
or none, completes no handshake and gets nothing. Keys are ZeroMQ certificate files as written by
`pi0-runtime keygen` (`NAME.key` public, `NAME.key_secret` secret, mode 0600).

Without CURVE the daemon binds only loopback or ipc endpoints: it refuses to start on a network
address with no allow-list, unless the config says `allow_insecure_network = true`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from runtime.errors import ApplianceError


class AuthConfigError(ApplianceError):
    """Keys or endpoint settings that would leave the daemon open, or cannot be read."""


def generate_keys(directory: Path, name: str, group: str | None = None) -> tuple[Path, Path]:
    """-> (public, secret) certificate files; the secret one readable by its owner only, or also by
    `group` (mode 0640: the daemon's key, written by root, read by the service's group)."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise AuthConfigError(f"{path} exists: not overwriting a key")
    old_umask = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old_umask)
    public.chmod(0o644)
    secret.chmod(0o600)
    if group is not None:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            secret.unlink()
            public.unlink()
            raise AuthConfigError(f"no group {group!r} on this machine") from None
        os.chown(secret, -1, gid)
        secret.chmod(0o640)
    return public, secret


def load_keys(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) z85 keys from a certificate file."""
    if not path.is_file():
        raise AuthConfigError(f"key file not found: {path}")
    public_key, secret_key = zmq.auth.load_certificate(str(path))
    if secret and secret_key is None:
        raise AuthConfigError(f"{path} holds no secret key (give the .key_secret file)")
    return public_key, secret_key


def is_network_endpoint(endpoint: str) -> bool:
    """True for tcp:// endpoints reachable from other machines (anything but loopback)."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost",):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name or a host name: resolve it
        try:
            return not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return True


@dataclass(frozen=True)
class CurveConfig:
    public_key: bytes
    secret_key: bytes
    allowed_clients: Path  # a directory of NAME.key public certificates

    @classmethod
    def from_files(cls, server_secret_key: Path, allowed_clients: Path) -> CurveConfig:
        """Read and check the keys at start, so a daemon that cannot use them never comes up."""
        public_key, secret_key = load_keys(server_secret_key, secret=True)
        if not allowed_clients.is_dir():
            raise AuthConfigError(f"client allow-list directory not found: {allowed_clients}")
        if not list(allowed_clients.glob("*.key")):
            raise AuthConfigError(f"{allowed_clients} holds no client public keys (*.key): nobody could connect")
        return cls(public_key, secret_key, allowed_clients)

    def secure(self, context: zmq.Context, server: zmq.Socket) -> ThreadAuthenticator:
        """Start the authenticator and make `server` a CURVE server; call before bind."""
        authenticator = ThreadAuthenticator(context)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=str(self.allowed_clients))
        server.curve_publickey, server.curve_secretkey = self.public_key, self.secret_key
        server.curve_server = True
        return authenticator


def check_exposure(endpoint: str, curve: CurveConfig | None, allow_insecure_network: bool) -> None:
    if curve is None and is_network_endpoint(endpoint) and not allow_insecure_network:
        raise AuthConfigError(
            f"{endpoint} is reachable from the network, and no CURVE keys are configured: set "
            "curve_server_key and curve_allowed_clients (keys from `pi0-runtime keygen`), bind loopback "
            "or ipc, or set allow_insecure_network = true"
        )
