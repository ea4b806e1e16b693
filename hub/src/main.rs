use anyhow::Context;
use clap::Parser;
use edgehub::config::{Command, RoutesCommand};
use edgehub::{Config, Server};
use tracing_subscriber::EnvFilter;

// Both protocol heads allocate per frame and per message (the AMQP one
// more: fe2o3's engines, the generic body); glibc's allocator took a fifth
// of the hub's CPU there (BENCHMARKS.md). RocksDB's C++ keeps its own.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        // Colour codes only for people: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Handlers go in before anything is bound or printed: a signal sent as
    // soon as "listening" appears must not be lost (a process started with
    // SIGINT ignored would otherwise drop it).
    let shutdown = shutdown_signal()?;
    let server = Server::bind(&config).await?;
    // Machine-readable lines on stdout (logs go to stderr) so scripts and
    // tests can find ports bound as :0.
    let listeners = server.listen_addrs();
    for (name, a) in &listeners {
        println!("listening {name} {a}");
    }
    // Every listener is printed above: scripts can stop reading here.
    println!("ready");
    tracing::info!(
        listeners = ?listeners,
        data_dir = %config.data_dir.display(),
        "edgehub started"
    );
    server.run(shutdown).await;
    Ok(())
}

/// Installs the SIGINT (Ctrl-C) and SIGTERM handlers now; the returned future
/// completes when either arrives.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
