//! `coordinator`: the control plane. `coordinator data` prints corpus statistics;
//! `coordinator --workers N` runs a data-parallel training job.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod data_cmd;

#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about = "Data-parallel LSTM training on IMDB: the coordinator")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load, tokenize and encode the corpus, and print its statistics.
    Data(data_cmd::DataCmd),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Data(cmd)) => data_cmd::run(&cmd),
        None => Err(anyhow::anyhow!("training runs are not implemented yet; try `coordinator data`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
