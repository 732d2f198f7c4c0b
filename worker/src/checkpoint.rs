//! Checkpoints and model files, both safetensors.
//!
//! A checkpoint is one file, `checkpoint.safetensors`: the parameters (`model.<name>`),
//! Adam's moments (`adam.exp_avg.<name>`, `adam.exp_avg_sq.<name>`; none for SGD, which has
//! no state besides its step count) and, in the header's
//! metadata, a JSON [`CheckpointMeta`] with the position (epoch, batches done, optimizer
//! step), the RNG scheme, the resolved config, the model shape and the vocabulary's
//! fingerprint. It is written to a temporary name and renamed, so a crash leaves the old
//! checkpoint or the new one. Randomness is a function of the position (the data order of
//! (seed, epoch), the dropout masks of (seed, rank, step)), so the position is the RNG state.
//!
//! A distributed run's checkpoints also carry the best model by validation so far (a
//! [`KeptModel`]): its parameters as `best.<name>`, its epoch in `best_model_epoch`.
//! Checkpoints written before that have neither and still load, holding no best model.
//!
//! The exported model, `model.safetensors`, holds only the parameters under PyTorch's
//! names, with the config in the metadata: the kept model (the best by validation). Beside
//! it, `model-last.safetensors` holds the last epoch's model, in the same format.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};
use trainer_core::config::{self, JobConfig};
use trainer_core::integrity::{self, FileDigest};
use trainer_core::Vocab;

use crate::error::{Result, WorkerError};
use crate::model::{LstmClassifier, ModelShape};
use crate::optim::Optimizer;
use crate::tensor_file::{
    data_section, parse_safetensors, raw_tensors, read_bytes, serialize, write_safetensors,
};
use crate::trainer::Trainer;

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const MODEL_FILE: &str = "model.safetensors";
/// The last epoch's model, beside the kept one.
pub const LAST_MODEL_FILE: &str = "model-last.safetensors";
pub const CHECKPOINT_FORMAT: &str = "imdb-ddp-checkpoint/1";
pub const MODEL_FORMAT: &str = "imdb-ddp-model/1";
/// The one metadata key of each file: a single key keeps the header's bytes reproducible
/// (safetensors writes a map's keys in hash order).
const CHECKPOINT_KEY: &str = "imdb_ddp_checkpoint";
const MODEL_KEY: &str = "imdb_ddp_model";
/// The kept best model's tensors in a checkpoint: `best.<parameter name>`.
const BEST_PREFIX: &str = "best.";

/// The exported model's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub format: String,
    pub shape: ModelShape,
    /// The resolved job config, as TOML.
    pub config: String,
}

/// Where a run stands: the epoch in progress, how many of its batches are done, and the
/// optimizer steps taken in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Position {
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub global_step: u64,
}

/// The training loop's own state, kept with the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LoopState {
    pub best_val_accuracy: Option<f64>,
    pub best_epoch: Option<usize>,
    pub epochs_without_improvement: usize,
    pub epochs_completed: usize,
    pub train_seconds: f64,
    pub train_tokens: u64,
    pub stopped_early: bool,
}

/// How the run's randomness is derived; with the position it is the whole RNG state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    pub scheme: String,
}

