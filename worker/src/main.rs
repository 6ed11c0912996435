//! `ragd-worker`: runs on every machine of the cluster.

use clap::{Parser, Subcommand};
use ragd_worker::cli_train;

/// ragd cluster worker.
#[derive(Debug, Parser)]
#[command(name = "ragd-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fine-tune a sentence-embedding model on a pairs file (one machine).
    Train(cli_train::TrainArgs),
    /// Evaluate a model (optionally against a baseline) on a BEIR-layout test set.
    Evaluate(cli_train::EvaluateArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Train(a) => cli_train::run_train(a),
        Command::Evaluate(a) => cli_train::run_evaluate(a),
    }
}
