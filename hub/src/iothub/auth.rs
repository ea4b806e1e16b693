//! MQTT CONNECT authentication and topic authorization for IoT Hub identities.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::auth::{AuthError, Authenticator, Authorizer, ConnectInfo, Principal};

use super::identity::{Identities, Registry, X509Spec};
use super::sas::SasToken;
use super::x509::TrustBundle;

/// Authenticates devices and modules by SAS token and confines each to its
/// own IoT Hub topics. With `allow_anonymous`, clients that present no
/// credentials are still let in for generic topics (development only).
pub struct IotHubAuth {
    identities: Arc<Identities>,
    /// CAs for CA-signed X.509 devices.
    trust_bundle: Arc<TrustBundle>,
    /// Our host name; the IoT Hub's comes from the registry.
    gateway_hostname: String,
    allow_anonymous: bool,
    /// `--device-id`: the edge device this hub is; auth chains end here.
    own_device: Option<String>,
}

impl IotHubAuth {
    pub fn new(
        identities: Arc<Identities>,
        gateway_hostname: &str,
        allow_anonymous: bool,
    ) -> IotHubAuth {
        IotHubAuth {
            identities,
            trust_bundle: Arc::default(),
            gateway_hostname: gateway_hostname.to_owned(),
            allow_anonymous,
            own_device: None,
        }
    }

    /// This hub's own edge device id (where auth chains end).
    pub fn with_own_device(mut self, device: Option<String>) -> IotHubAuth {
        self.own_device = device;
        self
    }

    /// A child edge hub acting for `leaf` (IoT Edge's nested scheme): the
    /// username carries `auth-chain=leaf;child[;…;parent]`, the token is the
    /// child's own (signed with its key, for its own resource). Accepted
    /// only when, in our registry, the leaf sits under the child (or is one
    /// of the child's modules), every edge device in the chain is registered
    /// under the next one, and the chain ends at this hub (our `--device-id`)
    /// or at a top-level edge device of our registry. So the parent needs
    /// no leaf keys, and a child can act only for its own descendants.
    fn authenticate_chain(
        &self,
        registry: &Registry,
        client: (&str, Option<&str>),
        chain: &str,
        password: Option<&[u8]>,
    ) -> Result<Principal, AuthError> {
        let refuse = |why: String| {
            Err(AuthError::NotAuthorized(format!(
                "auth-chain {chain:?}: {why}"
            )))
        };
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
        let Some(password) = password else {
            return refuse("no SAS token of the acting edge device".into());
        };
        let token = parse_token(password)?;
        let sr: Vec<&str> = token.resource.split('/').collect();
        let sr_ok = matches!(sr.as_slice(), [h, "devices", d]
            if self.known_host(registry, h) && same(d, &actor.id));
        if !sr_ok {
            return Err(AuthError::NotAuthorized(format!(
                "auth-chain token resource {:?} is not edge device {:?} on this gateway or its IoT Hub",
                token.resource, actor.id
            )));
        }
        token
            .check_expiry(now())
            .map_err(|e| AuthError::NotAuthorized(e.to_string()))?;
        token
            .verify(&actor.keys.all())
            .map_err(|e| AuthError::NotAuthorized(e.to_string()))?;
        Ok(Principal {
            name: name.into(),
            anonymous: false,
            valid_until: Some(token.expiry + super::sas::EXPIRY_SKEW_SECS),
        })
    }

    /// CAs that may vouch for CA-signed X.509 devices.
    pub fn with_trust_bundle(mut self, bundle: TrustBundle) -> IotHubAuth {
        self.trust_bundle = Arc::new(bundle);
        self
    }

