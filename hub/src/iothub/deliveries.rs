//! The MQTT head's side of a device link: each device-layer delivery as
//! the topic IoT Hub sends it on, queued on the identity's MQTT session.
//!
//! | delivery | topic | QoS |
//! |---|---|---|
//! | twin answer | `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]` | 1 |
//! | desired patch | `$iothub/twin/PATCH/properties/desired/?$version={v}` | 1 |
//! | method request | `$iothub/methods/POST/{name}/?$rid={rid:x}` | 0 |
//! | cloud-to-device | `devices/{d}/messages/devicebound/{property bag}` | 1 |
//! | module input | `devices/{d}/modules/{m}/inputs/{input}/{property bag}` | 1 |
//!
//! Replies and pushes go to the identity's own session only
//! ([`Broker::deliver_to`]): `$iothub/twin/res/#` is the same filter for
//! every device, so the shared subscription index must never carry them.
//! Stored messages (cloud-to-device, module inputs) carry a receipt: a
//! PUBACK completes the delivery, a session that ends without one loses it.
//!
//! Owns: the topic of every delivery. Must not touch: what is delivered or
//! when (the device layer and the endpoint executors decide).

use std::sync::Arc;

use bytes::Bytes;
use edgehub_broker::session::{DeliveryReceipt, Message};
use edgehub_broker::{Broker, Targeted};
use edgehub_codec::{Props, QoS, Str};
use edgehub_device::link::{Delivery, LinkSink, Offer, Receipt};
use edgehub_router::SystemProperty;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::sync::Notify;

/// Every identity's deliveries over MQTT: the device layer's fallback
/// (an away identity's persistent session keeps what it may keep).
pub struct MqttDeliveries {
    broker: Arc<Broker>,
}

/// One MQTT connection's link: deliveries as [`MqttDeliveries`]; taken
/// over by another head, the connection closes as on an MQTT takeover.
pub struct MqttLink {
    deliveries: Arc<MqttDeliveries>,
    kick: Arc<Notify>,
}

impl MqttLink {
    pub fn new(deliveries: Arc<MqttDeliveries>, kick: Arc<Notify>) -> MqttLink {
        MqttLink { deliveries, kick }
    }
}

impl LinkSink for MqttLink {
    fn deliver(&self, identity: &str, delivery: Delivery) -> Offer {
        self.deliveries.deliver(identity, delivery)
    }

    fn taken_over(&self) {
        self.kick.notify_one();
    }
}

/// A PUBACK completes, a lost session abandons, a discard cancels.
struct MqttReceipt(Arc<Receipt>);

impl DeliveryReceipt for MqttReceipt {
    fn acknowledged(&self) {
        self.0.complete()
    }
    fn lost(&self) {
        self.0.lost()
    }
    fn discarded(&self) {
        self.0.cancel()
    }
}

fn message(topic: String, payload: Bytes, qos: QoS, receipt: Option<Arc<Receipt>>) -> Arc<Message> {
    Arc::new(Message {
        topic: Str::from(topic),
        payload,
        qos,
        retain: false,
        properties: Props::default(),
        expires_at: None,
        origin: None,
        delivered: receipt.map(|r| Arc::new(MqttReceipt(r)) as Arc<dyn DeliveryReceipt>),
    })
}

fn offer(t: Targeted) -> Offer {
    match t {
        Targeted::Queued => Offer::Sent,
        Targeted::QueuedOffline => Offer::Held,
        Targeted::NotSubscribed => Offer::NotListening,
        Targeted::QueueFull => Offer::Full,
        Targeted::NoSession | Targeted::Offline => Offer::NoLink,
    }
}

impl MqttDeliveries {
    pub fn new(broker: Arc<Broker>) -> Arc<MqttDeliveries> {
        Arc::new(MqttDeliveries { broker })
    }

