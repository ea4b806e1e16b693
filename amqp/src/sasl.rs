//! SASL as IoT Hub's AMQP endpoint offers it: `PLAIN` with a SAS token as
//! the password (the identity proven at once), `ANONYMOUS` and `MSSBCBS`
//! (the identity comes later, over CBS, or from the TLS client
//! certificate).
//!
//! fe2o3's SASL hook is synchronous and hands no identity back, so each
//! connection gets its own acceptor writing its verdict into a shared slot
//! the connection reads once SASL is done. A SAS check is an HMAC: cheap
//! enough to run inline.

use std::sync::Arc;

use edgehub_device::auth::{Authenticated, Authentication};
use fe2o3_amqp::acceptor::sasl_acceptor::{SaslAcceptor, SaslServerFrame};
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use parking_lot::Mutex;
use tracing::info;

/// What a connection proved in SASL.
#[derive(Debug, Clone, Default)]
pub struct SaslVerdict {
    /// PLAIN: the identity and until when its token holds.
    pub identity: Option<Authenticated>,
    pub mechanism: Option<String>,
}

#[derive(Clone)]
pub struct HubSasl {
    auth: Arc<Authentication>,
    peer: std::net::SocketAddr,
    pub verdict: Arc<Mutex<SaslVerdict>>,
}

impl std::fmt::Debug for HubSasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSasl").field("peer", &self.peer).finish()
    }
}

impl HubSasl {
    pub fn new(auth: Arc<Authentication>, peer: std::net::SocketAddr) -> HubSasl {
        HubSasl {
            auth,
            peer,
            verdict: Arc::default(),
        }
    }
}

/// `<device>@sas.<hub>` or `<device>/modules/<module>@sas.<hub>` (the
/// `sas.` part optional, ids URL-encoded) → (device, module).
pub fn plain_identity(username: &str) -> Option<(String, Option<String>)> {
    let (who, _hub) = username.rsplit_once('@')?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
            .filter(|s| !s.is_empty())
    };
    match who.split_once("/modules/") {
        Some((d, m)) => Some((decode(d)?, Some(decode(m)?))),
        None if !who.contains('/') => Some((decode(who)?, None)),
        None => None,
    }
}

fn outcome(code: SaslCode) -> SaslServerFrame {
    SaslServerFrame::Outcome(SaslOutcome {
        code,
        additional_data: None,
    })
}

impl SaslAcceptor for HubSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![
            Symbol::from("PLAIN"),
            Symbol::from("ANONYMOUS"),
            Symbol::from("MSSBCBS"),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let mechanism = init.mechanism.0.clone();
        self.verdict.lock().mechanism = Some(mechanism.clone());
        match mechanism.as_str() {
            "ANONYMOUS" | "MSSBCBS" => outcome(SaslCode::Ok),
            "PLAIN" => {
                let response = init
                    .initial_response
                    .map(|b| b.into_vec())
                    .unwrap_or_default();
                let mut parts = response.split(|b| *b == 0);
                let (_authzid, user, pass) = (parts.next(), parts.next(), parts.next());
                let (Some(user), Some(pass)) = (user, pass) else {
                    info!(peer = %self.peer, "AMQP SASL PLAIN refused: malformed response");
                    return outcome(SaslCode::Auth);
                };
                let user = String::from_utf8_lossy(user);
                let Some((device, module)) = plain_identity(&user) else {
                    info!(peer = %self.peer, user = %user, "AMQP SASL PLAIN refused: user name is not <device>[/modules/<module>]@sas.<hub>");
                    return outcome(SaslCode::Auth);
                };
                let token = String::from_utf8_lossy(pass);
                match self.auth.sas(&device, module.as_deref(), Some(&token)) {
                    Ok(a) => {
                        self.verdict.lock().identity = Some(a);
                        outcome(SaslCode::Ok)
                    }
                    Err(e) => {
                        info!(peer = %self.peer, user = %user, reason = %e, "AMQP SASL PLAIN refused");
                        outcome(SaslCode::Auth)
                    }
                }
            }
            other => {
                info!(peer = %self.peer, mechanism = other, "AMQP SASL mechanism not offered");
                outcome(SaslCode::Auth)
            }
        }
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // No mechanism offered here has a challenge.
        outcome(SaslCode::Auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_user_names() {
        assert_eq!(
            plain_identity("dev1@sas.myhub"),
            Some(("dev1".into(), None))
        );
        assert_eq!(
            plain_identity("dev%201/modules/filter@sas.myhub"),
            Some(("dev 1".into(), Some("filter".into())))
        );
        assert_eq!(plain_identity("dev1@myhub"), Some(("dev1".into(), None)));
        for bad in ["dev1", "@sas.hub", "a/b@sas.hub", "d/modules/@sas.hub"] {
            assert_eq!(plain_identity(bad), None, "{bad}");
        }
    }
}
