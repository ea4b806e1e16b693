//! Link addresses as IoT Hub's AMQP endpoint names them, matched
//! case-insensitively, absolute (`amqps://host/devices/…`) or relative.

/// What a link attaches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `$cbs`: claims-based security (token exchange).
    Cbs,
    /// `/devices/{d}[/modules/{m}]/messages/events`: telemetry or module
    /// output when the client sends; module inputs when it receives.
    Events { identity: String },
    /// `/devices/{d}[/modules/{m}]/messages/deviceBound`: cloud-to-device.
    DeviceBound { identity: String },
    /// `/devices/{d}[/modules/{m}]/twin`.
    Twin { identity: String },
    /// `/devices/{d}[/modules/{m}]/methods/deviceBound`.
    Methods { identity: String },
}

impl Address {
    /// The identity (`device` or `device/module`) an address belongs to.
    pub fn identity(&self) -> Option<&str> {
        match self {
            Address::Cbs => None,
            Address::Events { identity }
            | Address::DeviceBound { identity }
            | Address::Twin { identity }
            | Address::Methods { identity } => Some(identity),
        }
    }

    /// Reads `text`; `None` for an address IoT Hub does not serve.
    pub fn parse(text: &str) -> Option<Address> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("$cbs") {
            return Some(Address::Cbs);
        }
        // Absolute form: drop the scheme and the host.
        let path = match text.find("://") {
            Some(i) => {
                let rest = &text[i + 3..];
                &rest[rest.find('/')?..]
            }
            None => text,
        };
        let path = path.trim_end_matches('/');
        let parts: Vec<&str> = path.split('/').collect();
        let lower: Vec<String> = parts.iter().map(|p| p.to_ascii_lowercase()).collect();
        let is = |i: usize, w: &str| lower.get(i).map(String::as_str) == Some(w);
        if !is(0, "") || !is(1, "devices") || parts.get(2).is_none_or(|d| d.is_empty()) {
            return None;
        }
        let device = decode(parts[2])?;
        let (identity, rest) = if is(3, "modules") {
            let module = decode(parts.get(4).filter(|m| !m.is_empty())?)?;
            (format!("{device}/{module}"), &lower[5..])
        } else {
            (device, &lower[3..])
        };
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        Some(match rest.as_slice() {
            ["messages", "events"] => Address::Events { identity },
            ["messages", "devicebound"] => Address::DeviceBound { identity },
            ["twin"] => Address::Twin { identity },
            ["methods", "devicebound"] => Address::Methods { identity },
            _ => return None,
        })
    }
}

fn decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_case_insensitively_absolute_or_relative() {
        let events = |i: &str| Some(Address::Events { identity: i.into() });
        assert_eq!(Address::parse("$CBS"), Some(Address::Cbs));
        assert_eq!(Address::parse("/devices/d1/messages/events"), events("d1"));
        assert_eq!(Address::parse("/Devices/d1/Messages/Events/"), events("d1"));
        assert_eq!(
            Address::parse("amqps://hub.example/devices/d1/modules/m%201/messages/events"),
            events("d1/m 1")
        );
        assert_eq!(
            Address::parse("/devices/d1/messages/deviceBound"),
            Some(Address::DeviceBound {
                identity: "d1".into()
            })
        );
        assert_eq!(
            Address::parse("/devices/d1/modules/m/twin"),
            Some(Address::Twin {
                identity: "d1/m".into()
            })
        );
        assert_eq!(
            Address::parse("/devices/d1/methods/devicebound"),
            Some(Address::Methods {
                identity: "d1".into()
            })
        );
        for bad in [
            "",
            "/devices",
            "/devices//messages/events",
            "/devices/d1/modules//twin",
            "/devices/d1/messages",
            "/queues/x",
            "devices/d1/messages/events",
            "amqps://host",
        ] {
            assert_eq!(Address::parse(bad), None, "{bad:?}");
        }
    }
}