impl RngState {
    pub fn for_seed(seed: u64) -> Self {
        Self {
            seed,
            scheme: "data order: ShardPlan::for_epoch(seed, epoch); dropout: manual_seed(step_seed(seed, rank, global_step))".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    pub position: Position,
    pub optimizer_steps: u64,
    pub rng: RngState,
    pub config: JobConfig,
    pub shape: ModelShape,
    pub vocab_fingerprint: String,
    pub world_size: usize,
    pub loop_state: LoopState,
    /// The epoch (0-based) whose parameters the checkpoint holds as `best.<name>`: the best
    /// model by validation that a distributed run keeps. None when it holds none (`worker
    /// train` keeps its best in model.safetensors; older checkpoints).
    #[serde(default)]
    pub best_model_epoch: Option<u64>,
    /// SHA-256 (hex) of the file's tensor data (everything after the header), checked when
    /// the checkpoint is read: a flipped bit in a weight or a moment is found, not trained
    /// on. None in checkpoints written before it existed.
    #[serde(default)]
    pub data_sha256: Option<String>,
}

/// A copy of the parameters, kept as the best model by validation: in host memory (one
/// copy of the parameters, whatever the device), under the model's parameter names.
#[derive(Debug)]
pub struct KeptModel {
    /// The epoch (0-based) after which they were taken.
    pub epoch: u64,
    parameters: Vec<(String, Tensor)>,
}

impl KeptModel {
    /// A host copy of `model`'s parameters now.
    pub fn of(model: &LstmClassifier, epoch: u64) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let parameters = model
            .parameters()
            .iter()
            .map(|(name, p)| {
                let mut copy = Tensor::f_empty(p.size(), (p.kind(), Device::Cpu))?;
                copy.f_copy_(p)?;
                Ok((name.clone(), copy))
            })
            .collect::<Result<_>>()?;
        Ok(Self { epoch, parameters })
    }

    /// Makes these the parameters of `model` (same names and shapes required).
    pub fn load_into(&self, model: &mut LstmClassifier) -> Result<()> {
        model.load_named(&self.parameters, &format!("the best model of epoch {}", self.epoch + 1))
    }
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    tensors: HashMap<String, Tensor>,
}

/// FNV-1a of the vocabulary's words in id order: two runs share it iff they share the vocab.
pub fn vocab_fingerprint(vocab: &Vocab) -> String {
    vocab.fingerprint()
}

/// Writes the trainer's full state to `path` (atomically).
pub fn save_checkpoint(
    trainer: &Trainer,
    path: &Path,
    position: Position,
    loop_state: &LoopState,
    vocab_fingerprint: &str,
) -> Result<()> {
    save_checkpoint_keeping(trainer, path, position, loop_state, vocab_fingerprint, None)
}

/// [`save_checkpoint`], plus the best model kept so far (a distributed run's).
pub fn save_checkpoint_keeping(
    trainer: &Trainer,
    path: &Path,
    position: Position,
    loop_state: &LoopState,
    vocab_fingerprint: &str,
    best: Option<&KeptModel>,
) -> Result<()> {
    let meta = CheckpointMeta {
        format: CHECKPOINT_FORMAT.into(),
        position,
        optimizer_steps: trainer.optimizer().steps(),
        rng: RngState::for_seed(trainer.config().train.seed),
        config: trainer.config().clone(),
        shape: trainer.model().shape().clone(),
        vocab_fingerprint: vocab_fingerprint.to_string(),
        world_size: trainer.world_size(),
        loop_state: loop_state.clone(),
        best_model_epoch: best.map(|b| b.epoch),
        data_sha256: None,
    };
    let mut tensors: Vec<(String, &Tensor)> = Vec::new();
    for (i, (name, p)) in trainer.model().parameters().iter().enumerate() {
        tensors.push((format!("model.{name}"), p));
        if let Optimizer::Adam(adam) = trainer.optimizer() {
            tensors.push((format!("adam.exp_avg.{name}"), &adam.exp_avg[i]));
            tensors.push((format!("adam.exp_avg_sq.{name}"), &adam.exp_avg_sq[i]));
        }
    }
    for (name, p) in best.map_or(&[][..], |b| &b.parameters[..]) {
        tensors.push((format!("{BEST_PREFIX}{name}"), p));
    }
    // The header records the hash of the data that follows it: serialise once to learn the
    // data's bytes (their layout does not depend on the metadata), then with the hash.
    let raws = raw_tensors(&tensors)?;
    let metadata = |meta: &CheckpointMeta| -> Result<HashMap<String, String>> {
        let json = serde_json::to_string(meta)
            .map_err(|e| WorkerError::Invalid(format!("cannot serialise checkpoint state: {e}")))?;
        Ok(HashMap::from([(CHECKPOINT_KEY.to_string(), json)]))
    };
    let draft = serialize(&raws, metadata(&meta)?, path)?;
    let data = data_section(&draft).ok_or_else(|| WorkerError::Invalid("internal: no tensor data".into()))?;
    let meta = CheckpointMeta { data_sha256: Some(FileDigest::of_bytes(data).sha256), ..meta };
    let bytes = serialize(&raws, metadata(&meta)?, path)?;
    trainer_core::write_atomically(path, &bytes)?;
    Ok(())
}

/// Reads a checkpoint file (tensors stay on the CPU until restored).
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint> {
    checkpoint_from_bytes(&read_bytes(path, "checkpoint")?, path)
}

/// A checkpoint received as bytes (a distributed job's, fetched from the coordinator);
/// `source` names it in errors. Its tensor data must hash to what its header records.
pub fn checkpoint_from_bytes(bytes: &[u8], source: &Path) -> Result<Checkpoint> {
    let corrupt = |message: String| {
        WorkerError::Corrupt(trainer_core::exit::CorruptCheckpoint(format!(
            "{}: {message}",
            source.display()
        )))
    };
    let (tensors, metadata) = parse_safetensors(bytes, source).map_err(|e| match e {
        WorkerError::Checkpoint { message, .. } if message.starts_with("not a safetensors file") => {
            corrupt(format!("{message} (truncated or damaged)"))
        }
        other => other,
    })?;
    let checkpoint = checkpoint_from_parts(tensors, metadata, source)?;
    if let Some(expected) = &checkpoint.meta.data_sha256 {
        let data = data_section(bytes).ok_or_else(|| corrupt("no tensor data".into()))?;
        let actual = FileDigest::of_bytes(data).sha256;
        if &actual != expected {
            return Err(corrupt(format!(
                "its tensor data hashes to sha256 {actual}, but it was written as {expected}: a weight \
                 or an optimizer moment changed on disk"
            )));
        }
    }
    Ok(checkpoint)
}

fn checkpoint_from_parts(
    tensors: HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<Checkpoint> {
    let bad = |message: String| WorkerError::Checkpoint { path: path.to_path_buf(), message };
    let state = metadata.get(CHECKPOINT_KEY).ok_or_else(|| {
        bad(format!("not a training checkpoint (no {CHECKPOINT_KEY} metadata; a model file?)"))
    })?;
    let meta: CheckpointMeta =
        serde_json::from_str(state).map_err(|e| bad(format!("unreadable checkpoint state: {e}")))?;
    if meta.format != CHECKPOINT_FORMAT {
        return Err(bad(format!(
            "checkpoint format {:?}; this worker reads {CHECKPOINT_FORMAT:?}",
            meta.format
        )));
    }
    Ok(Checkpoint { meta, tensors })
}

impl Checkpoint {
    /// Loads this checkpoint into `trainer`, after checking that it was written for the
    /// same model shape and vocabulary.
    pub fn restore_into(&self, trainer: &mut Trainer, vocab_fingerprint: &str, path: &Path) -> Result<()> {
        let bad = |message: String| WorkerError::Checkpoint { path: path.to_path_buf(), message };
        let ours = trainer.model().shape().clone();
        if self.meta.shape != ours {
            return Err(bad(format!(
                "written for a model of another shape ({}: checkpoint vs this run); \
                 resume with the checkpoint's config or start a new run",
                self.meta.shape.describe_difference(&ours)
            )));
        }
        if self.meta.vocab_fingerprint != vocab_fingerprint {
            return Err(bad(format!(
                "written with another vocabulary ({} vs {} in this run); the data settings \
                 (min_freq, max_vocab) or the corpus differ",
                self.meta.vocab_fingerprint, vocab_fingerprint
            )));
        }
        // The config says which optimizer wrote it (checkpoints from before the option
        // deserialise as Adam, the only one there was). Another optimizer's state cannot
        // continue this run's.
        let (theirs, ours) = (self.meta.config.train.optimizer, trainer.optimizer().kind());
        if theirs != ours {
            return Err(bad(format!(
                "written by the {} optimizer; this run uses {} (train.optimizer); \
                 resume with the checkpoint's config or start a new run",
                theirs.name(),
                ours.name()
            )));
        }
        let named = |prefix: &str| -> Result<Vec<(String, Tensor)>> {
            trainer
                .model()
                .parameters()
                .iter()
                .map(|(name, _)| {
                    let key = format!("{prefix}{name}");
                    self.tensors
                        .get(&key)
                        .map(|t| (name.clone(), t.shallow_clone()))
                        .ok_or_else(|| bad(format!("tensor {key} is missing")))
                })
                .collect()
        };
        let weights = named("model.")?;
        let moments = match ours {
            config::Optimizer::Adam | config::Optimizer::AdamW => {
                Some((named("adam.exp_avg.")?, named("adam.exp_avg_sq.")?))
            }
            config::Optimizer::Sgd => None,
        };
        let source = path.display().to_string();
        trainer.model_mut().load_named(&weights, &source)?;
        let device = trainer.device();
        let opt = trainer.optimizer_mut();
        if let (Optimizer::Adam(adam), Some((exp_avg, exp_avg_sq))) = (&mut *opt, moments) {
            let _guard = tch::no_grad_guard();
            for (i, ((_, m), (_, v))) in exp_avg.iter().zip(&exp_avg_sq).enumerate() {
                if m.size() != adam.exp_avg[i].size() || v.size() != adam.exp_avg_sq[i].size() {
                    return Err(bad("optimizer state of another shape".into()));
                }
                adam.exp_avg[i].f_copy_(&m.f_to_device(device)?)?;
                adam.exp_avg_sq[i].f_copy_(&v.f_to_device(device)?)?;
            }
        }
        opt.set_steps(self.meta.optimizer_steps);
        trainer.set_global_step(self.meta.position.global_step);
        Ok(())
    }

    /// The best model this checkpoint keeps (`best.<name>`, shaped as `trainer`'s
    /// parameters), or None when it keeps none.
    pub fn kept_model(&self, trainer: &Trainer, path: &Path) -> Result<Option<KeptModel>> {
        let Some(epoch) = self.meta.best_model_epoch else { return Ok(None) };
        let bad = |message: String| WorkerError::Checkpoint { path: path.to_path_buf(), message };
        let parameters = trainer
            .model()
            .parameters()
            .iter()
            .map(|(name, p)| {
                let key = format!("{BEST_PREFIX}{name}");
                let t = self.tensors.get(&key).ok_or_else(|| {
                    bad(format!("tensor {key} is missing (best_model_epoch is {})", epoch + 1))
                })?;
                if t.size() != p.size() {
                    return Err(bad(format!(
                        "tensor {key} has shape {:?}, expected {:?}",
                        t.size(),
                        p.size()
                    )));
                }
                Ok((name.clone(), t.shallow_clone()))
            })
            .collect::<Result<_>>()?;
        Ok(Some(KeptModel { epoch, parameters }))
    }
}

/// Writes the model's parameters (PyTorch names) with the config in the metadata.
pub fn export_model(model: &LstmClassifier, config: &JobConfig, path: &Path) -> Result<()> {
    let tensors: Vec<(String, &Tensor)> = model.parameters().iter().map(|(n, t)| (n.clone(), t)).collect();
    let meta = ModelMeta {
        format: MODEL_FORMAT.to_string(),
        shape: model.shape().clone(),
        config: config.to_toml(),
    };
    let json = serde_json::to_string(&meta)
        .map_err(|e| WorkerError::Invalid(format!("cannot serialise the model metadata: {e}")))?;
    write_safetensors(path, &tensors, HashMap::from([(MODEL_KEY.to_string(), json)]))
}

/// [`export_model`] to a file of a run folder, with its `<file>.sha256` beside it.
pub fn save_model(model: &LstmClassifier, config: &JobConfig, path: &Path) -> Result<()> {
    export_model(model, config, path)?;
    let digest = FileDigest::of_file(path).map_err(crate::error::io_err(path))?;
    integrity::write_sidecar(path, &digest)?;
    Ok(())
}

/// Loads an exported model file into `model` (same shape required), after checking it
/// against its `<file>.sha256` when there is one.
pub fn load_model_weights(model: &mut LstmClassifier, path: &Path) -> Result<()> {
    let bytes = read_bytes(path, "model file")?;
    integrity::check_against_sidecar(path, &bytes)
        .map_err(|e| WorkerError::Corrupt(trainer_core::exit::CorruptCheckpoint(e)))?;
    let (tensors, metadata) = parse_safetensors(&bytes, path)?;
    // Files from elsewhere (without our metadata) are still checked tensor by tensor.
    if let Some(json) = metadata.get(MODEL_KEY) {
        let meta: ModelMeta = serde_json::from_str(json).map_err(|e| WorkerError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("unreadable model metadata: {e}"),
        })?;
        let theirs = meta.shape;
        if &theirs != model.shape() {
            return Err(WorkerError::Checkpoint {
                path: path.to_path_buf(),
                message: format!(
                    "a model of another shape ({}: file vs expected)",
                    theirs.describe_difference(model.shape())
                ),
            });
        }
    }
    let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
    model.load_named(&named, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::NoopCollective;
    use crate::predict::batch_of;
    use trainer_core::batch::Batch;

    const VOCAB: usize = 30;

    fn tiny_config(hidden: usize) -> JobConfig {
        let mut c = JobConfig::default();
        c.model.embed_dim = 8;
        c.model.hidden = hidden;
        c.model.layers = 1;
        // No dropout: these tests run beside others in one process, and libtorch's RNG is
        // global.
        c.model.dropout = 0.0;
        c.train.lr = 1e-2;
        c.train.weight_decay = 1e-3;
        c.train.device = "cpu".into();
        c
    }

    fn trainer(hidden: usize) -> Trainer {
        tch::set_num_threads(1);
        Trainer::new(&tiny_config(hidden), VOCAB, Device::Cpu, Box::new(NoopCollective)).unwrap()
    }

    fn batch(shift: u32) -> Batch {
        let rows: Vec<Vec<u32>> =
            (0..6u32).map(|r| (0..(3 + r * 2)).map(|t| 2 + (r * 7 + t * 3 + shift) % 28).collect()).collect();
        let mut b = batch_of(&rows);
        b.labels = (0..6).map(|i| i % 2).collect();
        b
    }

    #[test]
    fn a_restored_checkpoint_continues_exactly() {
        for optimizer in [config::Optimizer::Adam, config::Optimizer::AdamW, config::Optimizer::Sgd] {
            restored_checkpoint_continues_exactly(optimizer);
        }
    }

    fn restored_checkpoint_continues_exactly(optimizer: config::Optimizer) {
        tch::set_num_threads(1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHECKPOINT_FILE);
        let mut config = tiny_config(8);
        config.train.optimizer = optimizer;
        let mut a = Trainer::new(&config, VOCAB, Device::Cpu, Box::new(NoopCollective)).unwrap();
        a.set_total_steps(10);
        for s in 0..3 {
            a.train_step(&batch(s)).unwrap();
        }
        let position = Position { epoch: 1, step_in_epoch: 2, global_step: a.global_step() };
        let state = LoopState { best_val_accuracy: Some(0.75), ..LoopState::default() };
        save_checkpoint(&a, &path, position, &state, "v:1").unwrap();

        let checkpoint = load_checkpoint(&path).unwrap();
        assert_eq!(checkpoint.meta.position, position);
        assert_eq!(checkpoint.meta.loop_state, state);
        assert_eq!(checkpoint.meta.optimizer_steps, 3);
        // A replica with other initial weights becomes identical once restored.
        config.train.seed = 99;
        let mut b = Trainer::new(&config, VOCAB, Device::Cpu, Box::new(NoopCollective)).unwrap();
        b.set_total_steps(10);
        assert_ne!(a.parameter_checksum().unwrap(), b.parameter_checksum().unwrap());
        checkpoint.restore_into(&mut b, "v:1", &path).unwrap();
        assert_eq!(a.parameter_checksum().unwrap(), b.parameter_checksum().unwrap());
        assert_eq!(b.global_step(), 3);
        // The next step (Adam's moments and step count included) gives the same weights.
        let sa = a.train_step(&batch(5)).unwrap();
        let sb = b.train_step(&batch(5)).unwrap();
        assert_eq!(sa.loss.to_bits(), sb.loss.to_bits());
        assert_eq!(a.parameter_checksum().unwrap(), b.parameter_checksum().unwrap(), "{optimizer:?}");
        assert_eq!(b.optimizer().steps(), 4);
        // SGD has no moments to store.
        let adam_tensors = checkpoint.tensors.keys().filter(|k| k.starts_with("adam.")).count();
        let per_parameter = if optimizer == config::Optimizer::Sgd { 0 } else { 2 };
        assert_eq!(adam_tensors, per_parameter * a.model().parameters().len());
    }

    #[test]
    fn a_checkpoint_carries_the_kept_model_and_older_ones_hold_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHECKPOINT_FILE);
        let mut a = trainer(8);
        a.set_total_steps(10);
        a.train_step(&batch(0)).unwrap();
        let best = KeptModel::of(a.model(), 4).unwrap();
        let best_sum = a.parameter_checksum().unwrap();
        // The copy stays as it was while training goes on.
        a.train_step(&batch(1)).unwrap();
        assert_ne!(a.parameter_checksum().unwrap(), best_sum);
        save_checkpoint_keeping(&a, &path, Position::default(), &LoopState::default(), "v:1", Some(&best))
            .unwrap();
        let checkpoint = load_checkpoint(&path).unwrap();
        assert_eq!(checkpoint.meta.best_model_epoch, Some(4));
        let mut b = trainer(8);
        checkpoint.restore_into(&mut b, "v:1", &path).unwrap();
        assert_eq!(b.parameter_checksum().unwrap(), a.parameter_checksum().unwrap());
        let kept = checkpoint.kept_model(&b, &path).unwrap().expect("a kept model");
        assert_eq!(kept.epoch, 4);
        kept.load_into(b.model_mut()).unwrap();
        assert_eq!(b.parameter_checksum().unwrap(), best_sum);

        // Without one (worker train's, or written before best models were kept): none, and
        // metadata without the field reads as none.
        save_checkpoint(&a, &path, Position::default(), &LoopState::default(), "v:1").unwrap();
        let checkpoint = load_checkpoint(&path).unwrap();
        assert!(checkpoint.kept_model(&b, &path).unwrap().is_none());
        let mut json = serde_json::to_value(&checkpoint.meta).unwrap();
        json.as_object_mut().unwrap().remove("best_model_epoch");
        let old: CheckpointMeta = serde_json::from_value(json).unwrap();
        assert_eq!(old.best_model_epoch, None);
    }