    /// A device presenting a TLS client certificate and no token.
    fn authenticate_x509(
        &self,
        dev: &super::identity::Device,
        chain: &[rustls_pki_types::CertificateDer<'static>],
    ) -> Result<Principal, AuthError> {
        let refuse = |why: String| {
            Err(AuthError::NotAuthorized(format!(
                "device {}: {why}",
                dev.id
            )))
        };
        let Some(x509) = &dev.x509 else {
            return refuse("authenticates with a SAS token, not a client certificate".into());
        };
        let info = match super::x509::inspect(&chain[0]) {
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
        Ok(Principal {
            name: dev.id.as_str().into(),
            anonymous: false,
            // Closed when the certificate expires, like a token.
            valid_until: Some(info.not_after.max(0) as u64),
        })
    }

    /// A host a token or username may name: ours or the IoT Hub's.
    fn known_host(&self, registry: &Registry, h: &str) -> bool {
        h.eq_ignore_ascii_case(&self.gateway_hostname)
            || registry
                .iothub_hostname
                .as_deref()
                .is_some_and(|k| k.eq_ignore_ascii_case(h))
    }

    /// Anonymous clients (`--allow-anonymous`) may use any topic while no
    /// identity exists (a plain development broker); once there are
    /// identities, the IoT Hub topics are theirs alone.
    fn anonymous_may(&self, topic_or_filter: &str, filter: bool) -> bool {
        if !self.allow_anonymous {
            return false;
        }
        if self.identities.registry().is_empty() {
            return true;
        }
        !topic_or_filter.starts_with("devices/")
            && !topic_or_filter.starts_with("$iothub/")
            && !(filter && (topic_or_filter.starts_with('#') || topic_or_filter.starts_with('+')))
    }
}

/// The SAS token in a CONNECT password.
fn parse_token(password: &[u8]) -> Result<SasToken, AuthError> {
    let t = std::str::from_utf8(password)
        .map_err(|_| AuthError::NotAuthorized("password is not UTF-8".into()))?;
    SasToken::parse(t).map_err(|e| AuthError::NotAuthorized(e.to_string()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// `device` or `device/module`.
fn split_identity(s: &str) -> Option<(&str, Option<&str>)> {
    let mut it = s.split('/');
    let d = it.next().filter(|d| !d.is_empty())?;
    let m = it.next();
    if it.next().is_some() || m.is_some_and(str::is_empty) {
        return None;
    }
    Some((d, m))
}

impl Authenticator for IotHubAuth {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> Result<Principal, AuthError> {
        let bad = |why: String| Err(AuthError::NotAuthorized(why));
        let registry = self.identities.registry();
        if info.username.is_none() && info.password.is_none() {
            if self.allow_anonymous {
                // An identity's client id (and so its session, with its
                // queued cloud-to-device messages) is that identity's alone.
                if registry.knows_session(info.client_id) {
                    return Err(AuthError::NotAuthorized(format!(
                        "client id {:?} belongs to a registered identity; anonymous clients may not use it",
                        info.client_id
                    )));
                }
                return Ok(Principal {
                    name: info.client_id.into(),
                    anonymous: true,
                    valid_until: None,
                });
            }
            return Err(AuthError::NotAuthorized(format!(
                "client {:?} presented no credentials",
                info.client_id
            )));
        }
        let Some((device, module)) = split_identity(info.client_id) else {
            return bad(format!(
                "client id {:?} is not deviceId or deviceId/moduleId",
                info.client_id
            ));
        };
        // Username: host/deviceId[/moduleId]/?api-version=…[&…]
        let username = info.username.unwrap_or_default();
        let path = username.split_once("/?").map_or(username, |(p, _)| p);
        let mut parts = path.splitn(2, '/');
        let host = parts.next().unwrap_or_default();
        let user_identity = parts.next().unwrap_or_default();
        if !self.known_host(&registry, host) {
            return bad(format!(
                "username names host {host:?}, which is neither this gateway nor its IoT Hub"
            ));
        }
        match split_identity(user_identity) {
            Some((d, m))
                if same(d, device) && m.map(str::to_lowercase) == module.map(str::to_lowercase) => {
            }
            _ => {
                return bad(format!(
                    "username identity {user_identity:?} does not match client id {:?}",
                    info.client_id
                ))
            }
        }
        let password = info.password.filter(|p| !p.is_empty());
        let query = username.split_once("/?").map_or("", |(_, q)| q);
        if let Some(chain) = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("auth-chain="))
        {
            return self.authenticate_chain(&registry, (device, module), chain, password);
        }
        let Some(dev) = registry.device(device) else {
            return Err(AuthError::NotAuthorized(format!(
                "unknown device {device:?}"
            )));
        };
        if password.is_none() {
            if let Some(chain) = info.peer_certificates.filter(|c| !c.is_empty()) {
                if module.is_some() {
                    return Err(AuthError::NotAuthorized(format!(
                        "module {}: modules authenticate with SAS tokens only, not client certificates",
                        info.client_id
                    )));
                }
                return self.authenticate_x509(dev, chain);
            }
        }
        if module.is_none() && dev.x509.is_some() {
            return Err(AuthError::NotAuthorized(format!(
                "device {} authenticates with an X.509 client certificate, not a SAS token",
                dev.id
            )));
        }
        let (name, mut keys) = match module {
            None => (dev.id.clone(), dev.keys.all()),
            Some(m) => match dev.modules.get(&m.to_lowercase()) {
                // A module may sign with its own keys or its device's.
                Some((mid, k)) => (format!("{}/{mid}", dev.id), k.all()),
                None => {
                    return Err(AuthError::NotAuthorized(format!(
                        "unknown module {device}/{m}"
                    )))
                }
            },
        };
        if module.is_some() {
            keys.extend(dev.keys.all());
        }
        let Some(password) = password else {
            return Err(AuthError::NotAuthorized(
                "no SAS token in the password and no client certificate".into(),
            ));
        };
        let token = parse_token(password)?;
        // sr: {host}/devices/{d}[/modules/{m}]
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
            return bad(format!(
                "token resource {:?} is not this identity on this gateway or its IoT Hub",
                token.resource
            ));
        }
        token
            .check_expiry(now())
            .map_err(|e| AuthError::NotAuthorized(e.to_string()))?;
        token
            .verify(&keys)
            .map_err(|e| AuthError::NotAuthorized(e.to_string()))?;
        Ok(Principal {
            name: name.into(),
            anonymous: false,
            valid_until: Some(token.expiry + super::sas::EXPIRY_SKEW_SECS),
        })
    }
}

fn starts_with_ci(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// `devices/{d}` or `devices/{d}/modules/{m}` for a principal.
fn identity_prefix(p: &Principal) -> String {
    match p.name.split_once('/') {
        Some((d, m)) => format!("devices/{d}/modules/{m}/"),
        None => format!("devices/{}/", p.name),
    }
}

impl Authorizer for IotHubAuth {
    fn may_publish(&self, p: &Principal, topic: &str) -> bool {
        if p.anonymous {
            return self.anonymous_may(topic, false);
        }
        let own = identity_prefix(p);
        // Telemetry / module output; twin requests; method responses.
        (starts_with_ci(topic, &own) && topic[own.len()..].starts_with("messages/events"))
            || topic.starts_with("$iothub/twin/GET/")
            || topic.starts_with("$iothub/twin/PATCH/properties/reported/")
            || topic.starts_with("$iothub/methods/res/")
    }

    fn may_subscribe(&self, p: &Principal, filter: &str) -> bool {
        if p.anonymous {
            return self.anonymous_may(filter, true);
        }
        let own = identity_prefix(p);
        let module = p.name.contains('/');
        let own_ok = starts_with_ci(filter, &own)
            && (module || filter[own.len()..].starts_with("messages/devicebound"));
        own_ok
            || filter.starts_with("$iothub/twin/res/")
            || filter.starts_with("$iothub/twin/PATCH/properties/desired/")
            || filter.starts_with("$iothub/methods/POST/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iothub::sas::sign;
    use std::io::Write;

    const DEV_KEY: &str = "ZGV2aWNlLWtleS1wcmltYXJ5LTAxMjM0NTY3ODk=";
    const DEV_KEY2: &str = "ZGV2aWNlLWtleS1zZWNvbmRhcnktMDEyMzQ1Njc=";
    const MOD_KEY: &str = "bW9kdWxlLWtleS0wMTIzNDU2Nzg5YWJjZGVm";

    fn auth(anonymous: bool) -> IotHubAuth {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(
            f,
            r#"{{"iothubHostname": "hub.azure-devices.net", "devices": [
                {{"deviceId": "Dev1", "primaryKey": "{DEV_KEY}", "secondaryKey": "{DEV_KEY2}",
                  "modules": [{{"moduleId": "filter", "primaryKey": "{MOD_KEY}"}}]}}]}}"#
        )
        .unwrap();
        IotHubAuth::new(
            Arc::new(Identities::fixed(Registry::load(f.path()).unwrap())),
            "gateway.local",
            anonymous,
        )
    }

    fn connect(
        a: &IotHubAuth,
        client: &str,
        user: &str,
        token: &str,
    ) -> Result<Principal, AuthError> {
        a.authenticate(&ConnectInfo {
            protocol: edgehub_codec::Protocol::V311,
            client_id: client,
            username: Some(user),
            password: Some(token.as_bytes()),
            peer: "127.0.0.1:1".parse().unwrap(),
            peer_certificates: None,
        })
    }

    fn later() -> u64 {
        now() + 3600
    }

    /// Parent "top" (this hub) ← edge "child" ← leaf "leaf1" (+ module);
    /// "other" is an edge beside child with "leaf2" under it.
    fn nested(own: Option<&str>) -> IotHubAuth {
        const EDGE_KEY: &str = "Y2hpbGQtZWRnZS1rZXktMDEyMzQ1Njc4OWFi";
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(
            f,
            r#"{{"devices": [
                {{"deviceId": "top", "primaryKey": "{DEV_KEY}", "edge": true}},
                {{"deviceId": "child", "primaryKey": "{EDGE_KEY}", "edge": true, "parent": "top"}},
                {{"deviceId": "other", "primaryKey": "{DEV_KEY2}", "edge": true, "parent": "top"}},
                {{"deviceId": "leaf1", "primaryKey": "{DEV_KEY2}", "parent": "child",
                  "modules": [{{"moduleId": "m", "primaryKey": "{MOD_KEY}"}}]}},
                {{"deviceId": "leaf2", "primaryKey": "{DEV_KEY2}", "parent": "other"}},
                {{"deviceId": "plain", "primaryKey": "{DEV_KEY2}"}}]}}"#
        )
        .unwrap();
        IotHubAuth::new(
            Arc::new(Identities::fixed(Registry::load(f.path()).unwrap())),
            "gateway.local",
            false,
        )
        .with_own_device(own.map(str::to_owned))
    }

