//! Claims-based security on `$cbs`: a client sends `put-token` requests on
//! its sender link (application properties `operation = put-token`,
//! `type = azure-devices.net:sastoken` or `servicebus.windows.net:sastoken`,
//! `name = <audience>`; the SAS token as an AmqpValue string body) and reads
//! the replies on its receiver link (`status-code`, `status-description`,
//! correlation-id = the request's message-id). A proven token lets the
//! connection act for that identity until it expires; a new one renews it.

use std::sync::Arc;

use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::types::messaging::{message::Body, AmqpValue, ApplicationProperties, Properties};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Receiver, Sender};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::connection::ConnState;
use crate::message::AmqpMessage;

/// The identity an audience names: `[amqps://]<host>/devices/<d>[/modules/<m>]`
/// (URL-encoded or not) → (host, device, module).
pub fn audience_identity(audience: &str) -> Option<(String, String, Option<String>)> {
    let a = percent_encoding::percent_decode_str(audience)
        .decode_utf8()
        .ok()?;
    let a = a.trim();
    let a = a.split_once("://").map_or(a, |(_, rest)| rest);
    let parts: Vec<&str> = a.trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        [host, devices, d] if devices.eq_ignore_ascii_case("devices") && !d.is_empty() => {
            Some((host.to_string(), d.to_string(), None))
        }
        [host, devices, d, modules, m]
            if devices.eq_ignore_ascii_case("devices")
                && modules.eq_ignore_ascii_case("modules")
                && !d.is_empty()
                && !m.is_empty() =>
        {
            Some((host.to_string(), d.to_string(), Some(m.to_string())))
        }
        _ => None,
    }
}

use crate::message::property as prop;

/// (status-code, status-description) for one request.
fn verdict(state: &ConnState, m: &AmqpMessage) -> (i32, String) {
    if prop(m, "operation").as_deref() != Some("put-token") {
        return (400, "only the put-token operation is supported".into());
    }
    match prop(m, "type").as_deref() {
        Some("azure-devices.net:sastoken") | Some("servicebus.windows.net:sastoken") => {}
        other => return (400, format!("token type {other:?} is not supported")),
    }
    let Some(audience) = prop(m, "name") else {
        return (400, "put-token needs a name (the audience)".into());
    };
    let token = match &m.body {
        Body::Value(v) => match &v.0 {
            Value::String(s) => s.clone(),
            _ => return (400, "the token must be an AMQP string value".into()),
        },
        _ => return (400, "the token must be an AMQP string value".into()),
    };
    let Some((_host, device, module)) = audience_identity(&audience) else {
        return (
            400,
            format!("audience {audience:?} is not <host>/devices/<device>[/modules/<module>]"),
        );
    };
    match state.hub.auth.sas(&device, module.as_deref(), Some(&token)) {
        Ok(a) => {
            debug!(peer = %state.peer, identity = %a.identity, "CBS token accepted");
            state.keep_token(&a.identity, token);
            state.grant(a);
            (200, "OK".into())
        }
        Err(e) => {
            info!(peer = %state.peer, audience = %audience, reason = %e, "CBS token refused");
            (401, "unauthorized".into())
        }
    }
}

/// The client's `$cbs` sender: each request is verified and answered.
/// How long a put-token's answer waits for the client's `$cbs` receiver.
const REPLY_LINK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) async fn serve_requests(state: Arc<ConnState>, mut receiver: Receiver) {
    loop {
        let d = match receiver.recv::<Body<Value>>().await {
            Ok(d) => d,
            Err(e) => {
                debug!(peer = %state.peer, error = %e, "CBS request link ended");
                return;
            }
        };
        let info = DeliveryInfo::from(&d);
        let m = d.message();
        let (status, description) = verdict(&state, m);
        let reply: AmqpMessage = fe2o3_amqp::types::messaging::Message::builder()
            .properties(Properties {
                correlation_id: m.properties.as_ref().and_then(|p| p.message_id.clone()),
                ..Default::default()
            })
            .application_properties(
                ApplicationProperties::builder()
                    .insert("status-code".to_owned(), SimpleValue::Int(status))
                    .insert(
                        "status-description".to_owned(),
                        SimpleValue::String(description),
                    )
                    .build(),
            )
            .body(Body::Value(AmqpValue(Value::Null)))
            .build();
        let _ = receiver.accept(info).await;
        // The client attaches its two $cbs links together and may send a
        // request before the task of its receiver link has started: the
        // reply waits for that link a moment rather than being lost.
        let mut replies = state.cbs_replies.subscribe();
        let queue = tokio::time::timeout(REPLY_LINK_WAIT, replies.wait_for(|q| q.is_some()))
            .await
            .ok()
            .and_then(|q| q.ok().and_then(|q| q.clone()));
        match queue {
            Some(q) => {
                let _ = q.send(reply).await;
            }
            None => debug!(peer = %state.peer, "CBS reply dropped: no $cbs receiver link"),
        }
    }
}

/// The client's `$cbs` receiver: replies go out on it.
pub(crate) async fn serve_replies(state: Arc<ConnState>, mut sender: Sender) {
    let (tx, mut rx) = mpsc::channel(16);
    state.cbs_replies.send_replace(Some(tx));
    while let Some(reply) = rx.recv().await {
        // Pre-settled: a reply is not worth redelivering, and a client that
        // never settles it must not hold up the next one.
        let reply = fe2o3_amqp::link::delivery::Sendable::builder()
            .message(reply)
            .settled(true)
            .build();
        if let Err(e) = sender.send(reply).await {
            debug!(peer = %state.peer, error = %e, "CBS reply not sent");
            break;
        }
    }
    let _ = sender.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_name_identities() {
        assert_eq!(
            audience_identity("hub.example/devices/d1"),
            Some(("hub.example".into(), "d1".into(), None))
        );
        assert_eq!(
            audience_identity("amqps://hub.example/devices/d1/modules/m1"),
            Some(("hub.example".into(), "d1".into(), Some("m1".into())))
        );
        assert_eq!(
            audience_identity("hub.example%2Fdevices%2Fd1"),
            Some(("hub.example".into(), "d1".into(), None))
        );
        for bad in [
            "hub.example",
            "hub/devices",
            "hub/queues/x",
            "hub/devices/d/modules",
        ] {
            assert_eq!(audience_identity(bad), None, "{bad}");
        }
    }
}
