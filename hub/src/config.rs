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

    /// AMQP over TLS listener address (IoT Hub's AMQPS port). Plain AMQP is
    /// not served: credentials would cross the network in clear text.
    #[arg(long, env = "EDGEHUB_AMQPS_LISTEN", default_value = "0.0.0.0:5671")]
    pub amqps_listen: SocketAddr,

    /// MQTT and AMQP over WebSocket with TLS, as IoT Hub serves them on
    /// 443 (`wss://host/$iothub/websocket`; the subprotocol, `mqtt` or
    /// `AMQPWSB10`, picks the protocol). Same certificates and optional
    /// client certificate as the other TLS listeners. `off` to disable.
    /// Without the right to bind a port below 1024 the hub warns and serves
    /// the other listeners.
    #[arg(long, env = "EDGEHUB_WSS_LISTEN", default_value = "0.0.0.0:443")]
    pub wss_listen: Listen,

    /// MQTT and AMQP over plain WebSocket, for an ingress or proxy that
    /// terminates TLS in front of the hub (then no client certificate
    /// reaches it: devices authenticate with SAS tokens). Off unless given.
    #[arg(long, env = "EDGEHUB_WS_LISTEN")]
    pub ws_listen: Option<SocketAddr>,

    /// MQTT over QUIC (UDP; ALPN `mqtt`, TLS 1.3, the session on the first
    /// bidirectional stream), with the same certificates. `off` to disable.
    #[arg(long, env = "EDGEHUB_QUIC_LISTEN", default_value = "0.0.0.0:14567")]
    pub quic_listen: Listen,

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

    /// The parent: Azure IoT Hub or another edgehub, as `mqtts://host:port`
    /// (MQTT, port 8883 by default) or `amqps://host:port` (AMQP, 5671).
    /// Messages routed to `$upstream` are forwarded there with the identity
    /// that sent them (a token signed with that identity's key): over MQTT
    /// one connection per identity, over AMQP one connection for all of
    /// them. Without it the hub is the root and keeps `$upstream` messages
    /// for local consumers (the outbox API).
    #[arg(long, env = "EDGEHUB_UPSTREAM")]
    pub upstream: Option<String>,

    /// The protocol of the link to the parent; by default the one the
    /// --upstream URL names.
    #[arg(
        long,
        env = "EDGEHUB_UPSTREAM_PROTOCOL",
        value_enum,
        requires = "upstream"
    )]
    pub upstream_protocol: Option<UpstreamProtocolArg>,

    /// PEM file of the CA(s) the parent's TLS certificate must chain to.
    #[arg(long, env = "EDGEHUB_UPSTREAM_CA", requires = "upstream")]
    pub upstream_ca: Option<PathBuf>,

    /// Host name put in upstream usernames and token audiences (the IoT
    /// Hub's, e.g. myhub.azure-devices.net). Default: the --upstream host.
    #[arg(long, env = "EDGEHUB_IOTHUB_HOSTNAME", requires = "upstream")]
    pub iothub_hostname: Option<String>,

    /// This edge device's id. At start it is registered (keys generated)
    /// when missing, with its `$edgeAgent` and `$edgeHub` modules; `PUT
    /// /deployment` then delivers the manifest's `$edgeAgent` desired
    /// properties to the `$edgeAgent` module twin (the operator shim reads
    /// them there).
    #[arg(long, env = "EDGEHUB_DEVICE_ID")]
    pub device_id: Option<String>,

    /// This edge device's IoT Hub connection string
    /// (`HostName=…;DeviceId=…;SharedAccessKey=…`): its id (as
    /// --device-id), the IoT Hub host name (as --iothub-hostname) and its
    /// key, registered locally as the device's primary key (what
    /// `--upstream-auth chain` signs with).
    #[arg(long, env = "EDGEHUB_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: Option<String>,

    /// How upstream connections authenticate. `identity`: each device or
    /// module with a token from its own key (what Azure IoT Hub takes).
    /// `chain`: IoT Edge's nested scheme, this edge device's token plus
    /// `auth-chain=leaf;this-device[;parent]` in the username, so a parent
    /// edgehub needs no leaf keys (needs this device's key: --connection-string).
    #[arg(
        long,
        env = "EDGEHUB_UPSTREAM_AUTH",
        value_enum,
        default_value = "identity"
    )]
    pub upstream_auth: UpstreamAuthArg,

    /// With `--upstream-auth chain`: the parent edge device's id, appended
    /// to every chain (a parent edgehub also accepts chains without it).
    #[arg(long, env = "EDGEHUB_PARENT_DEVICE_ID")]
    pub parent_device_id: Option<String>,

    /// PEM file of the CAs that may sign certificates of devices registered
    /// as `certificateAuthority` (X.509 CA-signed: subject CN = device id).
    #[arg(long, env = "EDGEHUB_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,

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

    /// Deliveries of one cloud-to-device message without it being completed
    /// (a device that drops its connection before acknowledging, or lets the
    /// lock run out), after which the message is dead-lettered: removed and
    /// counted (`edgehub_c2d_messages_total{outcome="dead_lettered"}`), as
    /// IoT Hub's maximum delivery count.
    #[arg(long, env = "EDGEHUB_C2D_MAX_DELIVERY_COUNT", default_value_t = edgehub_device::c2d::DEFAULT_MAX_DELIVERY_COUNT,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub c2d_max_delivery_count: u32,

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

    /// Deployment with the routes: a whole manifest (modulesContent.$edgeHub)
    /// or just the $edgeHub desired properties (schema 1.0/1.1/1.2). Without
    /// it: `FROM /messages/* INTO $upstream` with a 7200 s time-to-live.
    #[arg(long, env = "EDGEHUB_ROUTES")]
    pub routes: Option<PathBuf>,

    /// When a message counts as stored (and is acknowledged): `fsync` waits
    /// for the write-ahead log to reach the disk (survives power loss);
    /// `os-buffered` only for the OS to have it (survives a crash of edgehub,
    /// not of the machine; what IoT Edge's edgeHub does).
    #[arg(long, env = "EDGEHUB_DURABILITY", value_enum, default_value = "fsync")]
    pub durability: DurabilityArg,

    /// Disk budget for stored messages (e.g. 500MiB, 10GB, 1048576). When it
    /// is reached new messages are refused (MQTT 5: PUBACK 0x97 quota
    /// exceeded; MQTT 3.1.1: the connection is closed) and nothing stored is
    /// lost. Default: no budget, only the free-disk floor.
    #[arg(long, env = "EDGEHUB_STORE_MAX_BYTES", value_parser = parse_bytes)]
    pub store_max_bytes: Option<u64>,

    /// New messages are refused while the data dir's file system has less
    /// free space than this (0 disables the check).
    #[arg(long, env = "EDGEHUB_STORE_MIN_FREE_DISK", value_parser = parse_bytes, default_value = "64MiB")]
    pub store_min_free_disk: u64,

    /// Management API (HTTP) address: outbox, metrics, health. Keep it on
    /// loopback or a cluster-internal interface.
    #[arg(
        long,
        env = "EDGEHUB_MANAGEMENT_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub management_listen: SocketAddr,

    /// Bearer token for the management API's /api routes. Default: generated
    /// into `<data-dir>/management-token` on first start.
    #[arg(long, env = "EDGEHUB_MANAGEMENT_TOKEN", hide_env_values = true)]
    pub management_token: Option<String>,
}

