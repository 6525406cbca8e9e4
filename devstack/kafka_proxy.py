"""A test-only Kafka front: TLS and SASL in front of a plaintext broker (the embedded Tansu).

Tansu 0.6 has neither working TLS (``--cert``/``--key`` cannot be given together, and its TLS
acceptor is never used) nor usable SASL (no PLAIN; SCRAM users are never stored), so the
security tests put this proxy in front of it: it terminates TLS (optionally requiring a client
certificate) and/or authenticates SASL PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 logins the way
Apache Kafka does (SaslHandshake, SaslAuthenticate, error 58 on bad credentials, then close),
and afterwards forwards bytes both ways. The broker must advertise the proxy's port.

    TICKMESH_PROXY_USERS=alice:secret python -m devstack.kafka_proxy --listen 9093 \\
        --upstream 127.0.0.1:9092 --cert server.crt --key server.key [--client-ca ca.crt]

Users come from the environment (``name:password`` pairs, comma separated), never argv.
Never shipped in an image; not a security boundary.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import ssl
import struct
import sys
from collections.abc import Sequence

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, SASL_AUTHENTICATION_FAILED = 33, 58
HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
MECHANISMS = ("PLAIN", *HASHES)
ITERATIONS = 4096


class ScramUser:
    """The stored SCRAM credentials of one user for one hash (RFC 5802)."""

    def __init__(self, password: str, hash_name: str) -> None:
        self.hash_name = hash_name
        self.salt = os.urandom(16)
        salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), self.salt, ITERATIONS)
        client_key = hmac.new(salted, b"Client Key", hash_name).digest()
        self.stored_key = hashlib.new(hash_name, client_key).digest()
        self.server_key = hmac.new(salted, b"Server Key", hash_name).digest()


def _frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def _string(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">h", -1)
    data = text.encode()
    return struct.pack(">h", len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    if not 0 < size <= 16 * 1_048_576:
        raise ConnectionError(f"bad frame size {size}")
    return await reader.readexactly(size)


class Login:
    """One connection's SASL exchange; ``step`` answers each SaslAuthenticate token."""

    def __init__(self, proxy: Proxy, mechanism: str) -> None:
        self.proxy = proxy
        self.mechanism = mechanism
        self.done = False
        self._first_bare = self._server_first = self._user = self._nonce = ""

    def step(self, token: bytes) -> tuple[str | None, bytes]:
        """(error message or None, bytes to send back)."""
        if self.mechanism == "PLAIN":
            parts = token.split(b"\0")
            user, password = (parts[1].decode(), parts[2].decode()) if len(parts) == 3 else ("", "")
            if user not in self.proxy.users or self.proxy.users[user] != password:
                return "Authentication failed: Invalid username or password", b""
            self.done = True
            return None, b""
        text = token.decode()
        if not self._first_bare:
            self._first_bare = text.split(",", 2)[2]
            attributes = dict(item.split("=", 1) for item in self._first_bare.split(","))
            self._user = attributes["n"].replace("=2C", ",").replace("=3D", "=")
            self._nonce = attributes["r"] + base64.b64encode(os.urandom(18)).decode()
            stored = self.proxy.scram.get((self.mechanism, self._user))
            salt = stored.salt if stored else os.urandom(16)
            self._server_first = (
                f"r={self._nonce},s={base64.b64encode(salt).decode()},i={ITERATIONS}"
            )
            return None, self._server_first.encode()
        attributes = dict(item.split("=", 1) for item in text.split(","))
        without_proof = text.rsplit(",p=", 1)[0]
        message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        stored = self.proxy.scram.get((self.mechanism, self._user))
        if stored is not None and attributes.get("r") == self._nonce and "p" in attributes:
            signature = hmac.new(stored.stored_key, message, stored.hash_name).digest()
            proof = base64.b64decode(attributes["p"])
            client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=False))
            if hmac.compare_digest(
                hashlib.new(stored.hash_name, client_key).digest(), stored.stored_key
            ):
                self.done = True
                verifier = hmac.new(stored.server_key, message, stored.hash_name).digest()
                return None, b"v=" + base64.b64encode(verifier)
        return (
            "Authentication failed during authentication due to invalid credentials with "
            f"SASL mechanism {self.mechanism}",
            b"",
        )


