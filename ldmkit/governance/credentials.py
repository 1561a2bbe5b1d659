"""C2PA content credentials: a signed manifest inside each output PNG that says a model made it, with its record.

The generation record in a PNG's text chunks and the invisible watermark say where an image came from, but anyone
can write a text chunk. Content credentials (the C2PA standard, read by Adobe's tools, browsers' extensions and
the Content Authenticity Initiative's verify site) add a signature: the manifest names the software and the
action ("created" by "trainedAlgorithmicMedia", the IPTC term for a generative model's output), carries the
generation record as the assertion ASSERTION, and binds a hash of the file's bytes, so that any change to the
pixels or the record shows as a failed validation. Signing and reading run offline through the `c2pa-python`
package (the `provenance` extra); no timestamp authority is called.

The signing certificate is the deployment's own: a PEM file holding the end-entity certificate and the chain of
its issuers (not the root), and its private key in another PEM file. C2PA refuses certificates that are not fit
to sign content: they must not be a CA, must allow digitalSignature and carry an extended key usage such as
emailProtection or documentSigning. Readers report a signature "Valid" when it and the hashes check out, and
"Trusted" when its chain also ends in a root they were told to trust (`ldmkit provenance --trust ROOT.pem`).
"""

from __future__ import annotations

import datetime
import io
import json
import warnings
from pathlib import Path

from .. import __version__
from ..errors import ConfigError, LdmkitError, MissingFileError

ASSERTION = "org.ldmkit.generation"  # the label of the assertion holding the generation record
GENERATED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
NO_THUMBNAIL = {"builder": {"thumbnail": {"enabled": False}}}  # a 64 px output needs no thumbnail (30 KB, 80 ms)
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
RENEW_WARNING_DAYS = 14  # a certificate that expires sooner is accepted with a warning at start


class CredentialsError(LdmkitError):
    """An image could not be signed (its certificate expired after the start): the server answers 503."""


def _c2pa():
    try:
        import c2pa
    except ImportError:
        raise ConfigError(
            "content credentials need the c2pa-python package: pip install 'ldmkit[provenance]' (make install does)"
        ) from None
    return c2pa