    #[test]
    fn auth_chain_lets_an_edge_act_only_for_its_own_descendants() {
        const EDGE_KEY: &str = "Y2hpbGQtZWRnZS1rZXktMDEyMzQ1Njc4OWFi";
        let a = nested(Some("top"));
        let child_token = sign("gateway.local/devices/child", EDGE_KEY, later()).unwrap();
        let user = |leaf: &str, chain: &str| {
            format!("gateway.local/{leaf}/?api-version=2021-04-12&auth-chain={chain}")
        };
        // The leaf's own key is not needed: the child's token vouches.
        let p = connect(&a, "leaf1", &user("leaf1", "leaf1;child;top"), &child_token).unwrap();
        assert_eq!(&*p.name, "leaf1");
        let p = connect(
            &a,
            "leaf1/m",
            &user("leaf1/m", "leaf1/m;child"),
            &child_token,
        )
        .unwrap();
        assert_eq!(&*p.name, "leaf1/m");
        // The child for itself.
        connect(&a, "child", &user("child", "child;child;top"), &child_token).unwrap();

        let refused = |client: &str, chain: &str, token: &str| match connect(
            &a,
            client,
            &user(client, chain),
            token,
        ) {
            Err(AuthError::NotAuthorized(why)) => why,
            Err(e) => panic!("{chain}: {e}"),
            Ok(p) => panic!("{chain} accepted as {}", p.name),
        };
        let why = refused("leaf2", "leaf2;child;top", &child_token);
        assert!(why.contains("not registered under"), "{why}");
        let why = refused("plain", "plain;child", &child_token);
        assert!(why.contains("not registered under"), "{why}");
        let why = refused("leaf1", "leaf1;child;elsewhere", &child_token);
        assert!(
            why.contains("not an edge device registered under \"elsewhere\""),
            "{why}"
        );
        let why = refused("leaf1", "leaf2;child", &child_token);
        assert!(why.contains("is not the client"), "{why}");
        let why = refused("leaf1", "leaf1", &child_token);
        assert!(why.contains("at least"), "{why}");
        // A leaf cannot act as an edge, and the token must be the actor's.
        let leaf_token = sign("gateway.local/devices/leaf1", DEV_KEY2, later()).unwrap();
        let why = refused("leaf1", "leaf1;leaf1", &leaf_token);
        assert!(why.contains("not an edge device"), "{why}");
        let other_token = sign("gateway.local/devices/other", DEV_KEY2, later()).unwrap();
        let why = refused("leaf1", "leaf1;child", &other_token);
        assert!(why.contains("is not edge device"), "{why}");
        let forged = sign("gateway.local/devices/child", DEV_KEY, later()).unwrap();
        refused("leaf1", "leaf1;child", &forged);
        let expired = sign("gateway.local/devices/child", EDGE_KEY, now() - 3600).unwrap();
        refused("leaf1", "leaf1;child", &expired);
    }

