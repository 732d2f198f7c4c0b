//! `worker predict`: a trained run folder (model, vocab, config, and for a subword run its
//! `tokenizer.json`) applied to new reviews.

use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::Device;
use trainer_core::batch::{truncate, Batch};
use trainer_core::config::JobConfig;
use trainer_core::encode::encode_text;
use trainer_core::subword::{SubwordTokenizer, TOKENIZER_FILE};
use trainer_core::tokenizer::Tokenizer;
use trainer_core::vocab::UNK_ID;
use trainer_core::Vocab;

use crate::checkpoint::{load_model_weights, MODEL_FILE};
use crate::error::{Result, WorkerError};
use crate::model::{Dropouts, LstmClassifier, ModelShape};
use crate::run::{CONFIG_FILE, VOCAB_FILE};
use crate::tbptt::PassOptions;
use crate::trainer::positive_probabilities;

/// Reviews per forward pass.
const PREDICT_BATCH: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// `positive` or `negative`.
    pub label: &'static str,
    /// Probability of `label`.
    pub probability: f64,
    /// Probability of `positive`.
    pub positive_probability: f64,
    /// Tokens the model read (after `data.max_len`).
    pub tokens: usize,
    /// How many of them are `<unk>`.
    pub unknown_tokens: usize,
}

/// How a run folder turns text into ids: the run's own tokenizer, never a new one.
enum TextEncoder {
    Words(Tokenizer),
    Subword(Box<SubwordTokenizer>),
}

/// A model loaded from a run folder.
pub struct Predictor {
    model: LstmClassifier,
    vocab: Vocab,
    config: JobConfig,
    encoder: TextEncoder,
}

impl Predictor {
    /// Loads `dir/{config.toml, vocab.txt, model.safetensors}` (and `tokenizer.json` when
    /// the run's `data.tokenizer` is a subword one) onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let bad = |message: String| WorkerError::ModelDir { path: dir.to_path_buf(), message };
        if !dir.is_dir() {
            return Err(bad(
                "does not exist or is not a folder (pass the --out folder of `worker train`)".into()
            ));
        }
        let need = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(bad(format!("{name} is missing; is this a finished `worker train` run folder?")))
            }
        };
        let (config_path, vocab_path, model_path) =
            (need(CONFIG_FILE)?, need(VOCAB_FILE)?, need(MODEL_FILE)?);
        let config = JobConfig::from_toml_file(&config_path)?;
        config.validate()?;
        let vocab = Vocab::load(&vocab_path)?;
        let encoder = if config.data.tokenizer.is_basic_english() {
            TextEncoder::Words(Tokenizer::new())
        } else {
            // A missing or corrupt file is an error naming it; one that is not this run's
            // (another vocabulary) is refused too.
            let subword = SubwordTokenizer::load(&dir.join(TOKENIZER_FILE))?;
            if subword.vocab()? != vocab {
                return Err(bad(format!(
                    "{TOKENIZER_FILE} does not match {VOCAB_FILE}: they come from different runs"
                )));
            }
            TextEncoder::Subword(Box::new(subword))
        };
        let shape = ModelShape::new(&config.model, vocab.len());
        let mut model = LstmClassifier::new(shape, Dropouts::from_config(&config.model), device)?;
        load_model_weights(&mut model, &model_path)?;
        Ok(Self { model, vocab, config, encoder })
    }

    pub fn config(&self) -> &JobConfig {
        &self.config
    }

    /// Classifies each text; an empty text (no tokens) is read as a single `<unk>`.
    pub fn predict(&mut self, texts: &[String]) -> Result<Vec<Prediction>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(PREDICT_BATCH) {
            let mut rows: Vec<Vec<u32>> = Vec::with_capacity(chunk.len());
            for text in chunk {
                let ids = match &mut self.encoder {
                    TextEncoder::Words(tokenizer) => encode_text(tokenizer, &self.vocab, text),
                    TextEncoder::Subword(subword) => subword.encode(text)?,
                };
                let ids = truncate(&ids, self.config.data.max_len, self.config.data.truncation);
                rows.push(if ids.is_empty() { vec![UNK_ID] } else { ids });
            }
            let batch = batch_of(&rows);
            let probs = positive_probabilities(
                &self.model,
                &batch,
                PassOptions::new(self.config.train.bptt, self.model.device()),
            )?;
            for (p, row) in probs.iter().zip(&rows) {
                let positive = f64::from(*p);
                let (label, probability) =
                    if positive >= 0.5 { ("positive", positive) } else { ("negative", 1.0 - positive) };
                out.push(Prediction {
                    label,
                    probability,
                    positive_probability: positive,
                    tokens: row.len(),
                    unknown_tokens: row.iter().filter(|&&id| id == UNK_ID).count(),
                });
            }
        }
        Ok(out)
    }
}

/// Pads token rows into a batch (labels are placeholders).
pub fn batch_of(rows: &[Vec<u32>]) -> Batch {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut tokens = vec![0i64; rows.len() * width];
    for (r, ids) in rows.iter().enumerate() {
        for (j, &id) in ids.iter().enumerate() {
            tokens[r * width + j] = i64::from(id);
        }
    }
    Batch {
        tokens,
        lengths: rows.iter().map(|r| r.len() as i64).collect(),
        labels: vec![0; rows.len()],
        size: rows.len(),
        max_len: width,
    }
}
