//! `edgehub-operator`: see the crate docs (`src/lib.rs`) and README.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use edgehub_operator::{agent, crd, manifest, reconcile, translate};

#[derive(Parser)]
#[command(
    version,
    about = "EdgeDeployment (IoT Edge deployment manifest) to Kubernetes objects"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[arg(
        long,
        env = "EDGEHUB_OPERATOR_LOG",
        default_value = "info",
        global = true
    )]
    log: String,
}

#[derive(Subcommand)]
enum Command {
    /// Print the EdgeDeployment CRD (YAML), generated from the Rust types.
    Crd,
    /// Print the objects a deployment manifest (or an EdgeDeployment spec)
    /// becomes, as YAML, without talking to a cluster.
    Translate {
        file: PathBuf,
        #[arg(long, default_value = "edge-deployment")]
        name: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Leave the `edgeHub` module to whoever installed the hub.
        #[arg(long)]
        external_hub: bool,
    },
    /// Reconcile EdgeDeployments (in-cluster config or KUBECONFIG).
    Run {
        /// Watch only this namespace (a namespaced Role is then enough).
        #[arg(long, env = "EDGEHUB_OPERATOR_NAMESPACE")]
        namespace: Option<String>,
        /// Also be the device's `$edgeAgent`: a module connection string
        /// (`HostName=…;DeviceId=…;ModuleId=$edgeAgent;SharedAccessKey=…`,
        /// plus `GatewayHostName=…` to reach the hub).
        #[arg(
            long,
            env = "EDGEHUB_EDGE_AGENT_CONNECTION_STRING",
            hide_env_values = true
        )]
        edge_agent: Option<String>,
        /// CA certificate (PEM) the hub's server certificate chains to.
        #[arg(long, env = "EDGEHUB_CA", requires = "edge_agent")]
        hub_ca: Option<PathBuf>,
        /// Hub MQTTS port.
        #[arg(long, env = "EDGEHUB_MQTTS_PORT", default_value_t = 8883)]
        hub_port: u16,
        /// The hub is installed by other means (the Helm chart does): the
        /// `edgeHub` module gets no objects; its status is still reported.
        #[arg(long, env = "EDGEHUB_EXTERNAL_HUB")]
        external_hub: bool,
        /// Where the agent writes the EdgeDeployment; default
        /// `msiot-<hub>-<device>` (created when missing).
        #[arg(long, env = "EDGEHUB_DEVICE_NAMESPACE")]
        device_namespace: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Crd => print!("{}", crd::crd_yaml()),
        Command::Translate {
            file,
            name,
            namespace,
            external_hub,
        } => {
            let raw =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let doc: serde_yaml::Value = serde_yaml::from_slice(&raw)
                .with_context(|| format!("{} is neither JSON nor YAML", file.display()))?;
            let doc: serde_json::Value = serde_json::to_value(doc)?;
            // An EdgeDeployment (or its spec) or an IoT Edge manifest.
            let spec = match doc.get("spec").cloned().or_else(|| {
                doc.get("modules")
                    .filter(|_| doc.get("systemModules").is_none())
                    .map(|_| doc.clone())
            }) {
                Some(spec) => serde_json::from_value(spec).context("not an EdgeDeployment spec")?,
                None => manifest::spec_from_manifest(&doc)?,
            };
            let plan = translate::plan(
                &spec,
                &translate::Target {
                    owner: &name,
                    namespace: &namespace,
                    external_hub,
                },
            )?;
            for (module, (_, unsupported)) in &plan.modules {
                for u in unsupported {
                    eprintln!("warning: module {module}: not supported, ignored: {u}");
                }
            }
            let docs: Vec<String> = plan
                .claims
                .iter()
                .map(serde_yaml::to_string)
                .chain(plan.config_maps.iter().map(serde_yaml::to_string))
                .chain(plan.service_accounts.iter().map(serde_yaml::to_string))
                .chain(plan.deployments.iter().map(serde_yaml::to_string))
                .chain(plan.services.iter().map(serde_yaml::to_string))
                .collect::<Result<_, _>>()?;
            print!("{}", docs.join("---\n"));
        }
        Command::Run {
            namespace,
            edge_agent,
            hub_ca,
            hub_port,
            external_hub,
            device_namespace,
        } => {
            let client = kube::Client::try_default()
                .await
                .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let shutdown = {
                let mut rx = stop_rx.clone();
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                }
            };
            let controller = tokio::spawn(reconcile::run(
                client.clone(),
                namespace.clone(),
                external_hub,
                shutdown,
            ));
            let agent = match edge_agent {
                Some(cs) => {
                    let cfg = agent::AgentConfig::new(
                        &cs,
                        hub_ca.as_deref(),
                        hub_port,
                        device_namespace.or(namespace),
                    )?;
                    let mut rx = stop_rx.clone();
                    Some(tokio::spawn(agent::run(client, cfg, async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })))
                }
                None => None,
            };
            // SIGTERM is how Kubernetes stops a pod; SIGINT for a terminal.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            tracing::info!("stopping");
            let _ = stop_tx.send(true);
            controller.await?;
            if let Some(a) = agent {
                a.await??;
            }
        }
    }
    Ok(())
}