    #[test]
    fn auth_chain_must_end_at_this_hub() {
        const EDGE_KEY: &str = "Y2hpbGQtZWRnZS1rZXktMDEyMzQ1Njc4OWFi";
        let t = sign("gateway.local/devices/child", EDGE_KEY, later()).unwrap();
        let user = "gateway.local/leaf1/?api-version=1&auth-chain=leaf1;child";
        // We are "other": child is not under us.
        assert!(connect(&nested(Some("other")), "leaf1", user, &t).is_err());
        // A root without a device id: chains end at a top-level edge.
        let root = nested(None);
        assert!(
            connect(&root, "leaf1", user, &t).is_err(),
            "child is under top"
        );
        let user = "gateway.local/leaf1/?api-version=1&auth-chain=leaf1;child;top";
        connect(&root, "leaf1", user, &t).unwrap();
    }

    #[test]
    fn devices_and_modules_authenticate_with_their_keys() {
        let a = auth(false);
        let expiry = later();
        let t = sign("gateway.local/devices/dev1", DEV_KEY, expiry).unwrap();
        let p = connect(&a, "dev1", "gateway.local/dev1/?api-version=2021-04-12", &t).unwrap();
        assert_eq!(&*p.name, "Dev1");
        assert_eq!(
            p.valid_until,
            Some(expiry + crate::iothub::sas::EXPIRY_SKEW_SECS)
        );
        // Secondary key, IoT Hub host name in the token and username.
        let t = sign("hub.azure-devices.net/devices/Dev1", DEV_KEY2, later()).unwrap();
        connect(
            &a,
            "Dev1",
            "hub.azure-devices.net/Dev1/?api-version=x&DeviceClientType=py",
            &t,
        )
        .unwrap();
        // A module with its own key, and with its device's key.
        let t = sign(
            "gateway.local/devices/dev1/modules/filter",
            MOD_KEY,
            later(),
        )
        .unwrap();
        let p = connect(
            &a,
            "dev1/filter",
            "gateway.local/dev1/filter/?api-version=x",
            &t,
        )
        .unwrap();
        assert_eq!(&*p.name, "Dev1/filter");
        let t = sign(
            "gateway.local/devices/dev1/modules/filter",
            DEV_KEY,
            later(),
        )
        .unwrap();
        connect(
            &a,
            "dev1/filter",
            "gateway.local/dev1/filter/?api-version=x",
            &t,
        )
        .unwrap();
    }