    fn stored(&self, topic: String, m: &edgehub_router::Message, receipt: Arc<Receipt>) -> Offer {
        let topic = bag_topic(topic, m);
        let msg = message(
            topic,
            m.body.clone(),
            QoS::AtLeastOnce,
            Some(receipt.clone()),
        );
        // By subscription (a module may subscribe with a wildcard); who may
        // subscribe to an identity's topics is authorization's business.
        // Kept until the receipt is settled: the last drop of a message
        // reports it lost, which must not happen for one never delivered.
        if self.broker.publish(msg.clone()) == 0 {
            receipt.cancel();
            drop(msg);
            Offer::NotListening
        } else {
            Offer::Sent
        }
    }
}

impl LinkSink for MqttDeliveries {
    fn deliver(&self, identity: &str, delivery: Delivery) -> Offer {
        let to = |topic: String, payload: Bytes, qos: QoS| {
            offer(
                self.broker
                    .deliver_to(identity, message(topic, payload, qos, None)),
            )
        };
        match delivery {
            Delivery::TwinAnswer {
                request,
                status,
                version,
                body,
            } => {
                let topic = match version {
                    Some(v) => format!("$iothub/twin/res/{status}/?$rid={request}&$version={v}"),
                    None => format!("$iothub/twin/res/{status}/?$rid={request}"),
                };
                to(topic, body, QoS::AtLeastOnce)
            }
            Delivery::DesiredPatch { version, patch } => to(
                format!("$iothub/twin/PATCH/properties/desired/?$version={version}"),
                patch,
                QoS::AtLeastOnce,
            ),
            // IoT Hub sends method requests at QoS 0: a request is only
            // worth something while the caller still waits.
            Delivery::MethodRequest {
                method,
                request_id,
                payload,
            } => to(
                format!("$iothub/methods/POST/{method}/?$rid={request_id:x}"),
                payload,
                QoS::AtMostOnce,
            ),
            Delivery::CloudToDevice {
                message, receipt, ..
            } => self.stored(
                format!("devices/{identity}/messages/devicebound/"),
                &message,
                receipt,
            ),
            Delivery::ModuleInput {
                input,
                message,
                receipt,
            } => {
                let Some((device, module)) = identity.split_once('/') else {
                    receipt.cancel();
                    return Offer::NoLink;
                };
                self.stored(
                    format!("devices/{device}/modules/{module}/inputs/{input}/"),
                    &message,
                    receipt,
                )
            }
        }
    }
}

const BAG: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn system_key(p: SystemProperty) -> Option<&'static str> {
    Some(match p {
        SystemProperty::MessageId => "$.mid",
        SystemProperty::CorrelationId => "$.cid",
        SystemProperty::UserId => "$.uid",
        SystemProperty::To => "$.to",
        SystemProperty::ContentType => "$.ct",
        SystemProperty::ContentEncoding => "$.ce",
        SystemProperty::ConnectionDeviceId => "$.cdid",
        SystemProperty::ConnectionModuleId => "$.cmid",
        SystemProperty::CreationTime => "$.ctime",
        SystemProperty::MessageSchema => "$.schema",
        SystemProperty::OutputName => "$.on",
        _ => return None,
    })
}

/// `base` followed by the message's property bag, as IoT Edge sends it.
pub fn bag_topic(base: String, msg: &edgehub_router::Message) -> String {
    let mut t = base;
    let mut first = true;
    let mut pair = |t: &mut String, k: &str, v: &str| {
        if !first {
            t.push('&');
        }
        first = false;
        t.extend(utf8_percent_encode(k, BAG));
        t.push('=');
        t.extend(utf8_percent_encode(v, BAG));
    };
    for (k, v) in &msg.properties {
        pair(&mut t, k, v);
    }
    for p in SystemProperty::ALL {
        if let (Some(key), Some(v)) = (system_key(p), msg.system(p)) {
            pair(&mut t, key, v);
        }
    }
    t
}
