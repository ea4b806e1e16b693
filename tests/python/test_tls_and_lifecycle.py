"""TLS listener (1.2 and 1.3, generated dev CA, given PEM files) and process lifecycle."""

import signal
import socket
import ssl

import pytest

from conftest import Client


def tls_context(ca, version):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca))
    ctx.minimum_version = version
    ctx.maximum_version = version
    return ctx


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_versions(hub, client_factory, version):
    c = client_factory("tls-v", version=5, transport="tls", tls_context=tls_context(hub.ca, version))
    c.connect()
    assert c.c.socket().version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "edgehub-test"])
def test_generated_certificate_names(hub, name):
    ctx = ssl.create_default_context(cafile=str(hub.ca))
    with socket.create_connection(("127.0.0.1", hub.port("tls")), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname=name) as t:
            assert t.version() in ("TLSv1.2", "TLSv1.3")


def test_untrusted_name_rejected(hub):
    ctx = ssl.create_default_context(cafile=str(hub.ca))
    with socket.create_connection(("127.0.0.1", hub.port("tls")), timeout=5) as s:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(s, server_hostname="not-the-hub.example")


def test_dev_ca_reused_across_restarts(start_hub):
    first = start_hub(name="h")
    ca = first.ca.read_bytes()
    key = (first.data_dir / "tls" / "ca-key.pem")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    first.stop()
    second = start_hub(name="h")
    assert second.ca.read_bytes() == ca
    c = Client(second, "after-restart", transport="tls")
    c.connect()
    c.disconnect()


def test_given_certificate_files(start_hub):
    donor = start_hub(name="donor")
    tls_dir = donor.data_dir / "tls"
    hub = start_hub("--tls-cert", str(tls_dir / "server-cert.pem"),
                    "--tls-key", str(tls_dir / "server-key.pem"), name="given")
    assert not hub.ca.exists(), "no development CA when certificates are given"
    hub.ca = donor.ca  # clients trust the issuer of the given certificate
    c = Client(hub, "given", transport="tls")
    c.connect()
    c.disconnect()


def test_bad_certificate_file_is_a_clear_error(binary, tmp_path):
    import subprocess
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a pem file")
    r = subprocess.run([binary, "--data-dir", str(tmp_path / "d"), "--mqtts-listen", "127.0.0.1:0",
                        "--tls-cert", str(bogus), "--tls-key", str(bogus)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "bogus.pem" in r.stderr and "certificate" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_signal_disconnects_clients_and_exits_cleanly(hub, sig):
    c = Client(hub, "bye", version=5)
    c.connect()
    assert hub.stop(sig) == 0
    rc, _ = c.disconnects.get(timeout=5)
    assert rc.value == 0x8B  # Server shutting down
    c.c.loop_stop()


def test_help_documents_flags(binary):
    import subprocess
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ["--data-dir", "--mqtt-listen", "--mqtts-listen", "--tls-cert", "--tls-key",
                 "--allow-anonymous", "--log", "EDGEHUB_DATA_DIR"]:
        assert flag in out