    #[test]
    fn refusals_say_why() {
        let a = auth(false);
        let good = sign("gateway.local/devices/dev1", DEV_KEY, later()).unwrap();
        let user = "gateway.local/dev1/?api-version=x";
        let err = |r: Result<Principal, AuthError>| r.unwrap_err().to_string();
        assert!(err(connect(
            &a,
            "dev1",
            user,
            &sign("gateway.local/devices/dev1", MOD_KEY, later()).unwrap()
        ))
        .contains("signature does not match"));
        assert!(err(connect(
            &a,
            "dev1",
            user,
            &sign("gateway.local/devices/dev1", DEV_KEY, 1000).unwrap()
        ))
        .contains("expired"));
        assert!(err(connect(
            &a,
            "dev2",
            "gateway.local/dev2/?api-version=x",
            &good
        ))
        .contains("unknown device"));
        assert!(err(connect(
            &a,
            "dev1",
            "gateway.local/other/?api-version=x",
            &good
        ))
        .contains("does not match client id"));
        assert!(err(connect(
            &a,
            "dev1",
            "evil.example/dev1/?api-version=x",
            &good
        ))
        .contains("neither this gateway"));
        // A token for another identity (here: the module) is refused.
        let module_token = sign(
            "gateway.local/devices/dev1/modules/filter",
            MOD_KEY,
            later(),
        )
        .unwrap();
        assert!(err(connect(&a, "dev1", user, &module_token)).contains("not this identity"));
        assert!(err(connect(&a, "dev1", user, "secret")).contains("not a SharedAccessSignature"));
        // The secret never appears in the reason.
        assert!(!err(connect(&a, "dev1", user, "hunter2-password")).contains("hunter2"));
        // Anonymous clients: refused unless the development switch is on.
        let anon = ConnectInfo {
            protocol: edgehub_codec::Protocol::V311,
            client_id: "x",
            username: None,
            password: None,
            peer: "127.0.0.1:1".parse().unwrap(),
            peer_certificates: None,
        };
        assert!(matches!(
            a.authenticate(&anon),
            Err(AuthError::NotAuthorized(_))
        ));
        assert!(auth(true).authenticate(&anon).unwrap().anonymous);
    }

