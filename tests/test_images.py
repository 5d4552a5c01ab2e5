"""Tests for backend.images against a stand-in Label Studio served on 127.0.0.1 from a thread.

The stand-in checks Authorization headers (a legacy token, or access tokens it hands out at /api/token/refresh/
for a fake Personal Access Token), serves images, redirects, oversize and endless bodies, a non-image and a
decompression bomb. Host names other than IP literals go through a replaced `resolve_host`, so nothing needs DNS.
"""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import json
import shutil
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from PIL import Image

from backend import images
from backend.images import ImageFetcher, ImageFetchError
from backend.settings import Settings

LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
JWT_SECRET = "a stand-in signing key of at least 32 bytes"
RED = (255, 0, 0)


def make_jwt(token_type: str, lifetime_s: float, **claims) -> str:
    return jwt.encode({"token_type": token_type, "exp": int(time.time() + lifetime_s), **claims}, JWT_SECRET)


PAT = make_jwt("refresh", 3600)


def png_bytes(size=(64, 48), color=RED) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """40x20 stored, left half red and right half blue, tagged orientation 6 (display rotated 90 degrees clockwise)."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data: a decompression bomb's first bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


class StandIn:
    """A stand-in Label Studio (and image host) on 127.0.0.1, recording what it was asked."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.access_tokens: set[str] = set()
        self.refreshes = 0
        self.access_lifetime_s = 300.0
        self.presigned_url = "/public/red.png"
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        if tls:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def _authorized(self, header: str | None) -> bool:
        return header == f"Token {LEGACY_TOKEN}" or (
            header is not None and header.startswith("Bearer ") and header[7:] in self.access_tokens
        )

    def _refresh(self, body: dict) -> tuple[int, dict]:
        if body.get("refresh") != PAT:
            return 401, {"detail": "Token is invalid or expired"}
        with self._lock:
            self.refreshes += 1
            access = make_jwt("access", self.access_lifetime_s, jti=str(self.refreshes))
            self.access_tokens.add(access)
        return 200, {"access": access}

    def _handler_class(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status: int, body: bytes = b"", content_type="image/png", headers=()):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                with contextlib.suppress(ConnectionError):  # the fetcher may hang up first, as it should
                    self.wfile.write(body)

            def do_POST(self):
                stand_in.requests.append((self.path, dict(self.headers)))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/api/token/refresh/":
                    return self.send(404)
                status, answer = stand_in._refresh(body)
                self.send(status, json.dumps(answer).encode(), "application/json")

            def do_GET(self):
                stand_in.requests.append((self.path, dict(self.headers)))
                parts = urlsplit(self.path)
                query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
                needs_auth = parts.path.startswith(("/data/", "/tasks/"))
                if needs_auth and not stand_in._authorized(self.headers.get("Authorization")):
                    return self.send(401, b'{"detail": "Authentication credentials were not provided."}')
                if parts.path in ("/data/upload/3/red.png", "/public/red.png"):
                    return self.send(200, png_bytes())
                if parts.path == "/data/local-files/" and query.get("d") == "photos/red.png":
                    return self.send(200, png_bytes((30, 10)))
                if parts.path == "/tasks/7/presign/":
                    fileuri = base64.urlsafe_b64decode(query["fileuri"]).decode()
                    if fileuri != "s3://bucket/red.png":
                        return self.send(404)
                    return self.send(303, headers=[("Location", stand_in.presigned_url)])
                if parts.path == "/redirect":
                    return self.send(302, headers=[("Location", query["to"])])
                if parts.path == "/loop":
                    return self.send(302, headers=[("Location", "/loop")])
                if parts.path == "/rotated.jpg":
                    return self.send(200, exif_rotated_jpeg(), "image/jpeg")
                if parts.path == "/text":
                    return self.send(200, b"hello, not an image", "text/plain")
                if parts.path == "/bomb.png":
                    return self.send(200, png_header_only(100_000, 100_000))
                if parts.path == "/claims-huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(10**12))
                    self.end_headers()
                    return self.wfile.write(png_bytes())
                if parts.path == "/endless":
                    return self.stream(chunk=b"\0" * 65536, pause_s=0, total=2**30)
                if parts.path == "/trickle":
                    return self.stream(chunk=b"\0", pause_s=0.05, total=200)
                if parts.path == "/slow":
                    time.sleep(1.5)
                    return self.send(200, png_bytes())
                self.send(404)

            def stream(self, chunk: bytes, pause_s: float, total: int):
                """A body with no Content-Length (ends when the connection closes), until the client hangs up."""
                self.send_response(200)
                self.end_headers()
                with contextlib.suppress(ConnectionError):
                    for _ in range(total // len(chunk)):
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        time.sleep(pause_s)

        return Handler


class RecordingTransport(httpx.HTTPTransport):
    """Records the URL of every connection httpx actually makes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.urls: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        return super().handle_request(request)


@pytest.fixture
def label_studio() -> Iterator[StandIn]:
    with StandIn() as server:
        yield server


@pytest.fixture
def elsewhere() -> Iterator[StandIn]:
    """A second server on 127.0.0.1 that plays another host: an image host, or a forbidden target."""
    with StandIn() as server:
        yield server


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


@pytest.fixture
def fake_dns(monkeypatch) -> dict[str, list[str]]:
    """Host name -> addresses for `resolve_host`; unknown names fail as they would in DNS."""
    table: dict[str, list[str]] = {}

    def resolve(host: str, port: int):
        if host not in table:
            raise OSError(f"unknown host {host}")
        return [ipaddress.ip_address(address) for address in table[host]]

    monkeypatch.setattr(images, "resolve_host", resolve)
    return table


def make_fetcher(transport: RecordingTransport, **overrides) -> ImageFetcher:
    values = {
        "label_studio_url": None,
        "label_studio_api_key": None,
        "local_files_document_root": None,
        "allowed_hosts": [],
        "image_timeout_s": 5.0,
        "image_max_bytes": 1_000_000,
        "image_max_pixels": 10_000_000,
    }
    values.update(overrides)
    return ImageFetcher(Settings(_env_file=None, **values), client=httpx.Client(transport=transport))


def fetch_error(fetcher: ImageFetcher, url: str, task_id: int | None = None) -> ImageFetchError:
    with pytest.raises(ImageFetchError) as caught:
        fetcher.fetch(url, task_id)
    return caught.value


# --- Label Studio URLs and tokens


def test_upload_with_legacy_token(label_studio, transport):
    fetcher = make_fetcher(transport, label_studio_url=label_studio.url, label_studio_api_key=LEGACY_TOKEN)
    image = fetcher.fetch("/data/upload/3/red.png")
    assert image.size == (64, 48)
    assert image.convert("RGB").getpixel((5, 5)) == RED
    assert label_studio.requests[-1][1]["Authorization"] == f"Token {LEGACY_TOKEN}"


def test_upload_with_personal_access_token_refreshes_once_and_reuses_the_access_token(label_studio, transport):
    fetcher = make_fetcher(transport, label_studio_url=label_studio.url, label_studio_api_key=PAT)
    for _ in range(3):
        assert fetcher.fetch("/data/upload/3/red.png").size == (64, 48)
    assert label_studio.refreshes == 1
    assert label_studio.paths() == ["/api/token/refresh/"] + ["/data/upload/3/red.png"] * 3
    sent = label_studio.requests[-1][1]["Authorization"]
    assert sent.startswith("Bearer ") and jwt.decode(sent[7:], JWT_SECRET, ["HS256"])["token_type"] == "access"


def test_rejected_access_token_is_refreshed_and_the_request_retried(label_studio, transport):
    fetcher = make_fetcher(transport, label_studio_url=label_studio.url, label_studio_api_key=PAT)
    fetcher.fetch("/data/upload/3/red.png")
    label_studio.access_tokens.clear()  # Label Studio no longer accepts the cached access token
    assert fetcher.fetch("/data/upload/3/red.png").size == (64, 48)
    assert label_studio.refreshes == 2


def test_access_token_close_to_expiry_is_refreshed_before_use(label_studio, transport):
    label_studio.access_lifetime_s = 10  # inside the refresh margin
    fetcher = make_fetcher(transport, label_studio_url=label_studio.url, label_studio_api_key=PAT)
    fetcher.fetch("/data/upload/3/red.png")
    fetcher.fetch("/data/upload/3/red.png")
    assert label_studio.refreshes == 2
    assert label_studio.paths().count("/data/upload/3/red.png") == 2  # no request went out with a stale token


def test_concurrent_fetches_share_one_refresh(label_studio, transport):
    fetcher = make_fetcher(transport, label_studio_url=label_studio.url, label_studio_api_key=PAT)
    sizes = []
    threads = [
        threading.Thread(target=lambda: sizes.append(fetcher.fetch("/data/upload/3/red.png").size)) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sizes == [(64, 48)] * 8
    assert label_studio.refreshes == 1


@pytest.mark.parametrize("api_key", [None, "f" * 40, make_jwt("refresh", 3600, jti="revoked")])
def test_missing_or_wrong_key_is_unauthorized(label_studio, transport, api_key):
    fetcher = make_fetcher(transport, label_studio_url=label_studio.url, label_studio_api_key=api_key)
    error = fetch_error(fetcher, "/data/upload/3/red.png")
    assert error.reason == "unauthorized"
    assert "/data/upload/3/red.png" in str(error)
    if api_key:
        assert api_key not in str(error)


def test_label_studio_path_without_label_studio_url(transport):
    assert fetch_error(make_fetcher(transport), "/data/upload/3/red.png").reason == "not_configured"
    assert transport.urls == []


def test_missing_file_is_not_found(label_studio, transport):
    fetcher = make_fetcher(transport, label_studio_url=label_studio.url, label_studio_api_key=LEGACY_TOKEN)
    assert fetch_error(fetcher, "/data/upload/3/missing.png").reason == "not_found"


# --- cloud storage through the presign endpoint


def test_cloud_uri_goes_through_presign_and_the_key_stays_with_label_studio(
    label_studio, elsewhere, transport, fake_dns
):
    fake_dns["bucket.test"] = ["127.0.0.1"]
    label_studio.presigned_url = f"http://bucket.test:{elsewhere.port}/public/red.png?X-Amz-Signature=secret"
    fetcher = make_fetcher(
        transport, label_studio_url=label_studio.url, label_studio_api_key=LEGACY_TOKEN, allowed_hosts=["127.0.0.1"]
    )
    assert fetcher.fetch("s3://bucket/red.png", task_id=7).size == (64, 48)
    fileuri = base64.urlsafe_b64encode(b"s3://bucket/red.png").decode()
    assert label_studio.paths() == [f"/tasks/7/presign/?fileuri={fileuri}"]
    path, headers = elsewhere.requests[-1]
    assert path == "/public/red.png?X-Amz-Signature=secret"
    assert headers["Host"] == f"bucket.test:{elsewhere.port}"
    assert "Authorization" not in headers


def test_cloud_uri_without_task_id(label_studio, transport):
    fetcher = make_fetcher(transport, label_studio_url=label_studio.url, label_studio_api_key=LEGACY_TOKEN)
    assert fetch_error(fetcher, "gs://bucket/red.png").reason == "no_task_id"
    assert transport.urls == []


# --- local files


@pytest.fixture
def document_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "red.png").write_bytes(png_bytes((12, 34)))
    (tmp_path / "secret.png").write_bytes(png_bytes((1, 1)))
    return root


def test_local_file_is_read_from_the_document_root(document_root, transport):
    fetcher = make_fetcher(transport, local_files_document_root=document_root)
    assert fetcher.fetch("/data/local-files/?d=photos/red.png").size == (12, 34)
    assert fetcher.fetch("/data/local-files/?d=/photos/red.png").size == (12, 34)  # `d` is always under the root
    assert transport.urls == []


@pytest.mark.parametrize("d", ["../secret.png", "photos/../../secret.png", "photos/%2E%2E/%2E%2E/secret.png"])
def test_local_file_path_traversal_is_refused(document_root, transport, d):
    error = fetch_error(make_fetcher(transport, local_files_document_root=document_root), f"/data/local-files/?d={d}")
    assert error.reason == "forbidden_path"


def test_local_file_missing_or_too_large(document_root, transport):
    fetcher = make_fetcher(transport, local_files_document_root=document_root, image_max_bytes=50)
    assert fetch_error(fetcher, "/data/local-files/?d=photos/none.png").reason == "not_found"
    assert fetch_error(fetcher, "/data/local-files/?d=photos/red.png").reason == "too_large"


def test_local_file_without_document_root_is_fetched_from_label_studio(label_studio, transport):
    fetcher = make_fetcher(transport, label_studio_url=label_studio.url, label_studio_api_key=LEGACY_TOKEN)
    assert fetcher.fetch("/data/local-files/?d=photos/red.png").size == (30, 10)


# --- SSRF guard


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
        "http://[fd00::1]/a.png",
        "http://224.0.0.1/a.png",
        "http://0.0.0.0/a.png",
        "http://2130706433/a.png",  # 127.0.0.1 spelt as one number
        "http://[2002:7f00:1::]/a.png",  # 6to4 wrapping 127.0.0.1
        "http://100.64.0.1/a.png",  # carrier-grade NAT
    ],
)
def test_private_addresses_are_refused_without_connecting(transport, url):
    assert fetch_error(make_fetcher(transport), url).reason == "forbidden_address"
    assert transport.urls == []


def test_loopback_that_is_not_label_studio_is_refused(label_studio, elsewhere, transport):
    fetcher = make_fetcher(transport, label_studio_url=label_studio.url, label_studio_api_key=LEGACY_TOKEN)
    error = fetch_error(fetcher, f"{elsewhere.url}/public/red.png")  # same host as Label Studio, another port
    assert error.reason == "forbidden_address"
    assert elsewhere.requests == [] and transport.urls == []


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.0/8"])
def test_allowed_hosts_lets_a_private_address_through(elsewhere, transport, entry):
    fetcher = make_fetcher(transport, allowed_hosts=[entry])
    assert fetcher.fetch(f"{elsewhere.url}/public/red.png").size == (64, 48)


def test_allowed_host_name(elsewhere, transport):
    fetcher = make_fetcher(transport, allowed_hosts=["localhost"])
    assert fetcher.fetch(f"http://localhost:{elsewhere.port}/public/red.png").size == (64, 48)


def test_names_are_checked_on_every_address_and_connected_to_the_checked_one(elsewhere, transport, fake_dns):
    fake_dns.update({"intranet.test": ["10.0.0.5"], "mixed.test": ["93.184.216.34", "10.0.0.5"]})
    fetcher = make_fetcher(transport)
    assert fetch_error(fetcher, "http://intranet.test/a.png").reason == "forbidden_address"
    assert fetch_error(fetcher, "http://mixed.test/a.png").reason == "forbidden_address"
    assert fetch_error(fetcher, "http://unknown.test/a.png").reason == "connection_error"
    assert transport.urls == []
    # images.test is unknown to the real DNS: the fetch works only because it connects to the address checked.
    fake_dns["images.test"] = ["127.0.0.1"]
    fetcher = make_fetcher(transport, allowed_hosts=["127.0.0.0/8"])
    assert fetcher.fetch(f"http://images.test:{elsewhere.port}/public/red.png").size == (64, 48)
    assert transport.urls == [f"http://127.0.0.1:{elsewhere.port}/public/red.png"]
    assert elsewhere.requests[-1][1]["Host"] == f"images.test:{elsewhere.port}"


@pytest.fixture
def https_image_host(tmp_path) -> Iterator[tuple[StandIn, ssl.SSLContext]]:
    """An HTTPS server whose certificate names images.test, and a client context that trusts it."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    with StandIn(tls=server_context) as server:
        yield server, ssl.create_default_context(cafile=str(cert))


def test_https_connects_to_the_checked_address_and_verifies_the_name(https_image_host, fake_dns):
    server, trusting = https_image_host
    fake_dns.update({"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    transport = RecordingTransport(verify=trusting)
    fetcher = make_fetcher(transport, allowed_hosts=["127.0.0.0/8"])
    assert fetcher.fetch(f"https://images.test:{server.port}/public/red.png").size == (64, 48)
    assert transport.urls == [f"https://127.0.0.1:{server.port}/public/red.png"]
    assert server.requests[-1][1]["Host"] == f"images.test:{server.port}"
    # The certificate is checked against the name in the URL, not against the pinned address.
    assert fetch_error(fetcher, f"https://other.test:{server.port}/public/red.png").reason == "connection_error"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "relative/a.png"])
def test_other_schemes_are_refused(transport, url):
    assert fetch_error(make_fetcher(transport), url).reason == "unsupported_url"
    assert transport.urls == []


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://10.0.0.1/a.png", "forbidden_address"),
        ("http://169.254.169.254/latest/meta-data/", "forbidden_address"),
        ("{elsewhere}/public/red.png", "forbidden_address"),
        ("file:///etc/passwd", "unsupported_url"),
    ],
)
def test_redirect_from_an_allowed_host_is_checked_again(label_studio, elsewhere, transport, target, reason):
    fetcher = make_fetcher(transport, label_studio_url=label_studio.url, label_studio_api_key=LEGACY_TOKEN)
    start = f"{label_studio.url}/redirect?to={target.format(elsewhere=elsewhere.url)}"
    error = fetch_error(fetcher, start)
    assert error.reason == reason
    assert transport.urls == [start]
    assert elsewhere.requests == []


