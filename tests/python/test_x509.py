"""X.509 device authentication over TLS with paho: self-signed certificates
matched by SHA-1 or SHA-256 thumbprint, CA-signed certificates chained to the
trust bundle with CN = device id; refusals say why in the log."""

import base64
import json
import ssl

import pytest

import certs
from conftest import Client

GATEWAY = "edgehub-test"


def x509_client(hub, device, cert_key, client_id=None):
    ctx = ssl.create_default_context(cafile=str(hub.ca))
    ctx.load_cert_chain(str(cert_key[0]), str(cert_key[1]))
    return Client(hub, client_id or device, version=5, transport="tls",
                  username=f"{GATEWAY}/{client_id or device}/?api-version=2021-04-12",
                  password=None, tls_context=ctx)


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    ca = certs.make_cert("device CA", ca=True)
    other_ca = certs.make_cert("someone else's CA", ca=True)
    return {"dir": d, "ca": ca, "other_ca": other_ca, "bundle": certs.write(d, "bundle", *ca)[0]}


def test_self_signed_device_by_thumbprint(start_hub, pki):
    hub = start_hub(allow_anonymous=False)
    cert, key = certs.make_cert("thermo-1")
    second, second_key = certs.make_cert("thermo-1")
    files = certs.write(pki["dir"], "thermo", cert, key)
    files2 = certs.write(pki["dir"], "thermo2", second, second_key)
    reg = hub.api("PUT", "/devices/thermo-1", {"deviceId": "thermo-1", "authentication": {
        "type": "selfSigned",
        "x509Thumbprint": {"primaryThumbprint": certs.thumbprint(cert, "sha256"),
                           "secondaryThumbprint": certs.thumbprint(second, "sha1")}}})
    assert reg["authentication"]["type"] == "selfSigned"
    assert "x509=true" in reg["connectionString"]

    for f in (files, files2):  # primary by SHA-256, secondary by SHA-1
        c = x509_client(hub, "thermo-1", f)
        c.connect()
        c.publish("devices/thermo-1/messages/events/kind=x509", b"21.5", qos=1)
        c.disconnect()
    out = hub.outbox()
    assert [base64.b64decode(m["body"]) for m in out] == [b"21.5", b"21.5"]
    assert {m["system_properties"]["connectionDeviceId"] for m in out} == {"thermo-1"}

    stranger = certs.write(pki["dir"], "stranger", *certs.make_cert("thermo-1"))
    rc, _, _ = x509_client(hub, "thermo-1", stranger).connect(expect_success=False)
    assert rc.value == 0x87
    assert "neither of the registered" in hub.log()

    expired_cert, expired_key = certs.make_cert("thermo-2", valid_days=(-10, -1))
    hub.api("PUT", "/devices/thermo-2", {"authentication": {
        "type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": certs.thumbprint(expired_cert)}}})
    rc, _, _ = x509_client(hub, "thermo-2", certs.write(pki["dir"], "expired", expired_cert, expired_key)) \
        .connect(expect_success=False)
    assert rc.value == 0x87
    assert "certificate has expired" in hub.log()


def test_ca_signed_device_needs_the_trust_bundle_and_its_own_cn(start_hub, pki):
    hub = start_hub("--trust-bundle", str(pki["bundle"]), allow_anonymous=False)
    hub.api("PUT", "/devices/cam-7", {"authentication": {"type": "certificateAuthority"}})
    good = certs.write(pki["dir"], "cam7", *certs.make_cert("cam-7", issuer=pki["ca"]))
    c = x509_client(hub, "cam-7", good)
    c.connect()
    c.publish("devices/cam-7/messages/events/", b"frame", qos=1)
    c.disconnect()
    assert hub.outbox()[0]["system_properties"]["connectionDeviceId"] == "cam-7"

    # Signed by our CA but for another device name.
    wrong_cn = certs.write(pki["dir"], "cam8", *certs.make_cert("cam-8", issuer=pki["ca"]))
    rc, _, _ = x509_client(hub, "cam-7", wrong_cn).connect(expect_success=False)
    assert rc.value == 0x87
    assert 'subject CN "cam-8" is not the device id' in hub.log()
    # Right name, wrong CA.
    foreign = certs.write(pki["dir"], "foreign", *certs.make_cert("cam-7", issuer=pki["other_ca"]))
    rc, _, _ = x509_client(hub, "cam-7", foreign).connect(expect_success=False)
    assert rc.value == 0x87
    assert "does not chain to the trust bundle" in hub.log()


def test_certificates_are_not_for_modules_or_key_devices(start_hub, pki):
    hub = start_hub(allow_anonymous=False)
    dev = hub.api("PUT", "/devices/keyed", {})
    assert dev["authentication"]["type"] == "sas"
    hub.api("PUT", "/devices/keyed/modules/m1", {})
    files = certs.write(pki["dir"], "k", *certs.make_cert("keyed"))
    rc, _, _ = x509_client(hub, "keyed", files).connect(expect_success=False)
    assert rc.value == 0x87
    assert "authenticates with a SAS token, not a client certificate" in hub.log()
    rc, _, _ = x509_client(hub, "keyed", files, client_id="keyed/m1").connect(expect_success=False)
    assert rc.value == 0x87
    assert "modules authenticate with SAS tokens only" in hub.log()


def test_registry_api_refuses_bad_x509_entries(start_hub):
    import urllib.error
    hub = start_hub(allow_anonymous=False)
    for body, why in [
        ({"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "abc"}}},
         "not 40 (SHA-1) or 64 (SHA-256) hex digits"),
        ({"authentication": {"type": "selfSigned"}}, "needs x509Thumbprint.primaryThumbprint"),
        ({"authentication": {"type": "magic"}}, "not one of sas, selfSigned, certificateAuthority"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as e:
            hub.api("PUT", "/devices/d1", body)
        assert e.value.code == 400
        assert why in json.loads(e.value.read())["error"]
    hub.api("PUT", "/devices/d1", {})
    with pytest.raises(urllib.error.HTTPError) as e:
        hub.api("PUT", "/devices/d1/modules/m", {"authentication": {"type": "certificateAuthority"}})
    assert e.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as e:
        hub.api("PUT", "/devices/ghost/modules/m", {})
    assert e.value.code == 404