    #[test]
    fn identities_are_confined_to_their_topics() {
        let a = auth(true);
        let dev = Principal {
            name: "Dev1".into(),
            anonymous: false,
            valid_until: None,
        };
        let module = Principal {
            name: "Dev1/filter".into(),
            anonymous: false,
            valid_until: None,
        };
        let anon = Principal {
            name: "x".into(),
            anonymous: true,
            valid_until: None,
        };
        assert!(a.may_publish(&dev, "devices/dev1/messages/events/"));
        assert!(a.may_publish(
            &dev,
            "devices/Dev1/messages/events/%24.ct=application%2Fjson"
        ));
        assert!(
            !a.may_publish(&dev, "devices/dev2/messages/events/"),
            "another device's topic"
        );
        assert!(!a.may_publish(&dev, "devices/dev1/modules/filter/messages/events/"));
        assert!(!a.may_publish(&dev, "devices/dev1/messages/devicebound/"));
        assert!(a.may_publish(&dev, "$iothub/twin/GET/?$rid=1"));
        assert!(a.may_publish(&dev, "$iothub/methods/res/200/?$rid=1"));
        assert!(!a.may_publish(&dev, "some/generic/topic"));
        assert!(a.may_subscribe(&dev, "devices/dev1/messages/devicebound/#"));
        assert!(!a.may_subscribe(&dev, "devices/dev2/messages/devicebound/#"));
        assert!(!a.may_subscribe(&dev, "#"));
        assert!(a.may_subscribe(&dev, "$iothub/methods/POST/#"));
        assert!(a.may_publish(
            &module,
            "devices/dev1/modules/filter/messages/events/%24.on=out1"
        ));
        assert!(a.may_subscribe(&module, "devices/dev1/modules/filter/#"));
        assert!(!a.may_subscribe(&module, "devices/dev1/modules/other/#"));
        assert!(a.may_publish(&anon, "generic/topic"));
        assert!(
            !a.may_publish(&anon, "devices/dev1/messages/events/"),
            "anonymous never speaks for a device"
        );
        assert!(
            !a.may_subscribe(&anon, "#"),
            "anonymous cannot read devices' traffic"
        );
    }
}