def _algorithm(key, path: Path) -> str:
    """The C2PA signing algorithm of a private key: its type decides."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name in algs:
            return algs[key.curve.name]
        raise ConfigError(f"{path}: an EC key on {key.curve.name}; C2PA signs with P-256, P-384 or P-521 keys")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    raise ConfigError(f"{path}: a {type(key).__name__}; C2PA signs with EC (P-256/384/521), Ed25519 or RSA keys")


class Credentials:
    """Signs PNG files with a C2PA manifest (thread-safe: each sign builds its own manifest)."""

    def __init__(self, cert: str | Path, key: str | Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self.cert_path, self.key_path = Path(cert), Path(key)
        for what, path in (("certificate", self.cert_path), ("private key", self.key_path)):
            if path.is_dir():
                raise ConfigError(f"the content-credentials {what} {path} is a folder; give its PEM file")
            if not path.is_file():
                raise MissingFileError(f"the content-credentials {what} {path} does not exist")
        chain = self.cert_path.read_bytes()
        try:
            certs = x509.load_pem_x509_certificates(chain)
        except ValueError as e:
            raise ConfigError(f"{self.cert_path} is not a PEM certificate chain ({e})") from None
        try:
            key_obj = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{self.key_path} is not an unencrypted PEM private key ({e})") from None
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if certs[0].public_key().public_bytes(serialization.Encoding.PEM, pub) != key_obj.public_key().public_bytes(
            serialization.Encoding.PEM, pub
        ):
            raise ConfigError(f"{self.key_path} is not the private key of the first certificate in {self.cert_path}")
        self.algorithm = _algorithm(key_obj, self.key_path)
        self.signer_name = certs[0].subject.rfc4514_string()
        self.expires = certs[0].not_valid_after_utc
        _check_dates(self.cert_path, certs[0].not_valid_before_utc, self.expires)
        c2pa = _c2pa()
        self._c2pa = c2pa
        info = c2pa.C2paSignerInfo(self.algorithm.encode(), chain, self.key_path.read_bytes(), None)
        self._signer = c2pa.Signer.from_info(info)
        self._settings = json.dumps(NO_THUMBNAIL)
        try:  # the certificate's fitness is only checked when signing: sign once now, so a bad one stops the start
            self._sign(_blank_png(), {"check": True}, "check.png")
        except c2pa.C2paError as e:
            raise ConfigError(
                f"C2PA refuses the certificate {self.cert_path} ({e}): it needs an end-entity certificate (not a CA) "
                "with the digitalSignature key usage, an extended key usage such as emailProtection or "
                "documentSigning, subject and authority key identifiers, and its issuers' certificates after it"
            ) from None

    def sign(self, png: bytes, record: dict, title: str = "image.png") -> bytes:
        """The PNG file `png` with a signed manifest: created by a generative model, the record as ASSERTION.
        CredentialsError when C2PA refuses to sign (the certificate expired since the start)."""
        try:
            return self._sign(png, record, title)
        except self._c2pa.C2paError as e:
            now = datetime.datetime.now(datetime.timezone.utc)
            why = f"it expired on {self.expires:%Y-%m-%d %H:%M} UTC; renew it" if now > self.expires else str(e)
            raise CredentialsError(f"content credentials could not be signed with {self.cert_path}: {why}") from None

    def _sign(self, png: bytes, record: dict, title: str) -> bytes:
        c2pa = self._c2pa
        manifest = {
            "claim_generator_info": [{"name": "ldmkit", "version": __version__}],
            "title": title,
            "format": "image/png",
            "assertions": [
                {
                    "label": "c2pa.actions",
                    "data": {
                        "actions": [
                            {
                                "action": "c2pa.created",
                                "digitalSourceType": GENERATED,
                                "softwareAgent": {"name": "ldmkit"},
                            }
                        ]
                    },
                },
                {"label": ASSERTION, "data": record},
            ],
        }
        context = c2pa.Context(c2pa.Settings.from_json(self._settings))
        out = io.BytesIO()
        with c2pa.Builder(manifest, context=context) as builder:
            builder.sign(self._signer, "image/png", io.BytesIO(png), out)
        return out.getvalue()


def _check_dates(path: Path, start: datetime.datetime, end: datetime.datetime) -> None:
    """Refuse a certificate outside its validity period, and warn of one that ends within RENEW_WARNING_DAYS."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if now > end:
        raise ConfigError(f"the certificate {path} expired on {end:%Y-%m-%d %H:%M} UTC; renew it")
    if now < start:
        raise ConfigError(f"the certificate {path} is not valid before {start:%Y-%m-%d %H:%M} UTC; check the clock")
    if end - now < datetime.timedelta(days=RENEW_WARNING_DAYS):
        warnings.warn(
            f"the content-credentials certificate {path} expires on {end:%Y-%m-%d %H:%M} UTC; renew it before then, "
            "or signing (and every request) fails from that moment",
            stacklevel=3,
        )


def credentials_from(cert: str | Path | None, key: str | Path | None, names: tuple[str, str]) -> Credentials | None:
    """The signer of the certificate chain `cert` and its key `key` as a setting gives them (None when neither
    is); names: how the two settings are spelled to the user (("serve.c2pa_cert", "serve.c2pa_key"), or the
    command's options), for the error when only one is given."""
    if not cert and not key:
        return None
    if not cert or not key:
        given, missing = names if cert else names[::-1]
        raise ConfigError(f"{given} is set but {missing} is not: content credentials need both")
    return Credentials(cert, key)


def file_signer(credentials: Credentials | None):
    """`credentials` as the image writers take a signer (data.images.Sign): the PNG's bytes and its metadata in,
    the signed bytes out, the generation record (the metadata's "ldmkit" entry) as the manifest's assertion."""
    if credentials is None:
        return None

    def sign(png: bytes, metadata: dict[str, str]) -> bytes:
        return credentials.sign(png, json.loads(metadata.get("ldmkit", "{}")))

    return sign