class Proxy:
    """Accepts clients, runs TLS and the SASL exchange, then pipes to the broker."""

    def __init__(self, upstream: tuple[str, int], users: dict[str, str]) -> None:
        self.upstream = upstream
        self.users = users
        self.scram = {
            (mechanism, user): ScramUser(password, hash_name)
            for mechanism, hash_name in HASHES.items()
            for user, password in users.items()
        }

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """One client connection."""
        upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
        try:
            if self.users and not await self._authenticate(
                client_r, client_w, upstream_r, upstream_w
            ):
                return
            await asyncio.gather(_pipe(client_r, upstream_w), _pipe(upstream_r, client_w))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            client_w.close()
            upstream_w.close()

    async def _authenticate(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        upstream_r: asyncio.StreamReader,
        upstream_w: asyncio.StreamWriter,
    ) -> bool:
        login: Login | None = None
        while login is None or not login.done:
            request = await _read_frame(client_r)
            api_key, version, correlation = struct.unpack(">hhi", request[:8])
            (client_id_length,) = struct.unpack(">h", request[8:10])
            body = request[10 + max(client_id_length, 0) :]
            if api_key == API_VERSIONS:
                upstream_w.write(_frame(request))
                await upstream_w.drain()
                client_w.write(_frame(await _read_frame(upstream_r)))
            elif api_key == SASL_HANDSHAKE:
                (length,) = struct.unpack(">h", body[:2])
                mechanism = body[2 : 2 + length].decode()
                error = 0 if mechanism in MECHANISMS else UNSUPPORTED_SASL_MECHANISM
                listed = b"".join(_string(name) for name in MECHANISMS)
                reply = struct.pack(">ihi", correlation, error, len(MECHANISMS)) + listed
                client_w.write(_frame(reply))
                await client_w.drain()
                if error:
                    return False
                login = Login(self, mechanism)
            elif api_key == SASL_AUTHENTICATE and login is not None and version <= 1:
                (length,) = struct.unpack(">i", body[:4])
                failure, answer = login.step(body[4 : 4 + length])
                reply = struct.pack(
                    ">ih", correlation, SASL_AUTHENTICATION_FAILED if failure else 0
                )
                reply += _string(failure) + struct.pack(">i", len(answer)) + answer
                if version >= 1:
                    reply += struct.pack(">q", 0)  # session lifetime: none
                client_w.write(_frame(reply))
                await client_w.drain()
                if failure:
                    return False
            else:
                return False  # as Kafka does: any other request before the login closes
            await client_w.drain()
        return True


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65_536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


def parse_users(text: str) -> dict[str, str]:
    """``alice:pw,bob:pw2`` -> {"alice": "pw", "bob": "pw2"}."""
    users = {}
    for pair in text.split(","):
        if pair.strip():
            name, _, password = pair.strip().partition(":")
            users[name] = password
    return users


async def serve(args: argparse.Namespace) -> None:
    """Listen until cancelled."""
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
        if args.client_ca:
            context.load_verify_locations(args.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    host, _, port = args.upstream.rpartition(":")
    proxy = Proxy((host, int(port)), parse_users(os.environ.get("TICKMESH_PROXY_USERS", "")))
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", args.listen, ssl=context)
    print(
        f"kafka_proxy: 127.0.0.1:{args.listen} -> {args.upstream} tls={context is not None} "
        f"mtls={bool(args.client_ca)} sasl={sorted(proxy.users) and list(MECHANISMS)}",
        flush=True,
    )
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m devstack.kafka_proxy", description=__doc__)
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--upstream", required=True, help="host:port of the plaintext broker")
    parser.add_argument("--cert", help="server certificate (PEM): serve TLS")
    parser.add_argument("--key", help="server private key (PEM)")
    parser.add_argument("--client-ca", help="require client certificates signed by this CA")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
