"""Fetch the image a Label Studio task points to, safely, and return it the way the editor displays it.

Task data is written by anyone who can import tasks, so its URLs are untrusted input. `ImageFetcher.fetch` turns
one into a fully loaded PIL image with its EXIF orientation applied (browsers honour it, so polygons and
original_width/original_height must be computed on the transposed image), or raises `ImageFetchError`.

URL kinds:
- `data:image/...;base64,...`: decoded in memory.
- `/data/local-files/?d=dir/a.jpg`: read from LOCAL_FILES_DOCUMENT_ROOT when that is set (never outside it),
  else fetched from Label Studio like the next kind.
- `/data/upload/...`, `/storage-data/...` and other paths: fetched from LABEL_STUDIO_URL with the API key.
- `s3://`, `gs://`, `azure-blob://`: only Label Studio holds the storage credentials, so these go through its
  `/tasks/{task_id}/presign/?fileuri=<base64url>` endpoint, which answers with the bytes or a redirect to a
  presigned URL. This needs the task id.
- `http(s)://...`: fetched directly.

Label Studio's API key is sent only to LABEL_STUDIO_URL's origin (scheme, host and port). It is either a legacy
token (`Authorization: Token <key>`) or a Personal Access Token, a JWT refresh token that is exchanged at
`/api/token/refresh/` for short-lived access tokens (`Authorization: Bearer <access>`), refreshed shortly before
they expire and again after a 401.

SSRF guard, applied to every hop including each redirect: only http and https; LABEL_STUDIO_URL's origin and
host names listed in XDECODER_ALLOWED_HOSTS are trusted as they are; any other host is resolved once, every
address it resolves to must be public (or inside an allowed IP or CIDR entry), and the connection is then made
to that checked address, so a DNS answer that changes between the check and the connection (DNS rebinding)
cannot redirect it. Trusted host names are resolved by httpx itself and are not pinned.

Limits: one deadline of XDECODER_IMAGE_TIMEOUT for the whole fetch (every hop, slow bodies included), at most
XDECODER_IMAGE_MAX_BYTES of body (Content-Length refused up front, the stream cut as soon as it is exceeded) and
at most XDECODER_IMAGE_MAX_PIXELS, checked on the image header before anything is decoded.

The fetcher is thread-safe: RQ workers call it directly, the async server through `asyncio.to_thread`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import ipaddress
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import jwt
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REDIRECTS = 5
# Formats browsers display (JPEG includes multi-picture MPO files from phones). Keeping Pillow to these also keeps
# it away from formats it decodes by running external programs (EPS through Ghostscript). AVIF is left out because
# its plugin exists only in recent Pillow builds.
BROWSER_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
CLOUD_STORAGE_SCHEMES = ("s3", "gs", "azure-blob")
LOCAL_FILES_PATH = "/data/local-files"
TOKEN_REFRESH_PATH = "/api/token/refresh/"
# Refresh an access token this long before it expires, so it does not expire on the way to Label Studio.
ACCESS_TOKEN_MARGIN_S = 30.0
USER_AGENT = "xdecoder-ls image fetcher"


class ImageFetchError(Exception):
    """A task's image could not be fetched. `str(error)` says which URL (without secrets) and why.

    `reason` is one of: unsupported_url, not_configured, no_task_id, forbidden_address, forbidden_path,
    unauthorized, not_found, http_error, too_many_redirects, connection_error, timeout, too_large,
    too_many_pixels, not_an_image, unreadable.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order (tests replace this function)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def is_public_address(address: IPAddress) -> bool:
    """False for loopback, private, link-local (cloud metadata), unique-local, multicast, reserved, unspecified."""
    # 6to4 addresses carry an IPv4 address that a relay would connect to.
    if isinstance(address, ipaddress.IPv6Address) and address.sixtofour and not is_public_address(address.sixtofour):
        return False
    return address.is_global and not address.is_multicast and not address.is_reserved


def for_message(url: str) -> str:
    """`url` fit for logs and error messages.

    Absolute URLs lose user:password and their query string (presigned URLs carry signatures there); paths on
    Label Studio are kept whole, since its credentials travel in headers and `?d=` names the local file.
    """
    if url.startswith("data:"):
        return f"{url.partition(',')[0]},... ({len(url)} characters)"
    parts = urlsplit(url)
    if not parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    query = "..." if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


