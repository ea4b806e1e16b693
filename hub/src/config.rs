//! Command line and environment configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// edgehub: an IoT Edge hub. Downstream devices and modules connect over MQTT
/// (3.1.1 and 5.0), over TLS by default.
///
/// Every flag can also be set through the environment variable shown with it.
#[derive(Debug, Clone, Parser)]
#[command(name = "edgehub", version, args_conflicts_with_subcommands = true)]
pub struct Config {
    /// Without a command, edgehub runs the hub.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Directory for the hub's state. The generated development TLS CA is
    /// written there as `ca.pem` so clients can trust it.
    #[arg(long, env = "EDGEHUB_DATA_DIR", default_value = "edgehub-data")]
    pub data_dir: PathBuf,

    /// Plain-TCP MQTT listener address (e.g. 127.0.0.1:1883). Off unless given:
    /// credentials would cross the network in clear text.
    #[arg(long, env = "EDGEHUB_MQTT_LISTEN")]
    pub mqtt_listen: Option<SocketAddr>,

    /// MQTT over TLS listener address.
    #[arg(long, env = "EDGEHUB_MQTTS_LISTEN", default_value = "0.0.0.0:8883")]
    pub mqtts_listen: SocketAddr,

    /// Server certificate chain (PEM, leaf first). Without it, a development CA
    /// and server certificate are generated in the data dir on first start.
    #[arg(long, env = "EDGEHUB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "EDGEHUB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Host name put in the generated server certificate, besides `localhost`
    /// and 127.0.0.1. Defaults to this machine's host name.
    #[arg(long, env = "EDGEHUB_HOSTNAME")]
    pub hostname: Option<String>,

    /// Development switch: let any client connect without credentials and use
    /// any topic. Without it, anonymous clients are refused ("not authorized").
    #[arg(long, env = "EDGEHUB_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// IoT Hub identities (devices and modules with their keys) as JSON:
    /// {"iothubHostname": "…", "devices": [{"deviceId", "primaryKey",
    /// "secondaryKey", "modules": [{"moduleId", "primaryKey", …}]}]}. With it,
    /// devices and modules authenticate with SAS tokens and are confined to
    /// their own IoT Hub topics. (Stop-gap until the store and management API.)
    #[arg(long, env = "EDGEHUB_IDENTITIES")]
    pub identities: Option<PathBuf>,

    /// Log filter in tracing's syntax, e.g. `info`, `edgehub=debug`.
    #[arg(long, env = "EDGEHUB_LOG", default_value = "info")]
    pub log: String,

    /// Largest MQTT packet accepted, in bytes (IoT Hub's limit is 256 KiB).
    /// Larger packets are refused with reason code 0x95 and the connection closed.
    #[arg(long, env = "EDGEHUB_MAX_PACKET_SIZE", default_value_t = 256 * 1024)]
    pub max_packet_size: u32,

    /// Outgoing QoS 1/2 messages in flight per session, unacknowledged. An MQTT 5
    /// client's smaller Receive Maximum wins.
    #[arg(long, env = "EDGEHUB_MAX_INFLIGHT", default_value_t = 32)]
    pub max_inflight: u16,

    /// Incoming QoS 2 messages a client may have in flight (MQTT 5 Receive
    /// Maximum announced in CONNACK); exceeding it closes the connection (0x93).
    #[arg(long, env = "EDGEHUB_RECEIVE_MAXIMUM", default_value_t = 128)]
    pub receive_maximum: u16,

    /// Messages queued per session beyond the in-flight window (for slow or
    /// offline subscribers). When full, new messages for that session are
    /// dropped and counted; already queued ones are kept.
    #[arg(long, env = "EDGEHUB_MAX_QUEUED_MESSAGES", default_value_t = 1000)]
    pub max_queued_messages: usize,

    /// Topic aliases an MQTT 5 client may use towards the hub.
    #[arg(long, env = "EDGEHUB_TOPIC_ALIAS_MAXIMUM", default_value_t = 64)]
    pub topic_alias_maximum: u16,

    /// Upper bound on the keep-alive a client may ask for, in seconds (0: no
    /// bound). MQTT 5 clients asking for more (or for none) are told this value
    /// through Server Keep Alive.
    #[arg(long, env = "EDGEHUB_MAX_KEEP_ALIVE", default_value_t = 0)]
    pub max_keep_alive: u16,

    /// Seconds a client has to complete the TLS handshake and send CONNECT.
    #[arg(long, env = "EDGEHUB_CONNECT_TIMEOUT", default_value_t = 10)]
    pub connect_timeout: u64,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Work with IoT Edge routes without running the hub.
    #[command(subcommand)]
    Routes(RoutesCommand),
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum RoutesCommand {
    /// Evaluate one route against one message and say whether it matches.
    ///
    /// The message file is JSON: {"body": "text"} or {"bodyBase64": "…"},
    /// "properties": {name: value} (application properties, strings),
    /// "systemProperties": {"contentType": "application/json",
    /// "contentEncoding": "utf-8", "connectionDeviceId": "…", …}, and
    /// "source": "telemetry" (default), "twinChangeNotifications" or
    /// "/messages/modules/<module>/outputs/<output>".
    Test {
        /// The route, e.g. "FROM /messages/* WHERE $body.temp > 30 INTO $upstream".
        #[arg(long)]
        route: String,
        /// Path of the message JSON file.
        #[arg(long)]
        message: PathBuf,
    },
    /// Check every route of a deployment manifest (the whole manifest with
    /// modulesContent.$edgeHub, or just the $edgeHub desired properties).
    /// Exits with 1 when any route is invalid.
    Check {
        /// Path of the deployment JSON file.
        deployment: PathBuf,
    },
}

impl Config {
    /// Defaults as the command line has them, for tests and embedding.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Config {
        let mut c = Config::parse_from(["edgehub"]);
        c.data_dir = data_dir.into();
        c
    }

    pub fn hostname(&self) -> String {
        self.hostname.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "localhost".to_owned())
        })
    }
}
