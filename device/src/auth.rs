//! Authentication verdicts for IoT Hub identities, whatever protocol
//! carried the credentials: a SAS token for a device or module (MQTT
//! CONNECT password, AMQP CBS `put-token` or SASL PLAIN), an X.509 client
//! certificate chain from the TLS handshake, or a child edge hub acting for
//! one of its descendants (IoT Edge's `auth-chain`).
//!
//! Owns: which credential proves which identity, and until when. Must not
//! touch: where the credentials came from (usernames, client ids and
//! addresses are the heads' business) or what an identity may then do.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;

use crate::identity::{Identities, Registry, X509Spec};
use crate::sas::{SasToken, EXPIRY_SKEW_SECS};
use crate::x509::TrustBundle;

/// Why a credential proves nothing. The reason is for the log: it may say
/// more than a client should learn (every head answers "not authorized").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// An identity proven by a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// `device` or `device/module`, as registered.
    pub identity: Arc<str>,
    /// Unix seconds (skew included) when the credential stops being valid:
    /// the head closes the link then, as IoT Hub does.
    pub valid_until: u64,
}

/// Checks credentials against the identity registry.
pub struct Authentication {
    identities: Arc<Identities>,
    /// CAs for CA-signed X.509 devices.
    trust_bundle: Arc<TrustBundle>,
    /// Our host name; the IoT Hub's comes from the registry.
    gateway_hostname: String,
    /// This hub's own edge device id: auth chains end here.
    own_device: Option<String>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn parse_token(token: &str) -> Result<SasToken, Refused> {
    SasToken::parse(token).map_err(|e| Refused(e.to_string()))
}

/// `device` or `device/module`.
pub fn split_identity(s: &str) -> Option<(&str, Option<&str>)> {
    let mut it = s.split('/');
    let d = it.next().filter(|d| !d.is_empty())?;
    let m = it.next();
    if it.next().is_some() || m.is_some_and(str::is_empty) {
        return None;
    }
    Some((d, m))
}

impl Authentication {
    pub fn new(identities: Arc<Identities>, gateway_hostname: &str) -> Authentication {
        Authentication {
            identities,
            trust_bundle: Arc::default(),
            gateway_hostname: gateway_hostname.to_owned(),
            own_device: None,
        }
    }

    /// This hub's own edge device id (where auth chains end).
    pub fn with_own_device(mut self, device: Option<String>) -> Authentication {
        self.own_device = device;
        self
    }

    /// CAs that may vouch for CA-signed X.509 devices.
    pub fn with_trust_bundle(mut self, bundle: TrustBundle) -> Authentication {
        self.trust_bundle = Arc::new(bundle);
        self
    }

    pub fn identities(&self) -> &Arc<Identities> {
        &self.identities
    }

    /// A host a token or username may name: ours or the IoT Hub's.
    pub fn known_host(&self, registry: &Registry, h: &str) -> bool {
        h.eq_ignore_ascii_case(&self.gateway_hostname)
            || registry
                .iothub_hostname
                .as_deref()
                .is_some_and(|k| k.eq_ignore_ascii_case(h))
    }