    #[test]
    fn a_checkpoint_of_another_optimizer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHECKPOINT_FILE);
        save_checkpoint(&trainer(8), &path, Position::default(), &LoopState::default(), "v:1").unwrap();
        let mut config = tiny_config(8);
        config.train.optimizer = config::Optimizer::Sgd;
        let mut sgd = Trainer::new(&config, VOCAB, Device::Cpu, Box::new(NoopCollective)).unwrap();
        let e = load_checkpoint(&path).unwrap().restore_into(&mut sgd, "v:1", &path).unwrap_err().to_string();
        assert!(e.contains("written by the adam optimizer; this run uses sgd"), "{e}");
    }

    #[test]
    fn checkpoints_of_another_shape_or_vocabulary_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHECKPOINT_FILE);
        let a = trainer(8);
        save_checkpoint(&a, &path, Position::default(), &LoopState::default(), "v:1").unwrap();
        let checkpoint = load_checkpoint(&path).unwrap();

        let mut wider = trainer(16);
        let e = checkpoint.restore_into(&mut wider, "v:1", &path).unwrap_err().to_string();
        assert!(e.contains("another shape") && e.contains("hidden 8 vs 16"), "{e}");

        let mut other_vocab =
            Trainer::new(&tiny_config(8), VOCAB + 1, Device::Cpu, Box::new(NoopCollective)).unwrap();
        let e = checkpoint.restore_into(&mut other_vocab, "v:1", &path).unwrap_err().to_string();
        assert!(e.contains("vocab size 30 vs 31"), "{e}");

        let mut same = trainer(8);
        let e = checkpoint.restore_into(&mut same, "v:2", &path).unwrap_err().to_string();
        assert!(e.contains("another vocabulary"), "{e}");
    }

    #[test]
    fn exported_models_load_back_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = trainer(8);
        let path = dir.path().join(MODEL_FILE);
        export_model(a.model(), a.config(), &path).unwrap();
        let mut b = trainer(8);
        let mut config = tiny_config(8);
        config.train.seed = 5;
        let c = Trainer::new(&config, VOCAB, Device::Cpu, Box::new(NoopCollective)).unwrap();
        load_model_weights(b.model_mut(), &path).unwrap();
        assert_eq!(a.parameter_checksum().unwrap(), b.parameter_checksum().unwrap());
        assert_ne!(a.parameter_checksum().unwrap(), c.parameter_checksum().unwrap());

        let mut wider = trainer(16);
        let e = load_model_weights(wider.model_mut(), &path).unwrap_err().to_string();
        assert!(e.contains("another shape"), "{e}");
        // A model file is not a checkpoint, garbage is not safetensors, absence is named.
        let e = load_checkpoint(&path).unwrap_err().to_string();
        assert!(e.contains("not a training checkpoint"), "{e}");
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"not a tensor file").unwrap();
        let e = anyhow::Error::from(load_checkpoint(&junk).unwrap_err());
        assert!(format!("{e:#}").contains("not a safetensors file"), "{e:#}");
        assert_eq!(trainer_core::exit::code_for(e.chain()), trainer_core::exit::CORRUPT_CHECKPOINT);
        let e = load_checkpoint(&dir.path().join("none")).unwrap_err().to_string();
        assert!(e.contains("no checkpoint here"), "{e}");
    }

    #[test]
    fn a_flipped_bit_in_a_checkpoints_tensors_is_found_before_it_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHECKPOINT_FILE);
        let mut a = trainer(8);
        a.set_total_steps(10);
        a.train_step(&batch(0)).unwrap();
        save_checkpoint(&a, &path, Position::default(), &LoopState::default(), "v:1").unwrap();
        let good = std::fs::read(&path).unwrap();
        assert!(load_checkpoint(&path).unwrap().meta.data_sha256.is_some());
        // One bit of the last tensor (an Adam moment: the tensors are laid out by name).
        let mut bad = good.clone();
        let at = bad.len() - 5;
        bad[at] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        let e = anyhow::Error::from(load_checkpoint(&path).unwrap_err());
        assert!(format!("{e:#}").contains("tensor data hashes to"), "{e:#}");
        assert_eq!(trainer_core::exit::code_for(e.chain()), trainer_core::exit::CORRUPT_CHECKPOINT);
        // Received as bytes (a distributed restore), the same.
        assert!(checkpoint_from_bytes(&bad, &path).is_err());
        assert!(checkpoint_from_bytes(&good, &path).is_ok());
    }

    #[test]
    fn a_saved_model_has_a_digest_that_loading_checks() {
        let dir = tempfile::tempdir().unwrap();
        let a = trainer(8);
        let path = dir.path().join(MODEL_FILE);
        save_model(a.model(), a.config(), &path).unwrap();
        let sidecar = std::fs::read_to_string(integrity::sidecar_path(&path)).unwrap();
        assert!(sidecar.ends_with("  model.safetensors\n"), "{sidecar}");
        let mut b = trainer(8);
        load_model_weights(b.model_mut(), &path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let e = anyhow::Error::from(load_model_weights(b.model_mut(), &path).unwrap_err());
        assert!(format!("{e:#}").contains("damaged"), "{e:#}");
        assert_eq!(trainer_core::exit::code_for(e.chain()), trainer_core::exit::CORRUPT_CHECKPOINT);
    }
}