def test_redirect_loop_stops(label_studio, transport):
    fetcher = make_fetcher(transport, label_studio_url=label_studio.url)
    assert fetch_error(fetcher, f"{label_studio.url}/loop").reason == "too_many_redirects"
    assert len(transport.urls) == images.MAX_REDIRECTS + 1


def test_error_messages_carry_no_secrets(transport):
    error = fetch_error(make_fetcher(transport), "http://user:hunter2@10.0.0.1/a.png?signature=s3cr3t")
    assert error.reason == "forbidden_address"
    assert "hunter2" not in str(error) and "s3cr3t" not in str(error)
    assert "http://10.0.0.1/a.png" in str(error)


# --- limits and decoding


@pytest.fixture
def public_fetcher(label_studio, transport):
    """A fetcher that may reach the stand-in, with small limits."""
    return make_fetcher(
        transport,
        allowed_hosts=["127.0.0.1"],
        image_max_bytes=100_000,
        image_max_pixels=1_000_000,
        image_timeout_s=0.5,
    )


def test_exif_orientation_is_applied(label_studio, public_fetcher):
    image = public_fetcher.fetch(f"{label_studio.url}/rotated.jpg")
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the stored left half (red) is displayed on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_declared_length_over_the_limit_is_refused_up_front(label_studio, public_fetcher):
    assert fetch_error(public_fetcher, f"{label_studio.url}/claims-huge").reason == "too_large"