    /// `device` or `device/module` by a SAS token for its own resource
    /// (`{host}/devices/{d}[/modules/{m}]`, host this gateway or its IoT
    /// Hub), signed with one of its keys (a module may also sign with its
    /// device's). `None`: no token was presented.
    pub fn sas(
        &self,
        device: &str,
        module: Option<&str>,
        token: Option<&str>,
    ) -> Result<Authenticated, Refused> {
        let registry = self.identities.registry();
        let Some(dev) = registry.device(device) else {
            return Err(Refused(format!("unknown device {device:?}")));
        };
        if module.is_none() && dev.x509.is_some() {
            return Err(Refused(format!(
                "device {} authenticates with an X.509 client certificate, not a SAS token",
                dev.id
            )));
        }
        let (name, mut keys) = match module {
            None => (dev.id.clone(), dev.keys.all()),
            Some(m) => match dev.modules.get(&m.to_lowercase()) {
                Some((mid, k)) => (format!("{}/{mid}", dev.id), k.all()),
                None => return Err(Refused(format!("unknown module {device}/{m}"))),
            },
        };
        if module.is_some() {
            keys.extend(dev.keys.all());
        }
        let Some(token) = token else {
            return Err(Refused(
                "no SAS token in the password and no client certificate".into(),
            ));
        };
        let token = parse_token(token)?;
        let sr: Vec<&str> = token.resource.split('/').collect();
        let sr_ok = match sr.as_slice() {
            [h, "devices", d] => {
                self.known_host(&registry, h) && same(d, device) && module.is_none()
            }
            [h, "devices", d, "modules", m] => {
                self.known_host(&registry, h)
                    && same(d, device)
                    && module.is_some_and(|mm| same(m, mm))
            }
            _ => false,
        };
        if !sr_ok {
            return Err(Refused(format!(
                "token resource {:?} is not this identity on this gateway or its IoT Hub",
                token.resource
            )));
        }
        token
            .check_expiry(now())
            .map_err(|e| Refused(e.to_string()))?;
        token.verify(&keys).map_err(|e| Refused(e.to_string()))?;
        Ok(Authenticated {
            identity: name.into(),
            valid_until: token.expiry + EXPIRY_SKEW_SECS,
        })
    }

