use anyhow::Context;
use clap::Parser;
use edgehub::config::{Command, RoutesCommand};
use edgehub::{Config, Server};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Some(Command::Routes(cmd)) = &config.command {
        return match cmd {
            RoutesCommand::Test { route, message } => edgehub::routes_cli::test(route, message),
            RoutesCommand::Check { deployment } => {
                if edgehub::routes_cli::check(deployment)? > 0 {
                    std::process::exit(1);
                }
                Ok(())
            }
        };
    }
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
