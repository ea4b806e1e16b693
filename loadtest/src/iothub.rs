//! IoT Hub mode: devices given by connection strings
//! (`HostName=…;DeviceId=…;SharedAccessKey=…[;GatewayHostName=…]`), each
//! connecting as the Azure IoT SDKs do (SAS token, IoT Hub username) and
//! publishing on its telemetry topic, so a gateway routes and stores every
//! message.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The host the device signs for and names in its username: the
    /// gateway's when the connection string has one, else the IoT Hub's.
    pub host: String,
    pub device_id: String,
    /// Base64 symmetric key.
    pub key: String,
}

impl DeviceIdentity {
    pub fn parse(cs: &str) -> Result<DeviceIdentity, String> {
        let mut host = None;
        let mut gateway = None;
        let mut device = None;
        let mut key = None;
        for part in cs.trim().split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not Key=Value"))?;
            match k {
                "HostName" => host = Some(v),
                "GatewayHostName" => gateway = Some(v),
                "DeviceId" => device = Some(v),
                "SharedAccessKey" => key = Some(v),
                "ModuleId" => return Err("module connection strings are not supported".into()),
                _ => {}
            }
        }
        let key = key.ok_or("missing SharedAccessKey")?;
        base64::engine::general_purpose::STANDARD
            .decode(key)
            .map_err(|_| "SharedAccessKey is not base64".to_string())?;
        Ok(DeviceIdentity {
            host: gateway.or(host).ok_or("missing HostName")?.to_owned(),
            device_id: device.ok_or("missing DeviceId")?.to_owned(),
            key: key.to_owned(),
        })
    }

    pub fn username(&self) -> String {
        format!("{}/{}/?api-version=2021-04-12", self.host, self.device_id)
    }

    pub fn topic(&self) -> String {
        format!("devices/{}/messages/events/", self.device_id)
    }

    /// A SAS token valid for `ttl_secs`, signed as the SDKs sign it.
    pub fn sas_token(&self, ttl_secs: u64) -> String {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + ttl_secs;
        let resource = format!("{}/devices/{}", self.host, self.device_id);
        let sr = url_encode(&resource);
        let b64 = base64::engine::general_purpose::STANDARD;
        let key = b64.decode(&self.key).expect("checked in parse");
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
        mac.update(format!("{sr}\n{expiry}").as_bytes());
        let sig = b64.encode(mac.finalize().into_bytes());
        format!(
            "SharedAccessSignature sr={sr}&sig={}&se={expiry}",
            url_encode(&sig)
        )
    }
}

/// Percent-encodes everything but unreserved characters, as the SDKs do.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Creates `count` devices named `{prefix}-{i}` through edgehub's management
/// API (`POST /api/identities`, in chunks of 1000) and returns them as the
/// connection strings it answered (pointed at its `GatewayHostName`).
pub fn provision(
    management: &str,
    token: &str,
    prefix: &str,
    count: usize,
) -> Result<Vec<DeviceIdentity>, String> {
    let url = format!("{}/api/identities", management.trim_end_matches('/'));
    let mut out = Vec::with_capacity(count);
    let ids: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    for chunk in ids.chunks(1000) {
        let body = serde_json::json!({
            "devices": chunk.iter().map(|id| serde_json::json!({"deviceId": id})).collect::<Vec<_>>()
        });
        let resp: serde_json::Value = ureq::post(&url)
            .set("Authorization", &format!("Bearer {token}"))
            .send_json(body)
            .map_err(|e| match e {
                ureq::Error::Status(code, r) => format!(
                    "{url}: HTTP {code}: {}",
                    r.into_string().unwrap_or_default()
                ),
                other => format!("{url}: {other}"),
            })?
            .into_json()
            .map_err(|e| format!("{url}: unreadable answer: {e}"))?;
        for d in resp["devices"].as_array().ok_or("answer has no devices")? {
            let cs = d["connectionString"]
                .as_str()
                .ok_or("device without connectionString")?;
            out.push(DeviceIdentity::parse(cs)?);
        }
    }
    Ok(out)
}

/// One connection string per line; blank lines and `#` comments skipped.
pub fn read_connection_strings(text: &str) -> Result<Vec<DeviceIdentity>, String> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| DeviceIdentity::parse(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connection_strings_and_prefers_the_gateway() {
        let ids = read_connection_strings(
            "# devices\nHostName=hub.azure-devices.net;DeviceId=d1;SharedAccessKey=a2V5;GatewayHostName=edge\n\nHostName=hub.azure-devices.net;DeviceId=d2;SharedAccessKey=a2V5\n",
        )
        .unwrap();
        assert_eq!(ids[0].host, "edge");
        assert_eq!(ids[1].host, "hub.azure-devices.net");
        assert_eq!(
            ids[1].username(),
            "hub.azure-devices.net/d2/?api-version=2021-04-12"
        );
        assert_eq!(ids[0].topic(), "devices/d1/messages/events/");
        let err = read_connection_strings("HostName=h;DeviceId=d").unwrap_err();
        assert!(
            err.contains("line 1") && err.contains("SharedAccessKey"),
            "{err}"
        );
        assert!(DeviceIdentity::parse("HostName=h;DeviceId=d;SharedAccessKey=!!").is_err());
    }

    #[test]
    fn token_has_the_sdk_shape() {
        let id = DeviceIdentity::parse("HostName=h.net;DeviceId=d1;SharedAccessKey=a2V5").unwrap();
        let t = id.sas_token(3600);
        assert!(
            t.starts_with("SharedAccessSignature sr=h.net%2Fdevices%2Fd1&sig="),
            "{t}"
        );
        assert!(t.contains("&se="));
    }
}
