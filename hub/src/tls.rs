//! TLS server configuration: the given PEM files, or a development CA and
//! server certificate generated into the data dir on first start.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: no usable {what} in PEM file: {detail}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("generating development certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Paths of the development PKI inside a data dir.
pub struct DevPki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    names: PathBuf,
}

impl DevPki {
    pub fn in_dir(data_dir: &Path) -> DevPki {
        let tls = data_dir.join("tls");
        DevPki {
            ca_cert: data_dir.join("ca.pem"),
            ca_key: tls.join("ca-key.pem"),
            server_cert: tls.join("server-cert.pem"),
            server_key: tls.join("server-key.pem"),
            names: tls.join("server-names"),
        }
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "edgehub development CA");
    dn.push(DnType::OrganizationName, "edgehub");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // Long-lived on purpose: this CA exists for development only.
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2049, 12, 31);
    p
}

fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))
}

/// Makes sure the development CA and a server certificate for `hostname`
/// exist in `data_dir`. The CA is created once and kept; the server
/// certificate is re-issued (by the same CA) when the host name changes.
pub fn ensure_dev_pki(data_dir: &Path, hostname: &str) -> Result<DevPki, TlsError> {
    let pki = DevPki::in_dir(data_dir);
    let tls_dir = pki.ca_key.parent().expect("has parent");
    fs::create_dir_all(tls_dir).map_err(io_err(tls_dir))?;

    let ca_key = if pki.ca_key.exists() && pki.ca_cert.exists() {
        let pem = fs::read_to_string(&pki.ca_key).map_err(io_err(&pki.ca_key))?;
        KeyPair::from_pem(&pem)?
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        write_private(&pki.ca_key, &key.serialize_pem())?;
        fs::write(&pki.ca_cert, cert.pem()).map_err(io_err(&pki.ca_cert))?;
        tracing::info!(ca = %pki.ca_cert.display(), "generated development CA");
        // A new CA invalidates any older server certificate.
        let _ = fs::remove_file(&pki.names);
        key
    };

    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if !names.iter().any(|n| n == hostname) {
        names.push(hostname.to_owned());
    }
    let names_line = names.join(",");
    let current = fs::read_to_string(&pki.names).unwrap_or_default();
    if current.trim() != names_line || !pki.server_cert.exists() || !pki.server_key.exists() {
        // Re-creating the CA certificate from the stored key and the fixed
        // subject gives the same issuer name and key, so the new server
        // certificate chains to the ca.pem clients already trust.
        let ca = ca_params().self_signed(&ca_key)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, hostname);
        p.distinguished_name = dn;
        for n in &names {
            p.subject_alt_names.push(match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into()?),
            });
        }
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        let ca_pem = fs::read_to_string(&pki.ca_cert).map_err(io_err(&pki.ca_cert))?;
        write_private(&pki.server_key, &key.serialize_pem())?;
        fs::write(&pki.server_cert, format!("{}{}", cert.pem(), ca_pem))
            .map_err(io_err(&pki.server_cert))?;
        fs::write(&pki.names, &names_line).map_err(io_err(&pki.names))?;
        tracing::info!(names = %names_line, "issued development server certificate");
    }
    Ok(pki)
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
            detail: "file holds no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: "private key",
        detail: e.to_string(),
    })
}

/// A rustls server config (TLS 1.2 and 1.3, ring provider) from PEM files.
/// Client certificates are asked for but optional (SAS clients send none).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(ClientCertToIdentityLayer {
        algorithms: provider.signature_verification_algorithms,
    });
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

/// Accepts any client certificate whose owner proves possession of its
/// private key (the handshake signature is verified here), and leaves the
/// decision about the certificate itself to the IoT Hub identity layer.
/// Why not rustls' WebPKI verifier: self-signed device certificates are
/// matched by thumbprint and chain to nothing, and which CA may vouch for a
/// device depends on the device's registry entry, known only at CONNECT.
#[derive(Debug)]
struct ClientCertToIdentityLayer {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for ClientCertToIdentityLayer {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
