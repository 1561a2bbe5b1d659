"""C2PA content credentials: served images carry a signed manifest with their record; a change to the file breaks
it; a certificate C2PA would refuse stops the server at start."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.serve_helpers import LiveServer

pytest.importorskip("c2pa")
from ldmkit.cli import main  # noqa: E402
from ldmkit.config import ServeConfig, ServeRun  # noqa: E402
from ldmkit.data.images import png_bytes, read_parameters  # noqa: E402
from ldmkit.errors import ConfigError, MissingFileError  # noqa: E402
from ldmkit.governance.credentials import Credentials, demo_certificates, read_credentials  # noqa: E402
from ldmkit.serve.service import Service  # noqa: E402
from ldmkit.shipped import resolve_model  # noqa: E402


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return demo_certificates(tmp_path_factory.mktemp("certs"))


def picture(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    return png_bytes(img, {"ldmkit": json.dumps({"request_id": "r-1", "seed": seed})})


def ldmkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldmkit.cli", *args], capture_output=True, text=True, timeout=300)


def test_a_signed_png_keeps_its_pixels_and_record_and_reads_back_valid(certs):
    chain, key, root = certs
    signer = Credentials(chain, key)
    assert signer.algorithm == "es256"
    plain = picture()
    signed = signer.sign(plain, {"request_id": "r-1", "model": "emoji"})
    before, after = Image.open(io.BytesIO(plain)), Image.open(io.BytesIO(signed))
    assert np.array_equal(np.asarray(before), np.asarray(after))
    assert after.text["ldmkit"] == before.text["ldmkit"]  # the record in the text chunk is kept
    cred = read_credentials(signed, "PNG")
    assert cred["state"] == "Valid" and cred["signer"] == "ldmkit demo signer"
    assert cred["record"] == {"request_id": "r-1", "model": "emoji"}
    assert cred["failures"] == ["signingCredential.untrusted"]  # no trust anchors given
    assert read_credentials(signed, "PNG", trust=root)["state"] == "Trusted"
    assert read_credentials(plain, "PNG") is None


def rewrite_chunk(png: bytes, kind: bytes, change) -> bytes:
    """The PNG file with the data of its first `kind` chunk replaced by change(data), its CRC made right again (as a
    forger would: the file stays a valid PNG)."""
    at = 8
    while at < len(png):
        length = struct.unpack(">I", png[at : at + 4])[0]
        if png[at + 4 : at + 8] == kind:
            data = change(png[at + 8 : at + 8 + length])
            chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
            return png[:at] + chunk + png[at + 12 + length :]
        at += 12 + length
    raise AssertionError(f"no {kind} chunk")


def flip_a_pixel(idat: bytes) -> bytes:
    raw = bytearray(zlib.decompress(idat))
    raw[40] ^= 0x55  # a byte of the first row's pixels (after its filter byte)
    return zlib.compress(bytes(raw))


@pytest.mark.parametrize(
    "forge",
    [
        lambda png: rewrite_chunk(png, b"IDAT", flip_a_pixel),
        lambda png: rewrite_chunk(png, b"iTXt", lambda d: d.replace(b'"r-1"', b'"r-2"')),
    ],
    ids=["pixel", "record"],
)
def test_a_changed_pixel_or_record_invalidates_the_credentials(certs, tmp_path, forge):
    chain, key, root = certs
    signed = Credentials(chain, key).sign(picture(), {"request_id": "r-1"})
    forged = forge(signed)
    assert Image.open(io.BytesIO(forged)).load() is not None  # still a readable PNG
    cred = read_credentials(forged, "PNG", trust=root)
    assert cred["state"] == "Invalid" and "assertion.dataHash.mismatch" in cred["failures"]
    path = tmp_path / "forged.png"
    path.write_bytes(forged)
    out = ldmkit("provenance", str(path), "--trust", str(root), "--database", str(tmp_path / "none.db"))
    assert "content credentials: INVALID" in out.stdout and "the file was changed" in out.stdout


def test_a_damaged_manifest_is_reported_and_the_record_still_read(tmp_path):
    junk = b"\x00\x00\x00\x20jumb" + b"\x00" * 28  # a JUMBF box header and nothing C2PA can parse
    damaged = rewrite_chunk(picture(), b"IDAT", lambda d: d)  # unchanged pixels, then a junk manifest before them
    at = damaged.index(b"IDAT") - 4
    chunk = struct.pack(">I", len(junk)) + b"caBX" + junk + struct.pack(">I", zlib.crc32(b"caBX" + junk))
    damaged = damaged[:at] + chunk + damaged[at:]
    cred = read_credentials(damaged, "PNG")
    assert cred["state"] == "Invalid" and cred["failures"][0].startswith("unreadable")
    path = tmp_path / "damaged.png"
    path.write_bytes(damaged)
    out = ldmkit("provenance", str(path), "--database", str(tmp_path / "none.db"))
    assert out.returncode == 0, out.stderr  # the record still says where it came from
    assert "record: request r-1" in out.stdout and "the manifest is damaged" in out.stdout


def test_certificates_c2pa_refuses_stop_the_start_with_what_is_wrong(certs, tmp_path):
    chain, key, _ = certs
    bad_chain, bad_key, _ = demo_certificates(tmp_path / "no-eku", signing_usage=False)
    with pytest.raises(ConfigError, match=f"{bad_chain}.*extended key usage"):
        Credentials(bad_chain, bad_key)
    with pytest.raises(ConfigError, match="not the private key of the first certificate"):
        Credentials(chain, bad_key)
    with pytest.raises(MissingFileError, match="certificate .*missing.pem does not exist"):
        Credentials(tmp_path / "missing.pem", key)
    with pytest.raises(ConfigError, match=f"private key {tmp_path} is a folder; give its PEM file"):
        Credentials(chain, tmp_path)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="junk.pem is not a PEM certificate chain"):
        Credentials(tmp_path / "junk.pem", key)
    with pytest.raises(ConfigError, match="serve.c2pa_cert is set but serve.c2pa_key is not"):
        Service(ServeRun(serve=ServeConfig(c2pa_cert=str(chain))), {}, None, None, None)


def test_served_images_are_signed_with_their_record_under_concurrent_requests(certs, tmp_path):
    chain, key, root = certs
    server = LiveServer(tmp_path / "db.sqlite", no_auth=True, c2pa_cert=str(chain), c2pa_key=str(key))
    results: list = [None] * 3

    def ask(i: int) -> None:
        with server.client() as c:
            r = c.post("/v1/images/generations", json={"prompt": f"apple {i}", "steps": 2, "seed": i, "n": 2})
            results[i] = (r.status_code, r.headers.get("x-request-id"), r.json())

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        server.close()
    for status, request_id, body in results:
        assert status == 200, body
        for item in body["data"]:
            png = base64.b64decode(item["b64_json"])
            cred = read_credentials(png, "PNG", trust=root)
            assert cred["state"] == "Trusted", cred
            assert cred["record"]["request_id"] == request_id
            path = tmp_path / f"{request_id}.png"
            path.write_bytes(png)
            assert json.loads(read_parameters(path)["ldmkit"]) == cred["record"]  # the same record twice
    out = ldmkit("provenance", str(path), "--trust", str(root), "--database", str(tmp_path / "db.sqlite"))
    assert out.returncode == 0, out.stderr
    assert "content credentials: valid and trusted, signed by ldmkit demo signer (ldmkit demo)" in out.stdout
    assert "this exact file" in out.stdout  # the audit trail hashed the signed file, as served


def test_demo_cert_writes_a_root_and_signer_that_serve_accepts_and_keeps_what_exists(tmp_path):
    out = ldmkit("credentials", "demo-cert", "--out", str(tmp_path / "c"))
    assert out.returncode == 0, out.stderr
    assert "ldmkit serve --set serve.c2pa_cert=" in out.stdout
    chain, key, root = (tmp_path / "c" / n for n in ("chain.pem", "key.pem", "root.pem"))
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    signed = Credentials(chain, key).sign(picture(), {"request_id": "r-9"})
    assert read_credentials(signed, "PNG", trust=root)["state"] == "Trusted"
    before = chain.read_bytes()
    again = ldmkit("credentials", "demo-cert", "--out", str(tmp_path / "c"))
    assert again.returncode != 0 and "--overwrite" in again.stderr and chain.read_bytes() == before


def test_the_commands_sign_every_file_they_write_and_refuse_what_cannot_be_signed(certs, tmp_path, capsys):
    """generate (a grid), sample --separate (a file per image) and img2img (an edit) with --c2pa-cert and --c2pa-key:
    each file's credentials are valid and trusted and carry the record embedded beside them. A format C2PA is not
    written into here, or one of the two options alone, stops the command before sampling."""
    chain, key, root = certs
    sign = ["--c2pa-cert", str(chain), "--c2pa-key", str(key)]
    common = ["--model", "emoji", "--steps", "2", "--n", "2", "--quiet", *sign]
    assert main(["generate", "red apple", *common, "--watermark", "--out", str(tmp_path / "grid.png")]) == 0
    emoji = str(resolve_model("emoji"))
    sample = ["sample", emoji, "--prompt", "pear", "--n", "2", "--steps", "2", "--separate", "--quiet", *sign]
    assert main([*sample, "--out", str(tmp_path / "each")]) == 0
    edit = ["img2img", str(tmp_path / "each" / "00000.png"), "--prompt", "pear", "--strength", "0.5", *common]
    assert main([*edit, "--out", str(tmp_path / "edit.png")]) == 0
    written = [tmp_path / "grid.png", *sorted((tmp_path / "each").glob("*.png")), *sorted(tmp_path.glob("edit-*.png"))]
    assert len(written) == 5, written
    for path in written:
        cred = read_credentials(path.read_bytes(), "PNG", trust=root)
        assert cred["state"] == "Trusted", (path, cred)
        assert cred["record"] == json.loads(read_parameters(path)["ldmkit"])  # the same record twice
    out = ldmkit("provenance", str(tmp_path / "grid.png"), "--trust", str(root), "--database", str(tmp_path / "x.db"))
    assert "content credentials: valid and trusted, signed by ldmkit demo signer" in out.stdout, out.stdout
    capsys.readouterr()
    assert main(["generate", "red apple", *common, "--out", str(tmp_path / "grid.jpg")]) == 2
    assert "content credentials are written into PNG files only; write" in capsys.readouterr().err
    assert main(["generate", "red apple", *common[:-2], "--out", str(tmp_path / "half.png")]) == 2
    assert "--c2pa-cert is set but --c2pa-key is not" in capsys.readouterr().err
    assert not (tmp_path / "grid.jpg").exists() and not (tmp_path / "half.png").exists()


def test_an_expired_certificate_stops_the_start_and_one_expiring_soon_is_accepted_with_a_warning(tmp_path):
    chain, key, _ = demo_certificates(tmp_path / "old", days=-1)
    with pytest.raises(ConfigError, match=r"old/chain.pem expired on .* UTC; renew it"):
        Credentials(chain, key)
    chain, key, root = demo_certificates(tmp_path / "soon", days=3)
    with pytest.warns(UserWarning, match=r"soon/chain.pem expires on .*; renew it before then"):
        signer = Credentials(chain, key)
    assert read_credentials(signer.sign(picture(), {"request_id": "r-3"}), "PNG", trust=root)["state"] == "Trusted"


def test_a_certificate_that_expires_while_serving_fails_requests_with_503_and_sends_nothing_unsigned(tmp_path):
    life = 15.0  # seconds the certificate is valid for after it is made: the start signs within it
    made = time.monotonic()
    chain, key, _ = demo_certificates(tmp_path / "brief", days=life / 86400)
    with pytest.warns(UserWarning, match="expires on"):
        server = LiveServer(tmp_path / "db.sqlite", no_auth=True, c2pa_cert=str(chain), c2pa_key=str(key))
    try:
        time.sleep(max(0.0, made + life + 1 - time.monotonic()))
        with server.client() as c:
            r = c.post("/v1/images/generations", json={"prompt": "apple", "steps": 2, "n": 1})
    finally:
        server.close()
    assert r.status_code == 503, r.text
    assert "could not be signed" in r.text and "expired on" in r.text and "renew it" in r.text
    assert "b64_json" not in r.text
    out = ldmkit("audit", "tail", "--database", str(tmp_path / "db.sqlite"))
    assert out.returncode == 0, out.stderr
    assert "503" in out.stdout and "could not be signed" in out.stdout, out.stdout
