//! The authentication/authorization seam. The broker core asks these traits
//! and knows nothing of SAS tokens or IoT Hub topics; the IoT Hub layer plugs
//! its registry in here. They are synchronous on purpose: the decision must be
//! cheap (an HMAC, a registry lookup in memory) because it sits on the CONNECT
//! and SUBSCRIBE paths.

use std::net::SocketAddr;
use std::sync::Arc;

use edgehub_codec::Protocol;
use rustls_pki_types::CertificateDer;

/// What a client presented in CONNECT and on the transport.
pub struct ConnectInfo<'a> {
    pub protocol: Protocol,
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub peer: SocketAddr,
    /// The TLS client certificate chain, leaf first, when one was presented.
    pub peer_certificates: Option<&'a [CertificateDer<'static>]>,
}

/// Who a connection authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Identity name (`device` or `device/module` once the IoT Hub layer is in).
    pub name: Arc<str>,
    pub anonymous: bool,
    /// When the credentials stop being valid (unix seconds, skew included):
    /// the connection is closed then, as IoT Hub does with expired tokens.
    pub valid_until: Option<u64>,
}

/// Why a CONNECT is refused. The message is logged, never sent: it may say
/// more than a client should learn.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// CONNACK 0x87 / return code 5.
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    /// CONNACK 0x86 / return code 4.
    #[error("bad user name or password: {0}")]
    BadCredentials(String),
    /// CONNACK 0x88 / return code 3.
    #[error("server unavailable: {0}")]
    Unavailable(String),
}

pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> Result<Principal, AuthError>;
}

pub trait Authorizer: Send + Sync + 'static {
    fn may_publish(&self, who: &Principal, topic: &str) -> bool;
    fn may_subscribe(&self, who: &Principal, filter: &str) -> bool;
}

/// `--allow-anonymous`: a development switch. Anyone connects, any topic.
pub struct AllowAnonymous;

impl Authenticator for AllowAnonymous {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> Result<Principal, AuthError> {
        Ok(Principal {
            name: info.client_id.into(),
            anonymous: true,
            valid_until: None,
        })
    }
}

impl Authorizer for AllowAnonymous {
    fn may_publish(&self, _: &Principal, _: &str) -> bool {
        true
    }
    fn may_subscribe(&self, _: &Principal, _: &str) -> bool {
        true
    }
}

/// The default until an identity registry is plugged in: nobody may connect.
/// Clients without credentials hear "not authorized"; clients with credentials
/// hear "bad user name or password", since there is nothing to check them against.
pub struct DenyAll;

impl Authenticator for DenyAll {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> Result<Principal, AuthError> {
        if info.username.is_none() && info.password.is_none() {
            Err(AuthError::NotAuthorized(
                "anonymous clients are refused (start with --allow-anonymous to allow them)".into(),
            ))
        } else {
            Err(AuthError::BadCredentials(
                "no identity registry is configured to check credentials against".into(),
            ))
        }
    }
}

impl Authorizer for DenyAll {
    fn may_publish(&self, _: &Principal, _: &str) -> bool {
        false
    }
    fn may_subscribe(&self, _: &Principal, _: &str) -> bool {
        false
    }
}
