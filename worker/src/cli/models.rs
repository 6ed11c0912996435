//! `ragd-worker models`: list the catalogue and pull models into the Hugging Face cache.
use clap::{Args, Subcommand};

use ragd_engine::models::{self, HubAccess, ModelRole, PullSpec, CATALOG};

/// `ragd-worker models ...`.
#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ModelsCommand,
}

/// The `models` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List the models known to work, and whether each is in the local cache.
    List,
    /// Download a model into the Hugging Face cache (HF_HOME; HF_ENDPOINT for a mirror), check
    /// its SHA-256, and print its path. Already cached: nothing is downloaded.
    Pull {
        /// A catalogue name (see `models list`), OWNER/REPO:FILE.gguf, or OWNER/REPO for a
        /// sentence-transformers model.
        spec: String,
    },
}

/// Runs a `models` subcommand. Blocking.
pub fn run_models(args: ModelsArgs) -> anyhow::Result<()> {
    let hub = HubAccess::from_env();
    match args.command {
        ModelsCommand::List => {
            println!(
                "{:<18} {:<10} {:<9} {:<19} {:<7} about",
                "name", "role", "size", "licence", "cached"
            );
            for e in CATALOG {
                let cached = match e.file {
                    Some(file) => hub.cache.model(e.repo.to_string()).get(file).is_some(),
                    None => hub
                        .cache
                        .model(e.repo.to_string())
                        .get("model.safetensors")
                        .is_some(),
                };
                let role = match e.role {
                    ModelRole::Generator => "generator",
                    ModelRole::Embedder => "embedder",
                };
                println!(
                    "{:<18} {:<10} {:<9} {:<19} {:<7} {}",
                    e.name,
                    role,
                    e.size,
                    e.licence,
                    if cached { "yes" } else { "no" },
                    e.about
                );
            }
            println!("\ncache: {}", hub.cache.path().display());
        }
        ModelsCommand::Pull { spec } => {
            let parsed = PullSpec::parse(&spec)?;
            let path = models::pull(&parsed, &hub)?;
            println!("{}", path.display());
            match parsed {
                PullSpec::Gguf { .. } => eprintln!(
                    "use it with: ragd-worker generate-data --llm builtin --gguf {spec} ..."
                ),
                PullSpec::Embedder { repo } => {
                    eprintln!("use it with: ragd-worker train --base-model {repo} ...")
                }
            }
        }
    }
    Ok(())
}
