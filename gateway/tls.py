"""HTTPS on the gateway's own port (``--tls-cert``, ``--tls-key``), and certificates renewed
without a restart.

Without it, the bearer key of ``--api-key`` and every input cross the network in clear unless
a proxy terminates TLS in front. With it, the gateway serves HTTPS only (TLS 1.2 or later,
HTTP/1.1 by ALPN) on ``--port``. The files are read at start (an unreadable or mismatched
pair stops the gateway with one line saying which), then watched: when either changes
(cert-manager, certbot and Kubernetes Secrets all replace them in place), both are read again
into the same context, so new connections get the new certificate and open ones keep theirs.
A pair that fails to load then is logged, and the old one kept.
"""

from __future__ import annotations

import logging
import ssl
import time

from gateway.cert_expiry import not_after
from gateway.watched_files import CHECK_S, WatchedFiles, every, unreadable

log = logging.getLogger("batchwire.gateway.tls")

#: A certificate expiring within this is warned about (cert-manager renews at 30 days left,
#: certbot at 30: at 14 a renewal has failed for two weeks).
EXPIRY_WARNING_S = 14 * 86400.0
#: At most one expiry warning in this long.
LOG_EXPIRY_EVERY_S = 86400.0


def _no_pass_phrase() -> bytes:
    return b""


def _encrypted(key_file: str) -> bool:
    try:
        with open(key_file, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b"ENCRYPTED" in head


class TlsConfigError(Exception):
    """The certificate or key cannot be used; the message says which and why."""


class ServerTls:
    """The SSL context the gateway listens with, and the files it was loaded from."""

    def __init__(self, cert_file: str, key_file: str):
        self.cert_file = cert_file
        self.key_file = key_file
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        self.context = context
        self.reloads = 0
        self.files = WatchedFiles(cert_file, key_file)
        #: When the certificate served now expires (Unix seconds; None: unreadable).
        self.expires_at: float | None = None
        self._expiry_logged_at = float("-inf")
        self._load()
        self.check_expiry()

    def _load(self) -> None:
        for what, path in (("certificate", self.cert_file), ("key", self.key_file)):
            why = unreadable(path)
            if why is not None:
                raise TlsConfigError(f"cannot read the TLS {what} file {path!r} (--tls-"
                                     f"{'cert' if what == 'certificate' else 'key'}): {why}")
        try:
            # Into a scratch context first: a pair that fails half-way into the live one
            # (the certificate taken, then the key refused) would leave it serving neither.
            # No pass phrase: OpenSSL would ask for one on the terminal (and wait there).
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                self.cert_file, self.key_file, password=_no_pass_phrase)
            self.context.load_cert_chain(self.cert_file, self.key_file, password=_no_pass_phrase)
            self.expires_at = not_after(self.cert_file)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None)
            why = ("the key does not belong to the certificate" if reason == "KEY_VALUES_MISMATCH"
                   else "the key is encrypted with a pass phrase" if _encrypted(self.key_file)
                   else str(reason or exc.strerror or exc))
            raise TlsConfigError(f"cannot use {self.cert_file!r} with {self.key_file!r}: {why} "
                                 "(--tls-cert takes a PEM certificate chain, --tls-key its "
                                 "unencrypted PEM private key)") from None

    def reload_if_changed(self) -> bool:
        """Read the files again if either changed since last read; whether a new pair is now
        served. A pair that does not load is logged, and the one before kept."""
        if not self.files.changed():
            self.check_expiry()
            return False
        try:
            self._load()
        except TlsConfigError as exc:
            # Often the moment between one file's replacement and the other's: the next
            # check, after both, loads them. Read again then even if neither changes: a pair
            # replaced between this load's two reads may have left the live context with one
            # file's new half, which only a load of the settled pair mends.
            log.error("the TLS files changed but do not load (%s); still serving the "
                      "certificate loaded before", exc)
            self.files.retry()
            return False
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert_file)
        self._expiry_logged_at = float("-inf")  # a renewal says at once if it is short-lived
        self.check_expiry()
        return True

    def check_expiry(self, now: float | None = None) -> None:
        """Warn, once a day, while the certificate served expires within
        :data:`EXPIRY_WARNING_S` (or has expired), so that a renewal that failed shows in the
        log before clients start refusing the certificate."""
        if self.expires_at is None:
            return
        now = time.time() if now is None else now
        left = self.expires_at - now
        if left > EXPIRY_WARNING_S or now - self._expiry_logged_at < LOG_EXPIRY_EVERY_S:
            return
        self._expiry_logged_at = now
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.expires_at))
        if left <= 0:
            log.error("the TLS certificate %s expired on %s: clients refuse it; renew it (it "
                      "is read again when the file changes)", self.cert_file, when)
        else:
            log.warning("the TLS certificate %s expires on %s, in %.1f days: renew it (it is "
                        "read again when the file changes)", self.cert_file, when,
                        left / 86400.0)

    async def watch(self) -> None:
        """Check the files every :data:`~gateway.watched_files.CHECK_S` until cancelled."""
        await every(CHECK_S, self.reload_if_changed)
