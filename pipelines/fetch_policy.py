"""What the downloader may fetch: no internal addresses (SSRF), no opted-out images, bounded sizes.

A URL list is untrusted input. Without a policy, a row such as `http://169.254.169.254/latest/meta-data/`
makes the ingest workers read the cloud metadata service, and `http://10.0.0.5:8080/admin` probes the
cluster's private network. The policy is enforced where the connection is made, not on the URL text:

- `_GuardedConnection` resolves the host itself, refuses if ANY resolved address is in a refused range,
  and connects the socket to the address it checked. A name that resolves to a public address when
  checked and to 127.0.0.1 when connected (DNS rebinding) cannot slip through: there is one resolution.
- every redirect target is checked in the redirect handler (a clear "redirect refused" reason) and again
  when its connection is made;
- the opener has only http/https handlers and no proxy handler: `file://`, `ftp://` and `data:` URLs are
  refused, and environment proxies are not used (a proxy would resolve the host where we cannot check).

`download_image` has the signature of img2dataset 1.47's `img2dataset.downloader.download_image`, so the
ingest step can run img2dataset's `Downloader` with this fetch in place of its own.
"""
from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

POLICY_ERROR_PREFIX = "refused by fetch policy"
_ALLOWED_SCHEMES = ("http", "https")
_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