def _blank_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def read_credentials(data: bytes, image_format: str, trust: str | Path | None = None) -> dict | None:
    """The content credentials of an image file's bytes: {"state": "Trusted" | "Valid" | "Invalid", "signer",
    "issuer", "record" (the ldmkit assertion, or None), "failures": [validation codes]} ("Invalid" with an
    "unreadable: ..." failure for a manifest that cannot be parsed); None when the file has no manifest or
    c2pa-python is not installed (reading is optional; signing is not). `trust`: a PEM file of root certificates
    whose chains count as trusted."""
    try:
        import c2pa
    except ImportError:
        return None
    mime = MIME.get(image_format.upper())
    if mime is None:
        return None
    settings: dict = {}
    if trust is not None:
        path = Path(trust)
        if not path.is_file():
            raise MissingFileError(f"the trust anchors file {path} does not exist")
        settings = {"verify": {"verify_trust": True}, "trust": {"trust_anchors": path.read_text()}}
    try:
        context = c2pa.Context(c2pa.Settings.from_json(json.dumps(settings)))
        with c2pa.Reader(mime, io.BytesIO(data), context=context) as reader:
            store = json.loads(reader.json())
            state = reader.get_validation_state()
            results = reader.get_validation_results() or {}
    except c2pa.C2paError as e:
        if "ManifestNotFound" in type(e).__name__:
            return None
        # a damaged or forged manifest: report it, so that the record and the watermark can still be read
        return {"state": "Invalid", "signer": None, "issuer": None, "record": None, "failures": [f"unreadable: {e}"]}
    active = store.get("manifests", {}).get(store.get("active_manifest", ""), {})
    sig = active.get("signature_info", {})
    record = next((a.get("data") for a in active.get("assertions", []) if a.get("label") == ASSERTION), None)
    failures = [f["code"] for f in results.get("activeManifest", {}).get("failure", [])]
    return {
        "state": state,
        "signer": sig.get("common_name"),
        "issuer": sig.get("issuer"),
        "record": record,
        "failures": failures,
    }


def demo_certificates(folder: str | Path, signing_usage: bool = True, days: float = 30) -> tuple[Path, Path, Path]:
    """A throwaway root CA and a signing certificate it issued, for trying content credentials out (and for tests):
    `folder`/chain.pem (the signer, then the root), key.pem (the signer's EC P-256 key) and root.pem (to pass as
    --trust). Not for production: a deployment's certificate comes from its own CA. signing_usage=False leaves out
    the extended key usage that C2PA requires, which makes a certificate C2PA refuses."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ldmkit demo"),
            ]
        )

    def usage(**on) -> x509.KeyUsage:
        names = "digital_signature content_commitment key_encipherment data_encipherment key_agreement"
        names += " key_cert_sign crl_sign encipher_only decipher_only"
        return x509.KeyUsage(**{n: on.get(n, False) for n in names.split()})

    def certificate(subject, issuer, key, issuer_key, ca: bool, extra=()):
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        for ext in extra:
            b = b.add_extension(ext, critical=isinstance(ext, x509.KeyUsage))
        return b.sign(issuer_key, hashes.SHA256())

    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root_name = name("ldmkit demo root")
    root = certificate(
        root_name,
        root_name,
        root_key,
        root_key,
        True,
        [usage(digital_signature=True, key_cert_sign=True, crl_sign=True)],
    )
    extra = [usage(digital_signature=True), x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key())]
    if signing_usage:
        extra.append(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]))
    signer = certificate(name("ldmkit demo signer"), root_name, key, root_key, False, extra)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    paths = folder / "chain.pem", folder / "key.pem", folder / "root.pem"
    paths[0].write_bytes(signer.public_bytes(pem) + root.public_bytes(pem))
    paths[1].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    paths[1].chmod(0o600)
    paths[2].write_bytes(root.public_bytes(pem))
    return paths
