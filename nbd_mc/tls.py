"""The x509 directory shared by nbdkit, QEMU and the nbd-mc control channel.

Standard library only: the control server runs inside nbdkit's embedded Python.
"""

import errno
import os
import ssl


class TlsFiles:
    """An x509 directory laid out as nbdkit and QEMU expect it.

    One directory serves all three programs, so an operator makes certificates
    once (tools/make-certs.sh) and points nbdkit, QEMU and nbd-mc at it.
    """

    CA = "ca-cert.pem"
    SERVER = ("server-cert.pem", "server-key.pem")
    CLIENT = ("client-cert.pem", "client-key.pem")

    def __init__(self, directory: str):
        # Absolute, because nbdkit chdirs to / when it daemonises.
        self.directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(errno.ENOENT,
                                    f"TLS certificate directory {self.directory} does not exist")

    def __repr__(self):
        return f"TlsFiles({self.directory!r})"

    def server_context(self) -> ssl.SSLContext:
        """A server context that admits only clients with a cert from our CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._load(ctx, self.SERVER)
        return ctx

    def client_context(self, check_hostname: bool = True) -> ssl.SSLContext:
        """A client context that proves itself and trusts only our CA.

        check_hostname=False is for unix sockets, which have no host name to
        check; the server's certificate must still come from the CA.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._load(ctx, self.CLIENT)
        return ctx

    def _load(self, ctx: ssl.SSLContext, pair: tuple) -> None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ca = self._file(self.CA)
        cert, key = self._file(pair[0]), self._file(pair[1])
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"cannot load CA certificate {ca}: {e}") from e
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"cannot load certificate {cert} with key {key}: {e}") from e

    def _file(self, name: str) -> str:
        path = os.path.join(self.directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT,
                                    f"TLS certificate directory {self.directory} has no {name} "
                                    "(expected ca-cert.pem, server-cert.pem, server-key.pem, "
                                    "client-cert.pem, client-key.pem; see tools/make-certs.sh)")
        return path
