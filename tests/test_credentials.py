"""C2PA content credentials: served images carry a signed manifest with their record; a change to the file breaks
it; a certificate C2PA would refuse stops the server at start."""

from __future__ import annotations

import base64
import datetime
import io
import json
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
from PIL import Image
from serve_helpers import LiveServer

pytest.importorskip("c2pa")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from ldmkit.config import ServeConfig, ServeRun  # noqa: E402
from ldmkit.data.images import png_bytes, read_parameters  # noqa: E402
from ldmkit.errors import ConfigError, MissingFileError  # noqa: E402
from ldmkit.governance.credentials import Credentials, read_credentials  # noqa: E402
from ldmkit.serve.service import Service  # noqa: E402

PEM = serialization.Encoding.PEM


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")]
    )


def _usage(**on) -> x509.KeyUsage:
    names = "digital_signature content_commitment key_encipherment data_encipherment key_agreement key_cert_sign "
    names += "crl_sign encipher_only decipher_only"
    return x509.KeyUsage(**{n: on.get(n, False) for n in names.split()})


def make_certificates(folder, signing_usage: bool = True):
    """A test root CA and a signing certificate it issued, written as chain.pem (signer, then root), key.pem and
    root.pem; signing_usage=False leaves out the extended key usage C2PA requires."""
    now = datetime.datetime.now(datetime.timezone.utc)
    days = datetime.timedelta(days=1)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (
        x509.CertificateBuilder()
        .subject_name(_name("Acme test root"))
        .issuer_name(_name("Acme test root"))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - days)
        .not_valid_after(now + 30 * days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("image service"))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - days)
        .not_valid_after(now + 30 * days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(digital_signature=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
    )
    if signing_usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    cert = builder.sign(root_key, hashes.SHA256())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chain.pem").write_bytes(cert.public_bytes(PEM) + root.public_bytes(PEM))
    (folder / "root.pem").write_bytes(root.public_bytes(PEM))
    raw = serialization.PrivateFormat.PKCS8
    (folder / "key.pem").write_bytes(key.private_bytes(PEM, raw, serialization.NoEncryption()))
    return folder / "chain.pem", folder / "key.pem", folder / "root.pem"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


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
    assert cred["state"] == "Valid" and cred["signer"] == "image service"
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


def test_certificates_c2pa_refuses_stop_the_start_with_what_is_wrong(certs, tmp_path):
    chain, key, _ = certs
    bad_chain, bad_key, _ = make_certificates(tmp_path / "no-eku", signing_usage=False)
    with pytest.raises(ConfigError, match=f"{bad_chain}.*extended key usage"):
        Credentials(bad_chain, bad_key)
    with pytest.raises(ConfigError, match="not the private key of the first certificate"):
        Credentials(chain, bad_key)
    with pytest.raises(MissingFileError, match="certificate .*missing.pem does not exist"):
        Credentials(tmp_path / "missing.pem", key)
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
    assert "content credentials: valid and trusted, signed by image service (Acme)" in out.stdout
    assert "this exact file" in out.stdout  # the audit trail hashed the signed file, as served
