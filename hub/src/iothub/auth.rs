//! MQTT CONNECT authentication and topic authorization for IoT Hub identities.

use std::sync::Arc;

use edgehub_broker::auth::{AuthError, Authenticator, Authorizer, ConnectInfo, Principal};

use edgehub_device::auth::{split_identity, Authenticated, Authentication};
use edgehub_device::identity::Identities;
use edgehub_device::x509::TrustBundle;

/// Authenticates devices and modules from MQTT CONNECT (client id,
/// username, password, TLS client certificate) through the device layer's
/// verdicts, and confines each to its own IoT Hub topics. With
/// `allow_anonymous`, clients that present no credentials are still let in
/// for generic topics (development only).
pub struct IotHubAuth {
    verdicts: Authentication,
    allow_anonymous: bool,
}

fn principal(a: Authenticated) -> Principal {
    Principal {
        name: a.identity,
        anonymous: false,
        valid_until: Some(a.valid_until),
    }
}

impl IotHubAuth {
    pub fn new(
        identities: Arc<Identities>,
        gateway_hostname: &str,
        allow_anonymous: bool,
    ) -> IotHubAuth {
        IotHubAuth {
            verdicts: Authentication::new(identities, gateway_hostname),
            allow_anonymous,
        }
    }

    /// This hub's own edge device id (where auth chains end).
    pub fn with_own_device(mut self, device: Option<String>) -> IotHubAuth {
        self.verdicts = self.verdicts.with_own_device(device);
        self
    }

    /// CAs that may vouch for CA-signed X.509 devices.
    pub fn with_trust_bundle(mut self, bundle: TrustBundle) -> IotHubAuth {
        self.verdicts = self.verdicts.with_trust_bundle(bundle);
        self
    }

    /// Anonymous clients (`--allow-anonymous`) may use any topic while no
    /// identity exists (a plain development broker); once there are
    /// identities, the IoT Hub topics are theirs alone.
    fn anonymous_may(&self, topic_or_filter: &str, filter: bool) -> bool {
        if !self.allow_anonymous {
            return false;
        }
        if self.verdicts.identities().registry().is_empty() {
            return true;
        }
        !topic_or_filter.starts_with("devices/")
            && !topic_or_filter.starts_with("$iothub/")
            && !(filter && (topic_or_filter.starts_with('#') || topic_or_filter.starts_with('+')))
    }
}

/// The SAS token in a CONNECT password.
fn token(password: Option<&[u8]>) -> Result<Option<&str>, AuthError> {
    password
        .map(|p| {
            std::str::from_utf8(p)
                .map_err(|_| AuthError::NotAuthorized("password is not UTF-8".into()))
        })
        .transpose()
}

fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn refused(e: edgehub_device::auth::Refused) -> AuthError {
    AuthError::NotAuthorized(e.0)
}

impl Authenticator for IotHubAuth {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> Result<Principal, AuthError> {
        let bad = |why: String| Err(AuthError::NotAuthorized(why));
        let registry = self.verdicts.identities().registry();
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
        if !self.verdicts.known_host(&registry, host) {
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
            return self
                .verdicts
                .chain((device, module), chain, token(password)?)
                .map(principal)
                .map_err(refused);
        }
        if registry.device(device).is_none() {
            return bad(format!("unknown device {device:?}"));
        }
        if password.is_none() {
            if let Some(chain) = info.peer_certificates.filter(|c| !c.is_empty()) {
                if module.is_some() {
                    return bad(format!(
                        "module {}: modules authenticate with SAS tokens only, not client certificates",
                        info.client_id
                    ));
                }
                return self
                    .verdicts
                    .x509(device, chain)
                    .map(principal)
                    .map_err(refused);
            }
        }
        self.verdicts
            .sas(device, module, token(password)?)
            .map(principal)
            .map_err(refused)
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
    use edgehub_device::sas::sign;
    use edgehub_device::Registry;
    use std::io::Write;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

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
            Some(expiry + edgehub_device::sas::EXPIRY_SKEW_SECS)
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