    /// A device by the client certificate chain (leaf first) it presented
    /// in the TLS handshake: self-signed by thumbprint, CA-signed by the
    /// trust bundle with the device id as subject CN. Modules never
    /// authenticate this way.
    pub fn x509(
        &self,
        device: &str,
        chain: &[CertificateDer<'static>],
    ) -> Result<Authenticated, Refused> {
        let registry = self.identities.registry();
        let Some(dev) = registry.device(device) else {
            return Err(Refused(format!("unknown device {device:?}")));
        };
        let refuse = |why: String| Err(Refused(format!("device {}: {why}", dev.id)));
        let Some(x509) = &dev.x509 else {
            return refuse("authenticates with a SAS token, not a client certificate".into());
        };
        let Some(leaf) = chain.first() else {
            return refuse("presented no client certificate".into());
        };
        let info = match crate::x509::inspect(leaf) {
            Ok(i) => i,
            Err(e) => return refuse(e),
        };
        let now = now() as i64;
        if let Err(e) = info.check_validity(now) {
            return refuse(e);
        }
        match x509 {
            X509Spec::SelfSigned {
                primary_thumbprint,
                secondary_thumbprint,
            } => {
                let known = std::iter::once(primary_thumbprint).chain(secondary_thumbprint);
                if !known.into_iter().any(|t| info.has_thumbprint(t)) {
                    return refuse(format!(
                        "certificate thumbprint (SHA-1 {}, SHA-256 {}) is neither of the registered ones",
                        info.sha1, info.sha256
                    ));
                }
            }
            X509Spec::CertificateAuthority => {
                if !info
                    .common_name
                    .as_deref()
                    .is_some_and(|cn| same(cn, &dev.id))
                {
                    return refuse(format!(
                        "certificate subject CN {:?} is not the device id",
                        info.common_name.as_deref().unwrap_or("")
                    ));
                }
                let t = rustls_pki_types::UnixTime::since_unix_epoch(
                    std::time::Duration::from_secs(now.max(0) as u64),
                );
                if let Err(e) = self.trust_bundle.verify(chain, t) {
                    return refuse(e);
                }
            }
        }
        Ok(Authenticated {
            identity: dev.id.as_str().into(),
            // Closed when the certificate expires, like a token.
            valid_until: info.not_after.max(0) as u64,
        })
    }

    /// A child edge hub acting for `leaf` (IoT Edge's nested scheme):
    /// `chain` is `leaf;child[;…;parent]`, the token is the child's own
    /// (signed with its key, for its own resource). Accepted only when, in
    /// our registry, the leaf sits under the child (or is one of the
    /// child's modules), every edge device in the chain is registered under
    /// the next one, and the chain ends at this hub (our own device id) or
    /// at a top-level edge device of our registry. So the parent needs no
    /// leaf keys, and a child can act only for its own descendants.
    pub fn chain(
        &self,
        client: (&str, Option<&str>),
        chain: &str,
        token: Option<&str>,
    ) -> Result<Authenticated, Refused> {
        let registry = self.identities.registry();
        let refuse = |why: String| Err(Refused(format!("auth-chain {chain:?}: {why}")));
        let links: Vec<&str> = chain.split(';').collect();
        if links.len() < 2 || links.iter().any(|l| l.is_empty()) {
            return refuse("needs at least leaf;edge".into());
        }
        let Some((leaf_device, leaf_module)) = split_identity(links[0]) else {
            return refuse("leaf is not deviceId or deviceId/moduleId".into());
        };
        if !same(leaf_device, client.0)
            || leaf_module.map(str::to_lowercase) != client.1.map(str::to_lowercase)
        {
            return refuse(format!("leaf {:?} is not the client", links[0]));
        }
        let Some(leaf) = registry.device(leaf_device) else {
            return refuse(format!("unknown device {leaf_device:?}"));
        };
        let name = match leaf_module {
            None => leaf.id.clone(),
            Some(m) => match leaf.modules.get(&m.to_lowercase()) {
                Some((mid, _)) => format!("{}/{mid}", leaf.id),
                None => return refuse(format!("unknown module {leaf_device}/{m}")),
            },
        };
        let actor_id = links[1];
        let Some(actor) = registry.device(actor_id) else {
            return refuse(format!("unknown edge device {actor_id:?}"));
        };
        if !actor.edge {
            return refuse(format!("{:?} is not an edge device", actor.id));
        }
        let under_actor =
            same(&leaf.id, &actor.id) || leaf.parent.as_deref().is_some_and(|p| same(p, &actor.id));
        if !under_actor {
            return refuse(format!(
                "{:?} is not registered under {:?}",
                leaf.id, actor.id
            ));
        }
        for pair in links[1..].windows(2) {
            let (child, parent) = (pair[0], pair[1]);
            let c = registry.device(child).filter(|d| d.edge);
            if !c.is_some_and(|c| c.parent.as_deref().is_some_and(|p| same(p, parent))) {
                return refuse(format!(
                    "{child:?} is not an edge device registered under {parent:?}"
                ));
            }
        }
        let last = links[links.len() - 1];
        // The chain may name this hub last, or stop at its child (whose
        // parent is then this hub), or at a top-level edge device when this
        // hub has no device id of its own (it is the root, as IoT Hub is).
        let ends_here = self.own_device.as_deref().is_some_and(|own| {
            same(last, own)
                || registry
                    .device(last)
                    .and_then(|d| d.parent.as_deref())
                    .is_some_and(|p| same(p, own))
        }) || (self.own_device.is_none()
            && registry
                .device(last)
                .is_some_and(|d| d.edge && d.parent.is_none()));
        if !ends_here {
            return refuse(format!("chain ends at {last:?}, not at this hub"));
        }
        let Some(token) = token else {
            return refuse("no SAS token of the acting edge device".into());
        };
        let token = parse_token(token)?;
        let sr: Vec<&str> = token.resource.split('/').collect();
        let sr_ok = matches!(sr.as_slice(), [h, "devices", d]
            if self.known_host(&registry, h) && same(d, &actor.id));
        if !sr_ok {
            return Err(Refused(format!(
                "auth-chain token resource {:?} is not edge device {:?} on this gateway or its IoT Hub",
                token.resource, actor.id
            )));
        }
        token
            .check_expiry(now())
            .map_err(|e| Refused(e.to_string()))?;
        token
            .verify(&actor.keys.all())
            .map_err(|e| Refused(e.to_string()))?;
        Ok(Authenticated {
            identity: name.into(),
            valid_until: token.expiry + EXPIRY_SKEW_SECS,
        })
    }
}
