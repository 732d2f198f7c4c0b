//! `coordinator data`: the data pipeline on its own, with statistics and stage timings.

use clap::Args;
use trainer_core::cli::{ConfigArgs, DataArgs};
use trainer_core::corpus::{read_corpus, DataSource};
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
    /// Also write a subword config's trained tokenizer.json to this file.
    #[arg(long)]
    tokenizer_out: Option<std::path::PathBuf>,
    /// Also write `--samples` reviews of each split as JSON lines, each with its text and the
    /// token ids that training uses (`{"split", "id", "label", "text", "ids"}`): what the
    /// Python parity test encodes again with `tokenizer.json`. Reads the corpus once more.
    #[arg(long)]
    sample_out: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 200)]
    samples: usize,
}

pub fn run(cmd: &DataCmd) -> anyhow::Result<()> {
    let config = cmd.data.configure(cmd.config.resolve()?)?;
    let options = cmd.data.prepare_options(&config);
    if let (Some(_), Some(data)) = (&cmd.sample_out, &cmd.data.data) {
        // It reads the reviews again with their IMDB ids, to check each against its encoding.
        anyhow::ensure!(
            trainer_core::labelled::detect(data, &options.labelled)?.is_none(),
            "--sample-out reads IMDB's layout only, and {} is a corpus of another format",
            data.display()
        );
    }
    let (corpus, report) = prepare(&options)?;
    if let Some(path) = &cmd.vocab_out {
        corpus.vocab.save(path)?;
    }
    if let Some(path) = &cmd.tokenizer_out {
        let json = corpus.tokenizer_json.as_deref().ok_or_else(|| {
            anyhow::anyhow!("--tokenizer-out needs a subword data.tokenizer (bpe or unigram)")
        })?;
        trainer_core::write_atomically(path, json.as_bytes())?;
    }
    if let Some(path) = &cmd.sample_out {
        let data = cmd.data.data.as_ref().ok_or_else(|| anyhow::anyhow!("--sample-out needs --data"))?;
        let raw = read_corpus(&DataSource::from_path(data)?)?;
        let mut lines = String::new();
        for (name, reviews, split) in
            [("train", &raw.train, &corpus.train), ("test", &raw.test, &corpus.test)]
        {
            anyhow::ensure!(reviews.len() == split.len(), "the {name} split changed while it was read");
            let stride = (reviews.len() / cmd.samples.max(1)).max(1);
            for i in (0..reviews.len()).step_by(stride).take(cmd.samples) {
                let r = &reviews[i];
                anyhow::ensure!(
                    r.id == split.ids[i] && r.label == split.labels[i],
                    "review {i} of the {name} split is not the encoded one"
                );
                let line = serde_json::json!({
                    "split": name, "id": r.id, "label": r.label, "text": r.text, "ids": split.review(i),
                });
                lines.push_str(&line.to_string());
                lines.push('\n');
            }
        }
        trainer_core::write_atomically(path, lines.as_bytes())?;
    }
    let stats = corpus_stats(&corpus, report);
    if cmd.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print!("{}", stats.render());
    }
    Ok(())
}
