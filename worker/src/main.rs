//! `ragd-worker`: runs on every machine of the cluster.
use clap::{Parser, Subcommand};

/// ragd cluster worker.
#[derive(Debug, Parser)]
#[command(name = "ragd-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a training set (queries, positives, hard negatives) and a test set from documents.
    GenerateData(ragd_worker::cli_data::GenerateDataArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::GenerateData(args) => ragd_worker::cli_data::run_generate_data(args).await,
    }
}
