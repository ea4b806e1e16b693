//! X.509 device authentication: what IoT Hub checks of a TLS client
//! certificate. Self-signed devices are matched by the SHA-1 or SHA-256
//! thumbprint of their certificate; CA-signed devices by a chain to the
//! configured trust bundle (`--trust-bundle`) and a subject CN equal to the
//! device id. Either way the certificate must be within its validity. The
//! TLS layer has already checked that the client holds the private key.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::Digest;

/// What the identity layer needs to know of a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: Option<String>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Lower-case hex.
    pub sha1: String,
    pub sha256: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The subject attribute commonName (2.5.4.3).
const COMMON_NAME: x509_cert::der::asn1::ObjectIdentifier =
    x509_cert::der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");

/// Parses a DER certificate.
pub fn inspect(der: &[u8]) -> Result<CertInfo, String> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der)
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    let tbs = &cert.tbs_certificate;
    // UTF8String, PrintableString and IA5String all hold the text itself.
    let common_name = tbs
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == COMMON_NAME)
        .and_then(|atv| std::str::from_utf8(atv.value.value()).ok())
        .map(str::to_owned);
    let secs = |t: &x509_cert::time::Time| t.to_unix_duration().as_secs() as i64;
    Ok(CertInfo {
        common_name,
        not_before: secs(&tbs.validity.not_before),
        not_after: secs(&tbs.validity.not_after),
        sha1: hex(&sha1::Sha1::digest(der)),
        sha256: hex(&sha2::Sha256::digest(der)),
    })
}

impl CertInfo {
    /// `Err` with the reason when `now` (unix seconds) is outside validity.
    pub fn check_validity(&self, now: i64) -> Result<(), String> {
        if now < self.not_before {
            return Err("client certificate is not yet valid".into());
        }
        if now > self.not_after {
            return Err("client certificate has expired".into());
        }
        Ok(())
    }

    pub fn has_thumbprint(&self, thumbprint: &str) -> bool {
        thumbprint == self.sha1 || thumbprint == self.sha256
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrustBundleError {
    #[error("trust bundle {path}: {detail}")]
    Invalid { path: String, detail: String },
}

/// The CAs that may vouch for CA-signed devices.
#[derive(Debug, Default)]
pub struct TrustBundle {
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Every certificate in a PEM file.
    pub fn load(path: &Path) -> Result<TrustBundle, TrustBundleError> {
        let bad = |detail: String| TrustBundleError::Invalid {
            path: path.display().to_string(),
            detail,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no certificate in it".into()));
        }
        let anchors = certs
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| bad(format!("not a usable CA certificate: {e:?}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustBundle { anchors })
    }

    /// Checks that `chain` (leaf first) leads to one of our CAs and is fit
    /// for TLS client authentication at `now`.
    pub fn verify(&self, chain: &[CertificateDer<'static>], now: UnixTime) -> Result<(), String> {
        let Some(leaf) = chain.first() else {
            return Err("no client certificate".into());
        };
        if self.anchors.is_empty() {
            return Err(
                "no trust bundle is configured (--trust-bundle) for CA-signed devices".into(),
            );
        }
        let cert = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| format!("client certificate unusable: {e:?}"))?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            &chain[1..],
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(drop)
        .map_err(|e| format!("client certificate does not chain to the trust bundle: {e:?}"))
    }
}
