//! `coordinator`: the control plane. `coordinator --workers N` runs a data-parallel training
//! job (see train_cmd); `coordinator data` prints corpus statistics.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod backend;
mod checkpoints;
mod data_cmd;
mod driver;
mod eval;
mod job;
mod launcher;
mod peer_input;
mod plot_cmd;
mod progress;
mod run_dir;
mod service;
mod status_cmd;
mod telemetry;
mod train_cmd;
mod views;

#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Data-parallel LSTM training on IMDB: the coordinator",
    after_help = "The job secret comes from TRAINER_JOB_SECRET when set (required with \
                  --external-workers); otherwise a random one is made for the job and handed \
                  to the local workers in their environment."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: train_cmd::TrainArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load, tokenize and encode the corpus, and print its statistics.
    Data(Box<data_cmd::DataCmd>),
    /// Draw the curves of one or more run folders on one figure (PNG).
    Plot(plot_cmd::PlotCmd),
    /// Print what a running job is doing: epoch, step, ranks, ETA (needs the job secret).
    Status(status_cmd::StatusCmd),
}

fn init_tracing(output: progress::Output) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: logs that go to files or tests stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(output).init();
}

fn main() -> ExitCode {
    let output = progress::Output::default();
    let cli: Cli = trainer_core::cli::parse_treating_empty_env_as_unset();
    init_tracing(output.clone());
    let result = match cli.command {
        Some(Command::Data(cmd)) => data_cmd::run(&cmd),
        Some(Command::Plot(cmd)) => plot_cmd::run(&cmd),
        Some(Command::Status(cmd)) => status_cmd::run(&cmd),
        None => train_cmd::run(cli.train, output),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.is::<driver::Interrupted>() {
                ExitCode::from(trainer_core::exit::INTERRUPTED)
            } else if e.is::<driver::Terminated>() {
                ExitCode::from(trainer_core::exit::LOST)
            } else {
                ExitCode::from(trainer_core::exit::code_for(e.chain()))
            }
        }
    }
}
