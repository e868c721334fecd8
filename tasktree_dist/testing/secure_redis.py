"""A private redis-server that speaks TLS only (no plain port) and knows only ACL users, as managed Redis services
do: certificates made with `openssl` in a temporary directory (a CA, the server's, a client's), users from an ACL
file. For the tests and for trying the setup in docs/security.md by hand. Stopped by its own PID."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .redis_server import free_port, stop_process, wait_for_port, wait_until_serving

#: The administrator the fixture itself connects as (to wait until loaded and to flush between tests).
ADMIN_USER = "tasktree-admin"


def tls_available() -> str | None:
    """Why this machine cannot run a TLS redis-server (None when it can)."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (make setup installs it)"
    if shutil.which("openssl") is None:
        return "openssl is not installed (needed to make test certificates)"
    probe = subprocess.run(["redis-server", "--port", "0", "--tls-port", str(free_port())], capture_output=True,
                           text=True, timeout=10)
    if "tls-cert-file" not in probe.stdout + probe.stderr:  # a TLS build asks for its certificate
        return "this redis-server was built without TLS"
    return None


@dataclass
class TLSFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path) -> TLSFiles:
    """A CA and, signed by it, a server certificate for 127.0.0.1/localhost and a client certificate (P-256 keys:
    made in milliseconds)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    # the extensions Python 3.13's default TLS context requires (VERIFY_X509_STRICT): a CA marked critical, key
    # identifiers on both ends, key usages; without them 3.13 refuses the chain that 3.11 accepts
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=tasktree test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash")
    leaf = "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    (directory / "server.ext").write_text(leaf + "keyUsage=critical,digitalSignature,keyAgreement\n"
                                          "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (directory / "client.ext").write_text(leaf + "keyUsage=critical,digitalSignature,keyAgreement\n"
                                          "extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=tasktree {name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return TLSFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                    directory / "client.crt", directory / "client.key")


@dataclass
class SecureRedisServer:
    """`acl` holds the ACL file's user lines (passwords included); an administrator is added for the fixture."""

    acl: str = field(repr=False)
    admin_password: str = field(default_factory=lambda: os.urandom(16).hex(), repr=False)
    tls_port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tasktree-tls-redis-")))
    process: subprocess.Popen[bytes] | None = None
    files: TLSFiles | None = None

    def url(self, user: str, password: str, db: int = 0) -> str:
        return f"rediss://{quote(user)}:{quote(password)}@{self.host}:{self.tls_port}/{db}"

    def ssl_env(self) -> dict[str, str]:
        """TASKTREE_SSL_* for a process that connects to this server (the CA, the client certificate and key)."""
        assert self.files is not None
        return {"TASKTREE_SSL_CA_CERTS": str(self.files.ca), "TASKTREE_SSL_CERTFILE": str(self.files.client_cert),
                "TASKTREE_SSL_KEYFILE": str(self.files.client_key)}

    def admin(self, db: int = 0):
        import redis

        assert self.files is not None
        return redis.Redis(host=self.host, port=self.tls_port, db=db, username=ADMIN_USER,
                           password=self.admin_password, ssl=True, ssl_ca_certs=str(self.files.ca),
                           ssl_certfile=str(self.files.client_cert), ssl_keyfile=str(self.files.client_key),
                           ssl_cert_reqs=ssl.CERT_REQUIRED, socket_timeout=5)

    def start(self) -> SecureRedisServer:
        self.files = make_certificates(self.directory)
        acl_file = self.directory / "users.acl"
        acl_file.write_text("user default off\n"
                            f"user {ADMIN_USER} on >{self.admin_password} ~* &* +@all\n" + self.acl.strip() + "\n")
        args = [
            "redis-server", "--port", "0", "--tls-port", str(self.tls_port), "--bind", self.host,
            "--tls-cert-file", str(self.files.server_cert), "--tls-key-file", str(self.files.server_key),
            "--tls-ca-cert-file", str(self.files.ca), "--tls-auth-clients", "yes",
            "--aclfile", str(acl_file), "--dir", str(self.directory), "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--logfile", str(self.directory / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.host, self.tls_port, process=self.process)
            self._wait_ready()
        except Exception as exc:  # noqa: BLE001 - any failure to start: stopped, reported with why and the log
            log = self.directory / "redis.log"
            self.stop()
            raise RuntimeError(f"TLS redis-server did not start: {type(exc).__name__}: {exc}; its log: "
                               f"{log.read_text() if log.exists() else '(none)'}") from None
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        import redis

        retry_on = (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError)
        wait_until_serving(self.admin(), timeout, retry_on)

    def acl_log(self) -> list[dict[str, object]]:
        """What the server refused (ACL LOG), newest first: the way to see a rule that is too tight."""
        client = self.admin()
        try:
            return client.acl_log()
        finally:
            client.close()

    def stop(self) -> None:
        stop_process(self.process, timeout=5)
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SecureRedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
