//! `coordinator data`: the data pipeline on its own, with statistics and stage timings.

use clap::Args;
use trainer_core::cli::{ConfigArgs, DataArgs};
use trainer_core::pipeline::prepare;
use trainer_core::stats::corpus_stats;

#[derive(Debug, Args)]
pub struct DataCmd {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    config: ConfigArgs,
    /// Print the statistics as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the vocabulary (one word per line, in id order) to this file.
    #[arg(long)]
    vocab_out: Option<std::path::PathBuf>,
}

pub fn run(cmd: &DataCmd) -> anyhow::Result<()> {
    let config = cmd.data.configure(cmd.config.resolve()?)?;
    let (corpus, report) = prepare(&cmd.data.prepare_options(&config))?;
    if let Some(path) = &cmd.vocab_out {
        corpus.vocab.save(path)?;
    }
    let stats = corpus_stats(&corpus, report);
    if cmd.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print!("{}", stats.render());
    }
    Ok(())
}
