//! `worker predict`: a trained run folder (model, vocab, config, and for a subword run its
//! `tokenizer.json`) applied to new reviews.

use std::collections::BTreeMap;
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
use crate::trainer::class_probabilities;

/// Reviews per forward pass.
const PREDICT_BATCH: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// IMDB's model: `positive` or `negative`; any other: the class name.
    pub label: String,
    /// The most probable class's name (as in labels.json).
    pub class: String,
    /// Probability of `label`.
    pub probability: f64,
    /// Probability of `positive` (IMDB's model only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub positive_probability: Option<f64>,
    /// The probability of every class, by name.
    pub probabilities: BTreeMap<String, f64>,
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
    /// The class names (labels.json; IMDB's `neg`, `pos` for folders written before it).
    classes: Vec<String>,
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
        let classes = trainer_core::labelled::read_labels(dir)?;
        if classes.len() != config.model.num_classes {
            return Err(bad(format!(
                "labels.json names {} classes, but config.toml's model has {} outputs",
                classes.len(),
                config.model.num_classes
            )));
        }
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
        Ok(Self { model, vocab, config, encoder, classes })
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
            let probs = class_probabilities(
                &self.model,
                &batch,
                PassOptions::new(self.config.train.bptt, self.model.device()),
            )?;
            let imdb = self.classes == trainer_core::corpus::imdb_classes();
            for (p, row) in probs.iter().zip(&rows) {
                let (best, probability) =
                    p.iter()
                        .enumerate()
                        .fold((0, f32::MIN), |(bi, bp), (i, &v)| if v > bp { (i, v) } else { (bi, bp) });
                let class = self.classes[best].clone();
                // IMDB's model keeps its words, and says `positive` on a tie (p >= 0.5).
                let (label, best, probability) = if imdb {
                    let positive = f64::from(p[1]);
                    if positive >= 0.5 {
                        ("positive".to_string(), 1, positive)
                    } else {
                        ("negative".to_string(), 0, 1.0 - positive)
                    }
                } else {
                    (class, best, f64::from(probability))
                };
                out.push(Prediction {
                    label,
                    class: self.classes[best].clone(),
                    probability,
                    positive_probability: imdb.then(|| f64::from(p[1])),
                    probabilities: self
                        .classes
                        .iter()
                        .cloned()
                        .zip(p.iter().map(|&v| f64::from(v)))
                        .collect(),
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