@dataclass(kw_only=True, frozen=True)
class FetchPolicyConfig:
    allow_loopback: bool = False
    """Allow 127.0.0.0/8 and ::1. Only for serving a local corpus (the demo and tests); never on a cluster."""
    allow_private: bool = False
    """Allow private and other non-global ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, ...)."""
    blocked_networks: tuple[str, ...] = ()
    """Extra CIDRs always refused, even when loopback/private are allowed (e.g. your cluster's service range)."""
    honour_opt_out: bool = True
    """Refuse images served with an `X-Robots-Tag` carrying one of `opt_out_directives`."""
    opt_out_directives: tuple[str, ...] = ("noai", "noimageai")
    """X-Robots-Tag directives that mean "do not use for AI training"."""
    user_agent_token: str | None = None
    """Token added to the User-Agent; `X-Robots-Tag: <token>: noai` then applies to this crawler too."""
    max_image_bytes: int = 20 * 1024 * 1024
    """Refuse a response body larger than this (checked on Content-Length and while reading)."""
    max_image_pixels: int = 50_000_000
    """Refuse an image whose header declares more pixels (read before decoding: no decompression bombs)."""
    timeout_s: float = 10.0
    """Socket timeout for connect and each read, and the limit on reading one whole body."""

    def __post_init__(self) -> None:
        for net in self.blocked_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as err:
                raise ValueError(f"blocked_networks entry {net!r} is not a CIDR such as '10.1.0.0/16': {err}") from None
        if self.honour_opt_out and not self.opt_out_directives:
            raise ValueError("honour_opt_out=True needs opt_out_directives, e.g. ('noai', 'noimageai')")
        for name in ("max_image_bytes", "max_image_pixels", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class PolicyRefusal(Exception):
    """The policy refused a fetch. `kind` is a short stable reason, `detail` names the URL/address."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail

    def __str__(self) -> str:
        return f"{POLICY_ERROR_PREFIX} ({self.kind}): {self.detail}"


def refusal_kind(error: str | None) -> str | None:
    """The refusal kind of a recorded error message, or None when it is not a policy refusal."""
    if not error or not error.startswith(POLICY_ERROR_PREFIX + " ("):
        return None
    return error[len(POLICY_ERROR_PREFIX) + 2 :].split(")", 1)[0]


# -- addresses ------------------------------------------------------------------------------------
def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, policy: FetchPolicyConfig) -> str | None:
    """Why this address is refused, or None when it may be contacted."""
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
        ip = ip.ipv4_mapped
    for net in policy.blocked_networks:
        if ip in ipaddress.ip_network(net, strict=False):
            return f"in blocked network {net}"
    if ip.is_loopback:
        return None if policy.allow_loopback else "loopback"
    if ip.is_link_local:  # 169.254.169.254: the cloud metadata service; never allowed
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:  # 0.0.0.0 reaches this machine
        return "unspecified"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or not ip.is_global:
        return None if policy.allow_private else "private"
    return None


def _resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)


def _first_refusal(host: str, infos: Iterable[tuple[Any, ...]], policy: FetchPolicyConfig) -> str | None:
    for *_, sockaddr in infos:
        reason = address_refusal(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]), policy)
        if reason is not None:
            return f"host {host!r} resolves to {sockaddr[0]} ({reason})"
    return None


def _guarded_connector(policy: FetchPolicyConfig):
    """A replacement for `socket.create_connection` that resolves once, checks, then connects."""

    def create_connection(address: tuple[str, int], timeout: Any = None, source_address: Any = None, *_: Any):
        host, port = address
        infos = _resolve(host, port)
        refusal = _first_refusal(host, infos, policy)
        if refusal is not None:  # refused before any socket exists: the target sees nothing
            raise PolicyRefusal("blocked_address", refusal)
        last_error: OSError | None = None
        for family, type_, proto, _, sockaddr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                if isinstance(timeout, (int, float)):
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)  # the address just checked, not a new lookup
                return sock
            except OSError as err:
                sock.close()
                last_error = err
        raise last_error or OSError(f"no address to connect to for {host!r}")

    return create_connection


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, policy: FetchPolicyConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_connector(policy)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, policy: FetchPolicyConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_connector(policy)  # TLS still verifies the host name


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: FetchPolicyConfig) -> None:
        super().__init__()
        self._policy = policy

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_GuardedHTTPConnection, policy=self._policy), req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: FetchPolicyConfig) -> None:
        super().__init__()
        self._policy = policy

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_GuardedHTTPSConnection, policy=self._policy), req, context=self._context)


class _PolicyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Checks each redirect target before following it (the connection guard checks it again)."""

    def __init__(self, policy: FetchPolicyConfig) -> None:
        super().__init__()
        self._policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        parts = urlsplit(newurl)
        refusal = None
        if parts.scheme not in _ALLOWED_SCHEMES:
            refusal = f"scheme {parts.scheme!r} is not http/https"
        elif parts.hostname:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                refusal = _first_refusal(parts.hostname, _resolve(parts.hostname, port), self._policy)
            except OSError:
                refusal = None  # unresolvable: following it fails with the DNS error, which is recorded
        if refusal is not None:
            fp.close()
            raise PolicyRefusal("redirect", f"{req.full_url} redirects to {newurl}: {refusal}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def build_opener(policy: FetchPolicyConfig) -> urllib.request.OpenerDirector:
    """An opener with only guarded http/https, policy-checked redirects and urllib's error handling."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _GuardedHTTPHandler(policy),
        _GuardedHTTPSHandler(policy),
        _PolicyRedirectHandler(policy),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


# -- one fetch ------------------------------------------------------------------------------------
def img2dataset_downloader() -> Any:
    """`img2dataset.downloader`, imported without albumentations' update check (a network call at import)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset.downloader

    return img2dataset.downloader


def _user_agent(token: str | None) -> str:
    # The same string img2dataset sends, so sites that recognise it treat this crawler the same way.
    return _USER_AGENT + (f" (compatible; {token}; +https://github.com/rom1504/img2dataset)" if token else "")


def _read_capped(response: Any, max_bytes: int, deadline: float, url: str) -> bytes:
    chunks, total = [], 0
    while chunk := response.read(min(1 << 16, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise PolicyRefusal("too_many_bytes", f"{url} sends more than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise TimeoutError(f"body of {url} not received within the time limit")
    return b"".join(chunks)


def _check_pixels(data: bytes, policy: FetchPolicyConfig, url: str) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # parses the header only; no pixel is decoded
            width, height = image.size
    except Image.DecompressionBombError as err:
        raise PolicyRefusal("too_many_pixels", f"{url}: {err}") from None
    except Exception:  # noqa: BLE001 - not an image PIL reads: the decoder records the failure next
        return
    if width * height > policy.max_image_pixels:
        raise PolicyRefusal("too_many_pixels", f"{url} is {width}x{height}, over {policy.max_image_pixels} pixels")


def fetch(
    url: str,
    policy: FetchPolicyConfig,
    *,
    timeout: float | None = None,
    user_agent_token: str | None = None,
    opt_out_directives: Iterable[str] | None = None,
) -> bytes:
    """Download one image under the policy. Raises PolicyRefusal, urllib/HTTP errors or TimeoutError.

    `timeout`, `user_agent_token` and `opt_out_directives` default to the policy's (img2dataset passes
    its own copies of them); `opt_out_directives=()` checks no opt-out.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"not a URL: {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in _ALLOWED_SCHEMES:
        raise PolicyRefusal("scheme", f"{url}: scheme {parts.scheme!r} is not http/https")
    timeout = policy.timeout_s if timeout is None else timeout
    token = policy.user_agent_token if user_agent_token is None else user_agent_token
    token = token.strip().lower() if token else None
    if opt_out_directives is None:
        opt_out_directives = policy.opt_out_directives if policy.honour_opt_out else ()
    directives = {d.strip().lower() for d in opt_out_directives}
    request = urllib.request.Request(url, headers={"User-Agent": _user_agent(token)})
    deadline = time.monotonic() + timeout
    with build_opener(policy).open(request, timeout=timeout) as response:
        # img2dataset's own parsing of X-Robots-Tag (with or without a user-agent token before the directives)
        if directives and img2dataset_downloader().is_disallowed(response.headers, token, directives):
            tags = ", ".join(response.headers.get_all("X-Robots-Tag", []))
            raise PolicyRefusal("opt_out", f"{url} is served with X-Robots-Tag: {tags}")
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > policy.max_image_bytes:
            raise PolicyRefusal("too_many_bytes", f"{url} declares {length} bytes, over {policy.max_image_bytes}")
        data = _read_capped(response, policy.max_image_bytes, deadline, url)
    _check_pixels(data, policy, url)
    return data


def download_image(
    row: tuple[Any, str],
    timeout: float,
    user_agent_token: str | None,
    disallowed_header_directives: Iterable[str] | None,
    *,
    policy: FetchPolicyConfig,
) -> tuple[Any, io.BytesIO | None, str | None]:
    """img2dataset 1.47's `download_image` contract, fetched under `policy`: (key, stream, error)."""
    key, url = row
    try:
        data = fetch(
            url,
            policy,
            timeout=timeout,
            user_agent_token=user_agent_token,
            opt_out_directives=disallowed_header_directives,
        )
    except PolicyRefusal as err:
        return key, None, str(err)
    except urllib.error.URLError as err:
        if isinstance(err.reason, PolicyRefusal):
            return key, None, str(err.reason)
        return key, None, str(err)
    except Exception as err:  # noqa: BLE001 - any failure of one URL is that row's recorded error
        return key, None, str(err) or type(err).__name__
    return key, io.BytesIO(data), None
