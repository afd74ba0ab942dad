"""When a PEM certificate expires: its ``notAfter``, read from the DER itself.

The standard library loads a certificate into an SSL context but does not say when it
expires, and the gateway does not depend on ``cryptography``. A certificate whose renewal
failed (cert-manager misconfigured, certbot's timer gone) serves until the moment clients
start refusing it; so the gateway reads the date, publishes it as a metric for alerts, and
warns in its log as the date nears. The walk below reads only what RFC 5280 fixes in place:
Certificate → tbsCertificate → [version], serialNumber, signature, issuer, validity.
"""

from __future__ import annotations

import calendar
import re
import ssl
import time

_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----\s+.*?-----END CERTIFICATE-----", re.DOTALL)
_UTC_TIME, _GENERALIZED_TIME, _VERSION = 0x17, 0x18, 0xA0


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, where its value starts, where it ends) of the DER element at ``pos``."""
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4:
            raise ValueError("not a DER length")
        length = int.from_bytes(der[pos:pos + count], "big")
        pos += count
    if pos + length > len(der):
        raise ValueError("a DER element runs past the end")
    return tag, pos, pos + length


def not_after_der(der: bytes) -> float:
    """The certificate's ``notAfter``, in Unix seconds."""
    _, certificate, _ = _tlv(der, 0)
    _, pos, _ = _tlv(der, certificate)  # into tbsCertificate
    tag, _, end = _tlv(der, pos)
    if tag == _VERSION:
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, pos = _tlv(der, pos)
    _, validity, _ = _tlv(der, pos)
    _, _, not_after = _tlv(der, validity)  # past notBefore
    tag, start, end = _tlv(der, not_after)
    text = der[start:end].decode("ascii")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; RFC 5280: YY < 50 is 20YY, else 19YY
        year = int(text[:2])
        text = f"{2000 + year if year < 50 else 1900 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME:
        raise ValueError(f"notAfter is not a time (tag {tag:#x})")
    return float(calendar.timegm(time.strptime(text, "%Y%m%d%H%M%SZ")))


def not_after(pem_path: str) -> float | None:
    """The ``notAfter`` of the first certificate in a PEM file (the server's own, in a
    chain), in Unix seconds; None if the file holds none that can be read."""
    try:
        with open(pem_path, encoding="ascii", errors="replace") as f:
            found = _PEM_CERTIFICATE.search(f.read())
        return not_after_der(ssl.PEM_cert_to_DER_cert(found.group(0))) if found else None
    except (OSError, ValueError, IndexError):
        return None
