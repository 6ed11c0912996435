//! `ragd-coord`: the ragd cluster coordinator daemon and its admin commands.

mod jobs_cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ragd_coordinator::admin::{AdminRequest, AdminResponse};
use ragd_coordinator::config::{CliOverrides, CoordinatorConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The ragd cluster coordinator: finds the workers of this cluster on the LAN, enrols them and
/// tracks them. Configuration comes from defaults, then --config FILE, then RAGD_COORD_*
/// environment variables (nested keys with `__`), then these flags.
#[derive(Debug, Parser)]
#[command(name = "ragd-coord", version, about)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "RAGD_COORD_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the cluster CA, keys and state database (default: the platform data dir).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Log filter, e.g. `info` or `ragd_coordinator=debug` (RUST_LOG also works).
    #[arg(long, global = true, default_value = "info")]
    log: String,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the cluster: CA, coordinator certificate, state database; print the join token.
    Init {
        /// This coordinator's id (lowercase letters, digits and '-'); default: the host name.
        #[arg(long)]
        id: Option<String>,
        /// Replace an existing cluster: the old state directory is renamed aside (the path is
        /// printed) and every enrolled worker must re-join.
        #[arg(long)]
        force: bool,
    },
    /// Run the coordinator daemon.
    Serve {
        /// UDP address to listen on for enrolments (default 0.0.0.0:7700).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// A worker to dial directly, HOST:PORT (repeatable), for networks without multicast.
        #[arg(long = "peer", value_name = "HOST:PORT")]
        peers: Vec<String>,
        /// Do not use mDNS (neither advertise nor browse).
        #[arg(long)]
        no_mdns: bool,
        /// mDNS UDP port (5353 on a real network).
        #[arg(long)]
        mdns_port: Option<u16>,
        /// Heartbeat interval, e.g. `2s` or `500ms`.
        #[arg(long, value_parser = humantime::parse_duration)]
        heartbeat_interval: Option<Duration>,
    },
    /// List the workers (id, host, address, backend, GPU, RAM, LLM models, state, last seen).
    Workers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<WorkersAction>,
    },
    /// Show or rotate the join token.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Submit a fine-tuning job: generation spread over the workers, training on the best one.
    Submit(Box<jobs_cli::SubmitArgs>),
    /// List jobs, or show, follow or cancel one.
    Jobs {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<jobs_cli::JobsAction>,
    },
    /// A job's log (`jobs logs ID`).
    Logs {
        /// Job id.
        id: String,
        /// Keep printing until the job ends.
        #[arg(long)]
        follow: bool,
    },
    /// Cancel a job (`jobs cancel ID`).
    Cancel {
        /// Job id.
        id: String,
    },
    /// The model registry: list, promote, rollback.
    Models {
        #[command(subcommand)]
        action: jobs_cli::ModelsAction,
    },
}