/// A listener address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen(None));
        }
        s.parse()
            .map(|a| Listen(Some(a)))
            .map_err(|_| format!("{s:?}: expected host:port (e.g. 0.0.0.0:443) or off"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamProtocolArg {
    Mqtt,
    Amqp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamAuthArg {
    Identity,
    Chain,
}

/// This hub's own edge device identity (--device-id, --connection-string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeDevice {
    pub id: String,
    pub iothub_hostname: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DurabilityArg {
    Fsync,
    OsBuffered,
}

/// `1048576`, `512KiB`, `64MiB`, `10GiB`, `500MB`, `2GB` (KB/MB/GB are
/// powers of 1000, KiB/MiB/GiB of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 500MiB or 10GB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        "t" | "tb" => 1000 * 1000 * 1000 * 1000,
        "tib" => 1 << 40,
        u => {
            return Err(format!(
                "unknown size unit {u:?} (use KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
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
    /// `"/messages/modules/<module>/outputs/<output>"`.
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
        // Tests run hubs side by side: no fixed port.
        c.amqps_listen = "127.0.0.1:0".parse().expect("address");
        c.wss_listen = "127.0.0.1:0".parse().expect("address");
        c.quic_listen = "127.0.0.1:0".parse().expect("address");
        c
    }

    /// The edge device this hub is, from --device-id and/or
    /// --connection-string (they must agree).
    pub fn edge_device(&self) -> Result<Option<EdgeDevice>, String> {
        let Some(cs) = &self.connection_string else {
            return Ok(self.device_id.clone().map(|id| EdgeDevice {
                id,
                iothub_hostname: None,
                key: None,
            }));
        };
        let mut host = None;
        let mut id = None;
        let mut key = None;
        for part in cs.split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("--connection-string: {part:?} is not Key=Value"))?;
            match k.trim().to_ascii_lowercase().as_str() {
                "hostname" => host = Some(v.trim().to_owned()),
                "deviceid" => id = Some(v.trim().to_owned()),
                "sharedaccesskey" => key = Some(v.trim().to_owned()),
                "moduleid" => {
                    return Err(
                        "--connection-string names a module; it must be the edge device's own"
                            .into(),
                    )
                }
                _ => {} // GatewayHostName and others: not ours to use
            }
        }
        let id = id.ok_or("--connection-string has no DeviceId")?;
        if let Some(d) = &self.device_id {
            if !d.eq_ignore_ascii_case(&id) {
                return Err(format!(
                    "--device-id {d:?} and --connection-string's DeviceId {id:?} differ"
                ));
            }
        }
        let key = key.ok_or("--connection-string has no SharedAccessKey")?;
        {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(&key)
                .map_err(|_| "--connection-string: SharedAccessKey is not base64".to_owned())?;
        }
        Ok(Some(EdgeDevice {
            id,
            iothub_hostname: host,
            key: Some(key),
        }))
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

impl Config {
    /// The broker's per-connection and per-session limits.
    pub fn broker_limits(&self) -> edgehub_broker::Limits {
        edgehub_broker::Limits {
            max_packet_size: self.max_packet_size,
            max_inflight: self.max_inflight.max(1),
            receive_maximum: self.receive_maximum.max(1),
            max_queued_messages: self.max_queued_messages,
            topic_alias_maximum: self.topic_alias_maximum,
            max_keep_alive: self.max_keep_alive,
            connect_timeout: std::time::Duration::from_secs(self.connect_timeout),
        }
    }
}