class ImageFetcher:
    """Fetches task images; see the module docstring for the URL kinds and the rules."""

    def __init__(self, settings: Settings, client: httpx.Client | None = None):
        self._settings = settings
        self._owns_client = client is None
        self._client = client or httpx.Client(headers={"User-Agent": USER_AGENT})
        self._label_studio_url = httpx.URL(settings.label_studio_url) if settings.label_studio_url else None
        if self._label_studio_url and self._label_studio_url.scheme not in ("http", "https"):
            raise ValueError("LABEL_STUDIO_URL must start with http:// or https://")
        self._trusted_names: set[str] = set()
        self._trusted_networks: list[IPNetwork] = []
        for entry in settings.allowed_hosts:
            try:
                self._trusted_networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._trusted_names.add(entry.lower())
        self._credentials: LabelStudioCredentials | None = None
        if settings.label_studio_api_key and self._label_studio_url:
            self._credentials = LabelStudioCredentials(
                settings.label_studio_api_key.get_secret_value(),
                refresh_url=self._label_studio_path(TOKEN_REFRESH_PATH),
                client=self._client,
                timeout_s=settings.image_timeout_s,
            )

    def fetch(self, url: str, task_id: int | None = None) -> Image.Image:
        """The image at `url` (task data), EXIF-transposed and fully loaded. `task_id` is needed for cloud URIs."""
        url = url.strip()
        shown = for_message(url)
        try:
            data = self._read(url, shown, task_id)
        except httpx.InvalidURL as error:
            raise ImageFetchError("unsupported_url", f"{shown}: invalid URL ({error})") from None
        except httpx.TimeoutException as error:
            raise ImageFetchError("timeout", f"{shown}: timed out ({error.__class__.__name__})") from None
        except httpx.HTTPError as error:
            raise ImageFetchError("connection_error", f"{shown}: {error.__class__.__name__}: {error}") from None
        return self._decode(data, shown)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # --- where the bytes come from

    def _read(self, url: str, shown: str, task_id: int | None) -> bytes:
        if url.startswith("data:"):
            return self._read_data_uri(url, shown)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in CLOUD_STORAGE_SCHEMES:
            if task_id is None:
                raise ImageFetchError("no_task_id", f"{shown}: a cloud storage URI can only be fetched for a task id")
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            return self._download(self._label_studio_path(f"/tasks/{task_id}/presign/?fileuri={fileuri}", shown), shown)
        if scheme in ("http", "https"):
            return self._download(httpx.URL(url), shown)
        if not scheme and not parts.netloc and url.startswith("/"):
            if parts.path.rstrip("/") == LOCAL_FILES_PATH and self._settings.local_files_document_root:
                return self._read_local_file(parts.query, shown)
            return self._download(self._label_studio_path(url, shown), shown)
        raise ImageFetchError("unsupported_url", f"{shown}: only http(s), data:, cloud storage and Label Studio URLs")

    def _label_studio_path(self, path: str, shown: str = "") -> httpx.URL:
        """`path` on Label Studio, appended as the SDK does, so that a LABEL_STUDIO_URL with a path prefix keeps it."""
        if self._label_studio_url is None:
            raise ImageFetchError("not_configured", f"{shown}: a Label Studio URL needs LABEL_STUDIO_URL to be set")
        return httpx.URL(str(self._label_studio_url).rstrip("/") + path)

    def _read_data_uri(self, url: str, shown: str) -> bytes:
        header, comma, payload = url.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ImageFetchError("unsupported_url", f"{shown}: only base64 data URIs are supported")
        if len(payload) * 3 // 4 > self._settings.image_max_bytes:
            raise ImageFetchError("too_large", f"{shown}: more than {self._settings.image_max_bytes} bytes")
        try:
            return base64.b64decode(payload)
        except binascii.Error as error:
            raise ImageFetchError("not_an_image", f"{shown}: invalid base64 ({error})") from None

    def _read_local_file(self, query: str, shown: str) -> bytes:
        # Parsed like Label Studio's /data/local-files/ view: `d` is relative to the root, the last `d` wins.
        values = parse_qs(query).get("d")
        if not values:
            raise ImageFetchError("not_found", f"{shown}: no ?d= file path")
        root = os.path.abspath(self._settings.local_files_document_root)
        # Lexical containment, like Label Studio's own check: symbolic links inside the root are followed.
        path = Path(os.path.abspath(os.path.join(root, values[-1].lstrip("/"))))
        if not path.is_relative_to(root):
            raise ImageFetchError("forbidden_path", f"{shown}: the path leaves LOCAL_FILES_DOCUMENT_ROOT")
        limit = self._settings.image_max_bytes
        try:
            with path.open("rb") as file:
                if os.fstat(file.fileno()).st_size > limit:
                    raise ImageFetchError("too_large", f"{shown}: more than {limit} bytes")
                data = file.read(limit + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ImageFetchError("not_found", f"{shown}: no such file under LOCAL_FILES_DOCUMENT_ROOT") from None
        except (OSError, ValueError) as error:
            raise ImageFetchError("unreadable", f"{shown}: {error.__class__.__name__}: {error}") from None
        if len(data) > limit:  # the file grew after fstat
            raise ImageFetchError("too_large", f"{shown}: more than {limit} bytes")
        return data

    # --- HTTP

    def _download(self, url: httpx.URL, shown: str) -> bytes:
        """GET `url`, following redirects by hand so that every hop passes the SSRF guard."""
        deadline = time.monotonic() + self._settings.image_timeout_s
        where = shown
        for _ in range(MAX_REDIRECTS + 1):
            response = self._send(url, where, deadline)
            try:
                if response.is_redirect:
                    url = url.join(response.headers["location"])
                    where = f"{shown} -> {for_message(str(url))}"
                    continue
                self._check_status(response, url, where)
                return self._read_body(response, where, deadline)
            finally:
                response.close()
        raise ImageFetchError("too_many_redirects", f"{where}: more than {MAX_REDIRECTS} redirects")

    def _send(self, url: httpx.URL, where: str, deadline: float) -> httpx.Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageFetchError("timeout", f"{where}: took more than {self._settings.image_timeout_s} s")
        # Label Studio answers 406 to "Accept: image/*" (its upload views negotiate as an API): accept anything.
        headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
        target, extensions = url, {}
        address = self._connect_address(url, where)
        if address is not None:
            target = url.copy_with(host=str(address))
            headers["Host"] = url.netloc.decode("ascii")
            extensions["sni_hostname"] = url.host
        to_label_studio = self._credentials is not None and self._is_label_studio(url)
        if to_label_studio:
            headers["Authorization"] = self._authorization(where)
        request = self._client.build_request("GET", target, headers=headers, timeout=remaining, extensions=extensions)
        response = self._client.send(request, stream=True, follow_redirects=False)
        if response.status_code == 401 and to_label_studio and self._credentials.refreshable:
            response.close()
            request.headers["Authorization"] = self._authorization(where, rejected=headers["Authorization"])
            response = self._client.send(request, stream=True, follow_redirects=False)
        return response

    def _authorization(self, where: str, rejected: str | None = None) -> str:
        try:
            return self._credentials.authorization(rejected)
        except ImageFetchError as error:
            raise ImageFetchError(error.reason, f"{where}: {error}") from None

    def _is_label_studio(self, url: httpx.URL) -> bool:
        ls = self._label_studio_url
        return ls is not None and (url.scheme, url.host, url.port) == (ls.scheme, ls.host, ls.port)

    def _connect_address(self, url: httpx.URL, where: str) -> IPAddress | None:
        """The checked address to connect to for `url`, or None for a trusted host that httpx may resolve."""
        if url.scheme not in ("http", "https") or not url.host:
            raise ImageFetchError("unsupported_url", f"{where}: only http(s) URLs with a host may be fetched")
        if self._is_label_studio(url) or url.host.lower() in self._trusted_names:
            return None
        try:
            addresses = [ipaddress.ip_address(url.host)]
        except ValueError:
            try:
                addresses = resolve_host(url.host, url.port or (443 if url.scheme == "https" else 80))
            except (OSError, UnicodeError) as error:
                raise ImageFetchError("connection_error", f"{where}: cannot resolve {url.host} ({error})") from None
        if not addresses:
            raise ImageFetchError("connection_error", f"{where}: {url.host} resolves to no address")
        addresses = [_unmapped(address) for address in addresses]
        for address in addresses:
            if not is_public_address(address) and not any(address in net for net in self._trusted_networks):
                raise ImageFetchError(
                    "forbidden_address",
                    f"{where}: {url.host} is {address}, not a public address; "
                    "add it to XDECODER_ALLOWED_HOSTS if it is trusted",
                )
        return addresses[0]

    def _check_status(self, response: httpx.Response, url: httpx.URL, where: str) -> None:
        if response.is_success:
            return
        status = response.status_code
        if status in (401, 403):
            if not self._is_label_studio(url):
                hint = "not a Label Studio URL, so no API key was sent"
            elif self._credentials is None:
                hint = "LABEL_STUDIO_API_KEY is not set"
            else:
                hint = "check LABEL_STUDIO_API_KEY (legacy tokens also need LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN)"
            raise ImageFetchError("unauthorized", f"{where}: HTTP {status}, {hint}")
        reason = "not_found" if status in (404, 410) else "http_error"
        raise ImageFetchError(reason, f"{where}: HTTP {status}")

    def _read_body(self, response: httpx.Response, where: str, deadline: float) -> bytes:
        limit = self._settings.image_max_bytes
        declared = response.headers.get("content-length", "")
        # A malformed Content-Length is ignored: the streamed count below applies anyway.
        if declared.isdigit() and int(declared) > limit:
            raise ImageFetchError("too_large", f"{where}: Content-Length {declared} is more than {limit} bytes")
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                raise ImageFetchError("too_large", f"{where}: more than {limit} bytes")
            if time.monotonic() > deadline:
                raise ImageFetchError("timeout", f"{where}: took more than {self._settings.image_timeout_s} s")
            chunks.append(chunk)
        return b"".join(chunks)

    # --- decoding

    def _decode(self, data: bytes, shown: str) -> Image.Image:
        limit = self._settings.image_max_pixels
        too_many_pixels = f"{shown}: more than {limit} pixels"
        try:
            image = Image.open(io.BytesIO(data), formats=BROWSER_FORMATS)
        except Image.DecompressionBombError:
            raise ImageFetchError("too_many_pixels", too_many_pixels) from None
        except UnidentifiedImageError:
            raise ImageFetchError("not_an_image", f"{shown}: not an image in a format browsers display") from None
        except Exception as error:  # a known format with a broken header: Pillow raises OSError, SyntaxError, ...
            raise ImageFetchError("not_an_image", f"{shown}: cannot read ({error.__class__.__name__})") from None
        width, height = image.size
        if width * height > limit:
            raise ImageFetchError("too_many_pixels", f"{too_many_pixels} ({width}x{height})")
        try:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: a large image is not held twice
        except Exception as error:  # Pillow's decoders raise many exception types on malformed data
            raise ImageFetchError("not_an_image", f"{shown}: cannot decode ({error.__class__.__name__})") from None
        return image


class LabelStudioCredentials:
    """The Authorization header for Label Studio, thread-safe.

    A legacy token is sent as `Token <key>`, any other JWT as `Bearer <key>`. A Personal Access Token (a JWT whose
    `token_type` is "refresh") is exchanged at /api/token/refresh/ for an access token, which is cached until
    shortly before its `exp` or until Label Studio rejects it.
    """

    def __init__(self, api_key: str, refresh_url: httpx.URL, client: httpx.Client, timeout_s: float):
        claims = _unverified_claims(api_key)
        self._api_key = api_key
        self._scheme = "Token" if claims is None else "Bearer"
        self.refreshable = claims is not None and claims.get("token_type") == "refresh"
        self._refresh_url = refresh_url
        self._client = client
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._access_header: str | None = None
        self._access_expires_at = float("inf")

    def authorization(self, rejected: str | None = None) -> str:
        """The header value to send; `rejected` is one Label Studio just answered 401 to."""
        if not self.refreshable:
            return f"{self._scheme} {self._api_key}"
        with self._lock:
            # Another thread may have replaced the rejected token already; then use its fresh one.
            stale = self._access_header is None or self._access_header == rejected
            if stale or time.time() > self._access_expires_at - ACCESS_TOKEN_MARGIN_S:
                self._refresh()
            return self._access_header

    def _refresh(self) -> None:
        response = self._client.post(self._refresh_url, json={"refresh": self._api_key}, timeout=self._timeout_s)
        access = None
        if response.is_success:
            with contextlib.suppress(ValueError, AttributeError):  # not JSON, or not an object
                access = response.json().get("access")
        if not isinstance(access, str):
            raise ImageFetchError(
                "unauthorized",
                f"HTTP {response.status_code} from {self._refresh_url}: Label Studio did not exchange the Personal "
                "Access Token in LABEL_STUDIO_API_KEY for an access token (expired or revoked?)",
            )
        claims = _unverified_claims(access) or {}
        self._access_header = f"Bearer {access}"
        self._access_expires_at = float(claims.get("exp", float("inf")))


def _unmapped(address: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped IPv6 address (::ffff:10.0.0.1), else `address` itself."""
    return getattr(address, "ipv4_mapped", None) or address


def _unverified_claims(token: str) -> dict | None:
    """The claims of a JWT, read without checking its signature (only Label Studio can); None if not a JWT."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
    except jwt.InvalidTokenError:
        return None
    return claims if isinstance(claims, dict) else None
