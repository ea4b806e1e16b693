use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use edgehub_loadtest::{run, summary, LoadConfig, Report, Target};

/// Simulates downstream devices publishing telemetry to edgehub or any MQTT
/// broker, and reports connect rate, throughput and latency percentiles.
#[derive(Parser)]
#[command(name = "edgehub-loadtest", version)]
struct Args {
    /// mqtt://host:port or mqtts://host:port
    #[arg(long)]
    target: Target,
    /// A second target run with the same traffic afterwards; prints both and the ratio.
    #[arg(long)]
    compare: Option<Target>,
    /// CA certificate to trust for mqtts (edgehub: <data-dir>/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 500.0)]
    ramp: f64,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Payload size in bytes (at least 8: a timestamp travels in it).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Messages per second per device (0: as fast as the in-flight window allows).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Unacknowledged QoS 1 messages per device.
    #[arg(long, default_value_t = 10)]
    inflight: usize,
    /// Seconds to publish (the run also stops at --count).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds from the start (connection ramp included) whose publishes
    /// are left out of the latency histograms (throughput counts them).
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Messages per device (optional).
    #[arg(long)]
    count: Option<u64>,
    /// Keep connections open and idle until --duration ends (with --count 0:
    /// connect and hold only, to measure idle devices held).
    #[arg(long)]
    hold: bool,
    /// Subscriber connections on <topic-prefix>/# measuring publish→delivery latency.
    #[arg(long, default_value_t = 0)]
    subscribers: usize,
    #[arg(long, default_value = "loadtest")]
    topic_prefix: String,
    #[arg(long, default_value = "loadtest")]
    client_prefix: String,
    /// Use MQTT 5 instead of 3.1.1.
    #[arg(long)]
    mqtt5: bool,
    /// Write the full report(s) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// IoT Hub mode: a file of device connection strings, one per line
    /// (HostName=…;DeviceId=…;SharedAccessKey=…[;GatewayHostName=…]). Device i
    /// connects as line i with a SAS token and publishes telemetry on
    /// devices/{id}/messages/events/, which edgehub routes and stores.
    #[arg(long, conflicts_with = "provision")]
    connection_strings: Option<PathBuf>,
    /// IoT Hub mode with devices created first through edgehub's management
    /// API at this URL (e.g. http://127.0.0.1:8080), named <client-prefix>-<i>.
    #[arg(long, requires = "management_token")]
    provision: Option<String>,
    /// Bearer token for --provision (edgehub: <data-dir>/management-token).
    #[arg(long, env = "EDGEHUB_MANAGEMENT_TOKEN", hide_env_values = true)]
    management_token: Option<String>,
}

fn config(a: &Args, target: Target) -> LoadConfig {
    let mut c = LoadConfig::new(target);
    c.ca = a.ca.clone();
    c.devices = a.devices;
    c.ramp_per_sec = a.ramp;
    c.qos = a.qos;
    c.payload_bytes = a.payload.max(8);
    c.rate_per_device = a.rate;
    c.inflight = a.inflight;
    c.duration = Some(Duration::from_secs_f64(a.duration));
    c.count_per_device = a.count;
    c.hold = a.hold;
    c.warmup = Duration::from_secs_f64(a.warmup.max(0.0));
    c.subscribers = a.subscribers;
    c.topic_prefix = a.topic_prefix.clone();
    c.client_prefix = a.client_prefix.clone();
    c.mqtt5 = a.mqtt5;
    c
}

fn identities(a: &Args) -> anyhow::Result<Vec<edgehub_loadtest::iothub::DeviceIdentity>> {
    if let (Some(url), Some(token)) = (&a.provision, &a.management_token) {
        let started = std::time::Instant::now();
        let ids = edgehub_loadtest::iothub::provision(url, token, &a.client_prefix, a.devices)
            .map_err(|e| anyhow::anyhow!("provisioning devices: {e}"))?;
        eprintln!(
            "provisioned {} devices through {url} in {:.2} s",
            ids.len(),
            started.elapsed().as_secs_f64()
        );
        return Ok(ids);
    }
    let Some(path) = &a.connection_strings else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading connection strings {}", path.display()))?;
    edgehub_loadtest::iothub::read_connection_strings(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

async fn one(cfg: LoadConfig) -> anyhow::Result<Report> {
    let target = cfg.target.clone();
    if let Err(e) = edgehub_loadtest::resolve(&target).await {
        bail!("cannot resolve {target}: {e}");
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    let b2 = bar.clone();
    let report = run(
        cfg,
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
        move |p| {
            let b = b2.clone();
            tokio::spawn(async move {
                loop {
                    b.set_message(p.line());
                    if b.is_finished() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            });
        },
    )
    .await?;
    bar.finish_and_clear();
    if report.connected == 0 {
        let why = report
            .errors
            .keys()
            .next()
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        eprint!("{}", summary(&[&report]));
        bail!("no device could connect to {target}: {why}");
    }
    Ok(report)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let ids = identities(&a)?;
    let with_ids = |t: Target| {
        let mut c = config(&a, t);
        c.identities = ids.clone();
        c
    };
    let first = one(with_ids(a.target.clone())).await?;
    let mut reports = vec![first];
    if let Some(t) = &a.compare {
        reports.push(one(with_ids(t.clone())).await?);
    }
    let refs: Vec<&Report> = reports.iter().collect();
    print!("{}", summary(&refs));
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&reports)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