def test_streamed_body_is_cut_at_the_limit(label_studio, public_fetcher):
    started = time.monotonic()
    assert fetch_error(public_fetcher, f"{label_studio.url}/endless").reason == "too_large"
    assert time.monotonic() - started < 0.5


def test_slow_answer_and_slow_body_time_out(label_studio, public_fetcher):
    assert fetch_error(public_fetcher, f"{label_studio.url}/slow").reason == "timeout"
    started = time.monotonic()
    assert fetch_error(public_fetcher, f"{label_studio.url}/trickle").reason == "timeout"  # each byte is in time
    assert time.monotonic() - started < 1.0


def test_not_an_image(label_studio, public_fetcher):
    assert fetch_error(public_fetcher, f"{label_studio.url}/text").reason == "not_an_image"


def test_decompression_bomb_is_refused_from_its_header(label_studio, public_fetcher):
    assert fetch_error(public_fetcher, f"{label_studio.url}/bomb.png").reason == "too_many_pixels"


def test_pixel_limit(transport):
    fetcher = make_fetcher(transport, image_max_pixels=64 * 48 - 1)
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    assert fetch_error(fetcher, data_uri).reason == "too_many_pixels"


def test_data_uri(transport):
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes((7, 5))).decode()
    image = make_fetcher(transport).fetch(data_uri)
    assert image.size == (7, 5) and image.getpixel((3, 3)) == RED
    assert fetch_error(make_fetcher(transport, image_max_bytes=50), data_uri).reason == "too_large"
    assert fetch_error(make_fetcher(transport), "data:image/png;base64,aGVsbG8=").reason == "not_an_image"
    assert fetch_error(make_fetcher(transport), "data:image/svg+xml,<svg/>").reason == "unsupported_url"
    assert transport.urls == []
