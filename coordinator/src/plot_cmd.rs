//! `coordinator plot RUN_DIR [RUN_DIR...]`: the curves of finished or running runs (this
//! coordinator's or `worker train`'s run folders) on one figure.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use trainer_viz::curves::CURVES_FILE;
use trainer_viz::{plot_runs, RunCurves};

#[derive(Debug, Args)]
pub struct PlotCmd {
    /// Run folders (each with a metrics.jsonl), drawn in this order.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The PNG to write [default: RUN_DIR/curves.png for one run, curves-compare.png for several].
    #[arg(long, short)]
    out: Option<PathBuf>,
}

pub fn run(cmd: &PlotCmd) -> anyhow::Result<()> {
    let runs = cmd
        .runs
        .iter()
        .map(|dir| {
            RunCurves::load(dir).with_context(|| format!("cannot read the run folder {}", dir.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out = match (&cmd.out, cmd.runs.as_slice()) {
        (Some(out), _) => out.clone(),
        (None, [one]) => one.join(CURVES_FILE),
        (None, _) => PathBuf::from("curves-compare.png"),
    };
    plot_runs(&runs, &out)?;
    println!("{}", out.display());
    Ok(())
}
