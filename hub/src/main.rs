use anyhow::Context;
use clap::Parser;
use edgehub::{Config, Server};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_new(&config.log)
                .with_context(|| format!("invalid --log filter {:?}", config.log))?,
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let server = Server::bind(&config).await?;
    // Machine-readable lines on stdout (logs go to stderr) so scripts and
    // tests can find ports bound as :0.
    if let Some(a) = server.mqtt_addr() {
        println!("listening mqtt {a}");
    }
    if let Some(a) = server.mqtts_addr() {
        println!("listening mqtts {a}");
    }
    tracing::info!(
        mqtt = ?server.mqtt_addr(),
        mqtts = ?server.mqtts_addr(),
        data_dir = %config.data_dir.display(),
        "edgehub started"
    );
    server.run(shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