#[derive(Debug, Subcommand)]
enum WorkersAction {
    /// Revoke a worker (its certificate is refused from now on, its connection closed) and
    /// rotate the join token, which the removed machine knew.
    Remove {
        /// The worker's id.
        id: String,
        /// Keep the current join token (only if the removed machine cannot have leaked it).
        #[arg(long)]
        keep_token: bool,
    },
    /// Let a new machine take over a worker's name: revokes the old certificate and keeps the
    /// join token, so `ragd-worker join TOKEN --name ID` on the new machine succeeds.
    Replace {
        /// The worker's id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenAction {
    /// Print the current join token.
    Show,
    /// Replace the join secret; tokens handed out before stop working.
    Rotate,
}

fn main() -> std::process::ExitCode {
    ragd_engine::device::settle_thread_count();
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ragd_shared::daemon::init_tracing(&cli.log, cli.log_json);
    let mut overrides = CliOverrides {
        state_dir: cli.state_dir.clone(),
        ..Default::default()
    };
    if let Command::Serve {
        listen,
        peers,
        no_mdns,
        mdns_port,
        heartbeat_interval,
    } = &cli.command
    {
        overrides.listen = *listen;
        overrides.peers = peers.clone();
        overrides.no_mdns = *no_mdns;
        overrides.mdns_port = *mdns_port;
        overrides.heartbeat_interval = *heartbeat_interval;
    }
    let cfg = CoordinatorConfig::load(cli.config.as_deref(), overrides)?;
    let runtime = ragd_engine::alloc::runtime().context("starting the async runtime")?;
    runtime.block_on(run(cli.command, cfg))
}

async fn run(command: Command, cfg: CoordinatorConfig) -> anyhow::Result<()> {
    match command {
        Command::Init { id, force } => {
            let id = id.unwrap_or_else(default_id);
            let out = ragd_coordinator::init(&cfg, &id, force)?;
            if let Some(aside) = &out.moved_aside {
                println!("Moved the earlier state aside to {}", aside.display());
            }
            println!("Initialised cluster in {}", out.state_dir.display());
            println!("Coordinator id: {}", out.coordinator_id);
            println!();
            println!("Join token (keep it secret; `ragd-coord token rotate` replaces it):");
            println!("  {}", out.token);
            println!();
            println!("On each worker machine run:");
            println!(
                "  ragd-worker join {} [--coordinator THIS_HOST:{}]",
                out.token,
                cfg.listen.port()
            );
        }
        Command::Serve { .. } => {
            let cancel = CancellationToken::new();
            let signal = cancel.clone();
            tokio::spawn(async move {
                ragd_shared::daemon::shutdown_signal().await;
                signal.cancel();
            });
            ragd_coordinator::serve(cfg, cancel).await?;
        }
        Command::Workers { json, action: None } => {
            let AdminResponse::Workers(workers) =
                ragd_coordinator::admin_request(&cfg, AdminRequest::ListWorkers).await?
            else {
                anyhow::bail!("the daemon answered something else than a worker list");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&workers)?);
            } else if workers.is_empty() {
                println!("No workers enrolled yet: run `ragd-worker join TOKEN` on a worker machine (`ragd-coord token show` prints the token).");
            } else {
                print!("{}", ragd_coordinator::render_workers(&workers));
            }
        }
        Command::Workers {
            action: Some(WorkersAction::Remove { id, keep_token }),
            ..
        } => {
            let req = match keep_token {
                true => AdminRequest::RemoveWorker { id: id.clone() },
                false => AdminRequest::RemoveWorkerRotatingToken { id: id.clone() },
            };
            let resp = ragd_coordinator::admin_request(&cfg, req).await?;
            println!("Removed worker {id}: its certificate is refused from now on.");
            if let AdminResponse::RemovedRotated { token, .. } = resp {
                println!("The join token was rotated (the removed machine knew the old one).");
                println!("Enrolled workers are unaffected; new workers join with:");
                println!("  {token}");
            } else {
                println!("The join token was kept: rotate it (`ragd-coord token rotate`) if the removed machine may have leaked it.");
            }
        }
        Command::Workers {
            action: Some(WorkersAction::Replace { id }),
            ..
        } => {
            ragd_coordinator::admin_request(&cfg, AdminRequest::RemoveWorker { id: id.clone() })
                .await?;
            println!("Revoked the certificate of worker {id}; the join token is unchanged.");
            println!("On the machine that replaces it run: ragd-worker join TOKEN --name {id}");
        }
        Command::Submit(args) => jobs_cli::submit(&cfg, *args).await?,
        Command::Jobs { json, action } => jobs_cli::jobs(&cfg, json, action).await?,
        Command::Logs { id, follow } => {
            jobs_cli::jobs(&cfg, false, Some(jobs_cli::JobsAction::Logs { id, follow })).await?
        }
        Command::Cancel { id } => {
            jobs_cli::jobs(&cfg, false, Some(jobs_cli::JobsAction::Cancel { id })).await?
        }
        Command::Models { action } => jobs_cli::models(&cfg, action).await?,
        Command::Token { action } => {
            let req = match action {
                TokenAction::Show => AdminRequest::ShowToken,
                TokenAction::Rotate => AdminRequest::RotateToken,
            };
            match ragd_coordinator::admin_request(&cfg, req).await? {
                AdminResponse::Token(t) => println!("{t}"),
                other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
    }
    Ok(())
}

fn default_id() -> String {
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    ragd_shared::identity::node_id_from_hostname(&host, "coordinator")
}
