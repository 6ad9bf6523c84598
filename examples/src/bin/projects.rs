//! The `projects` service: `projects [serve] [--role all|api|projector]`
//! runs it (`serve` is the default command, so its flags work without the
//! word), `projects rebuild` rebuilds its list views from the log.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kes_examples::service::{DEFAULT_STORE, DEFAULT_VIEW, Role, Service, Settings};
use kes_http::HttpConfig;
use tracing_subscriber::EnvFilter;

/// The projects service: event-sourced projects and tasks over REST.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Where the events live: sqlite://PATH, postgres://… or kafka://HOST:PORT[,HOST:PORT][/PREFIX].
    #[arg(long, env = "KES_STORE", default_value = DEFAULT_STORE, global = true)]
    store: String,
    /// Where the list views live: sqlite://PATH or postgres://… (view-sql), or an index directory (view-search).
    #[arg(long, env = "KES_VIEW", default_value = DEFAULT_VIEW, global = true)]
    view: String,
    /// `serve`'s flags, for `projects` without a command.
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KES_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Origins allowed by CORS (comma-separated), for a front end on another port.
    #[arg(long, env = "KES_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// What this process does: `all` (API and projections), `api` (the API,
    /// reading views that projector processes keep) or `projector`
    /// (projections, with only /health and /metrics).
    #[arg(long, env = "KES_ROLE", value_enum, default_value_t = RoleArg::All)]
    role: RoleArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    All,
    Api,
    Projector,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::All => Role::All,
            RoleArg::Api => Role::Api,
            RoleArg::Projector => Role::Projector,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the REST API (the default).
    Serve(ServeArgs),
    /// Rebuild list views from the log, while the old ones keep answering.
    Rebuild {
        /// Only this projection (`projects` or `tasks`); all when absent.
        #[arg(long, env = "KES_PROJECTION")]
        projection: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(cli.serve));
    let mut settings = Settings { store: cli.store, view: cli.view, http: HttpConfig::default() };
    match command {
        Command::Serve(args) => {
            settings.http.cors_origins = args.cors_origins;
            serve(settings, args.listen, args.role.into()).await
        }
        Command::Rebuild { projection } => rebuild(settings, projection).await,
    }
}

async fn serve(settings: Settings, listen: SocketAddr, role: Role) -> anyhow::Result<()> {
    let service = Service::open(&settings).await?;
    if role.runs_projections() {
        service.start_projections().await?;
    }
    let router = service.router_for(role)?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    tracing::info!(address = %listener.local_addr()?, store = %settings.store, ?role, "projects service listening");
    axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await.context("serving")?;
    tracing::info!("in-flight requests finished; stopping projections");
    service.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}

async fn rebuild(settings: Settings, only: Option<String>) -> anyhow::Result<()> {
    let service = Service::open(&settings).await?;
    let names = match only {
        Some(name) => vec![name],
        None => service.projection_names(),
    };
    for name in names {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} records ({per_sec}, {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(name.clone());
        bar.enable_steady_tick(Duration::from_millis(200));
        let report = service
            .rebuild(&name, &|done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .await?;
        bar.finish_and_clear();
        let secs = report.elapsed.as_secs_f64();
        let rate = if secs > 0.0 { report.events as f64 / secs } else { 0.0 };
        println!("rebuilt {}: {} events in {:.2}s ({:.0} events/s)", report.name, report.events, secs, rate);
    }
    service.shutdown().await;
    Ok(())
}
