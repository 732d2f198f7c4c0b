//! The replica's training and evaluation steps, shared by the single-process run and the
//! distributed worker: only the collective differs ([`NoopCollective`] for one process).
//!
//! [`NoopCollective`]: crate::collective::NoopCollective

use tch::{Device, Kind, Tensor};
use trainer_core::batch::{collate, Batch};
use trainer_core::config::JobConfig;
use trainer_core::EncodedSplit;

use crate::collective::Collective;
use crate::error::{Result, WorkerError};
use crate::eval_counts::confusion_of;
pub use crate::eval_counts::EvalCounts;
use crate::model::{Dropouts, LstmClassifier, ModelShape};
use crate::optim::{clip_global_norm_on_device, lr_at, Optimizer};
use crate::profile::{self, Bucket};
use crate::tbptt::{run_windows, DeviceBatch, LstmKernel, Pass, PassOptions, Precision};

/// What one training step did, on this rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy over this rank's batch.
    pub loss: f64,
    pub correct: usize,
    pub examples: usize,
    /// Real (unpadded) tokens in the batch.
    pub tokens: usize,
    /// L2 norm of the all-reduced gradient before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// TBPTT windows run.
    pub windows: usize,
}

/// A model replica with its optimizer and the collective that joins it to the others.
pub struct Trainer {
    config: JobConfig,
    model: LstmClassifier,
    optimizer: Optimizer,
    collective: Box<dyn Collective>,
    pass_options: PassOptions,
    global_step: u64,
    total_steps: u64,
    /// The flat gradient buffer, reused every step (all parameters, canonical order).
    flat_grad: Tensor,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("shape", self.model.shape())
            .field("device", &self.model.device())
            .field("backend", &self.collective.backend())
            .field("rank", &self.collective.rank())
            .field("global_step", &self.global_step)
            .finish()
    }
}

/// A 64-bit mix (splitmix64's finaliser) for deriving seeds.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// libtorch's seed for the dropout masks of one step: a function of the position, so that
/// a resumed run draws the same masks as an uninterrupted one, and ranks draw different ones.
pub fn step_seed(seed: u64, rank: usize, global_step: u64) -> i64 {
    let s = mix64(seed ^ mix64(rank as u64 ^ mix64(global_step ^ 0x5EED)));
    (s >> 1) as i64
}

/// Above this share of the vocabulary, the embedding's gradient is exchanged whole.
const COMPACT_EMBEDDING_MAX_ROW_FRACTION: f64 = 0.5;

/// The gradient of `param`, which the backward pass must have created.
fn defined_gradient((name, param): &(String, Tensor)) -> Result<Tensor> {
    let grad = param.f_grad()?;
    if grad.defined() {
        Ok(grad)
    } else {
        Err(WorkerError::Invalid(format!("internal: parameter {name} has no gradient buffer")))
    }
}

/// Copies the gradients of `params`, flattened in order, into `flat` from `offset` on
/// (zeros for a parameter without one).
fn copy_gradients_into(params: &[(String, Tensor)], flat: &mut Tensor, mut offset: i64) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for (_, p) in params {
        let n = p.numel() as i64;
        let mut slot = flat.f_narrow(0, offset, n)?;
        let g = p.f_grad()?;
        if g.defined() {
            slot.f_copy_(&g.f_reshape([-1i64])?)?;
        } else {
            let _ = slot.f_zero_()?;
        }
        offset += n;
    }
    Ok(())
}

/// The inverse of [`copy_gradients_into`]: `flat` from `offset` on into the gradients.
fn copy_into_gradients(flat: &Tensor, params: &[(String, Tensor)], mut offset: i64) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for param in params {
        let n = param.1.numel() as i64;
        let slot = flat.f_narrow(0, offset, n)?.f_view(param.1.size().as_slice())?;
        defined_gradient(param)?.f_copy_(&slot)?;
        offset += n;
    }
    Ok(())
}

impl Trainer {
    /// A fresh replica, initialised from `config.train.seed` (call
    /// [`Trainer::broadcast_parameters`] so that every rank starts from rank 0's weights).
    pub fn new(
        config: &JobConfig,
        vocab_size: usize,
        device: Device,
        collective: Box<dyn Collective>,
    ) -> Result<Self> {
        config.validate()?;
        let precision = if config.train.amp {
            if !device.is_cuda() {
                return Err(WorkerError::Invalid(
                    "train.amp (bf16 mixed precision) needs a CUDA device; this run is on the CPU \
                     (set amp = false or --amp false)"
                        .into(),
                ));
            }
            Precision::Bf16
        } else {
            Precision::F32
        };
        // Bijective u64 -> i64, so that different seeds give different weights.
        tch::manual_seed(config.train.seed as i64);
        let shape = ModelShape::new(&config.model, vocab_size);
        let model = LstmClassifier::new(shape.clone(), Dropouts::from_config(&config.model), device)?;
        let params: Vec<&Tensor> = model.parameters().iter().map(|(_, t)| t).collect();
        let optimizer = Optimizer::new(&params, &config.train)?;
        let flat_grad = Tensor::f_zeros([shape.num_parameters() as i64], (Kind::Float, device))?;
        Ok(Self {
            config: config.clone(),
            model,
            optimizer,
            collective,
            pass_options: PassOptions {
                bptt: config.train.bptt,
                precision,
                kernel: LstmKernel::for_device(device),
                label_smoothing: config.train.label_smoothing,
            },
            global_step: 0,
            total_steps: 0,
            flat_grad,
        })
    }

    pub fn config(&self) -> &JobConfig {
        &self.config
    }

    pub fn model(&self) -> &LstmClassifier {
        &self.model
    }

    pub fn model_mut(&mut self) -> &mut LstmClassifier {
        &mut self.model
    }

    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.optimizer
    }

    pub fn collective_mut(&mut self) -> &mut dyn Collective {
        self.collective.as_mut()
    }

    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    pub fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    pub fn device(&self) -> Device {
        self.model.device()
    }

    /// The TBPTT window, arithmetic and LSTM kernel of every pass.
    pub fn pass_options(&self) -> PassOptions {
        self.pass_options
    }

    /// Chooses how rows of different lengths are run (both kernels give the same results).
    pub fn set_lstm_kernel(&mut self, kernel: LstmKernel) {
        self.pass_options.kernel = kernel;
    }

    /// Optimizer steps taken so far (the schedule's position).
    pub fn global_step(&self) -> u64 {
        self.global_step
    }

    pub fn set_global_step(&mut self, step: u64) {
        self.global_step = step;
    }

    /// The number of steps of the whole run, which the decaying schedules need.
    pub fn set_total_steps(&mut self, total: u64) {
        self.total_steps = total;
    }

    pub fn current_lr(&self) -> f64 {
        let t = &self.config.train;
        lr_at(t.lr, t.schedule, t.warmup_steps as u64, self.total_steps, self.global_step)
    }

    fn param_refs(&self) -> Vec<&Tensor> {
        self.model.parameters().iter().map(|(_, t)| t).collect()
    }

    /// Replaces every rank's parameters with rank 0's.
    pub fn broadcast_parameters(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let pieces: Vec<Tensor> = self
            .param_refs()
            .iter()
            .map(|p| p.f_detach()?.f_reshape([-1i64]))
            .collect::<std::result::Result<_, _>>()?;
        let mut flat = Tensor::f_cat(&pieces, 0)?;
        self.collective.broadcast(&mut flat, 0)?;
        self.write_flat_into_parameters(&flat)?;
        Ok(())
    }

    fn write_flat_into_parameters(&mut self, flat: &Tensor) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut offset = 0i64;
        for (_, p) in self.model.parameters() {
            let n = p.numel() as i64;
            let mut p = p.shallow_clone();
            p.f_copy_(&flat.f_narrow(0, offset, n)?.f_view(p.size().as_slice())?)?;
            offset += n;
        }
        Ok(())
    }

    /// Copies every parameter's gradient into the flat buffer (zeros where none).
    fn gather_gradients(&mut self) -> Result<()> {
        copy_gradients_into(self.model.parameters(), &mut self.flat_grad, 0)
    }

    /// Writes the flat buffer back into the parameters' gradients.
    fn scatter_gradients(&mut self) -> Result<()> {
        copy_into_gradients(&self.flat_grad, self.model.parameters(), 0)
    }

    /// Averages the gradients over the ranks, clips them by global norm, writes them back
    /// into the parameters' gradients, and returns the norm (0-dim f64, on the device).
    ///
    /// With several ranks only the embedding rows that some rank's batch used travel: every
    /// other row is zero on every rank, so its mean is zero too. The ranks first agree on
    /// that set of rows (an all-reduce of a vocabulary-sized 0/1 mask, identical bits
    /// everywhere), then reduce one compact buffer. For cpu-demo on two ranks that is 16% of
    /// the rows, and the embedding is nearly all of the model (bench/embedding_rows.py).
    fn reduce_and_clip_gradients(&mut self, token_ids: &Tensor, examples: usize) -> Result<Tensor> {
        let clip = self.config.train.clip_norm;
        let weight = self.share_weight(examples)?;
        if self.collective.world_size() > 1 {
            if let Some(rows) =
                profile::time(Bucket::Flatten, || self.embedding_rows_used_by_any_rank(token_ids))?
            {
                return profile::time(Bucket::Flatten, || self.reduce_and_clip_compact(&rows, clip, weight));
            }
        }
        profile::time(Bucket::Flatten, || self.gather_gradients())?;
        if let Some(w) = weight {
            let _ = self.flat_grad.f_mul_scalar_(w)?;
        }
        profile::time(Bucket::Collective, || self.collective.all_reduce_mean(&mut self.flat_grad))?;
        let norm = profile::time(Bucket::Clip, || clip_global_norm_on_device(&mut self.flat_grad, clip))?;
        profile::time(Bucket::Flatten, || self.scatter_gradients())?;
        Ok(norm)
    }

    /// What makes the mean over the ranks the mean over the global batch when the shares
    /// differ by a sample: this rank's gradient (a mean over its `examples`) times `examples
    /// × world / global batch`. None when that is 1 (equal shares, one rank): nothing to do.
    /// A batch that is not this rank's share is refused: every rank's weight assumes that
    /// the others hold theirs.
    fn share_weight(&self, examples: usize) -> Result<Option<f64>> {
        let world = self.collective.world_size();
        if world == 1 {
            return Ok(None);
        }
        let global = self.config.train.global_batch(world);
        let share = trainer_core::shard::share(global, world, self.rank());
        if examples != share {
            return Err(WorkerError::Invalid(format!(
                "a batch of {examples} samples, but rank {}'s share of the global batch of {global} \
                 over {world} ranks is {share}",
                self.rank()
            )));
        }
        Ok((examples * world != global).then(|| (examples * world) as f64 / global as f64))
    }

    /// The sorted embedding rows that at least one rank's batch used, or None when they are
    /// so many that the dense exchange is cheaper.
    fn embedding_rows_used_by_any_rank(&mut self, token_ids: &Tensor) -> Result<Option<Tensor>> {
        let _guard = tch::no_grad_guard();
        let vocab = self.model.shape().vocab_size as i64;
        let mut used = Tensor::f_zeros([vocab], (Kind::Float, self.device()))?;
        let _ = used.f_index_fill_(0, &token_ids.f_reshape([-1i64])?, 1.0)?;
        profile::time(Bucket::Collective, || self.collective.all_reduce_mean(&mut used))?;
        let rows = used.f_nonzero()?.f_reshape([-1i64])?;
        let count = rows.size()[0];
        Ok((count as f64 <= COMPACT_EMBEDDING_MAX_ROW_FRACTION * vocab as f64).then_some(rows))
    }

    /// [`Self::reduce_and_clip_gradients`] with only `rows` of the embedding's gradient.
    fn reduce_and_clip_compact(&mut self, rows: &Tensor, clip: f64, weight: Option<f64>) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let params = self.model.parameters();
        let (embedding, rest) = params
            .split_first()
            .ok_or_else(|| WorkerError::Invalid("internal: the model has no parameters".into()))?;
        let mut embedding_grad = defined_gradient(embedding)?;
        let embed_dim = embedding.1.size()[1];
        let used_rows = embedding_grad.f_index_select(0, rows)?;
        let head = used_rows.numel() as i64;
        // Everything but the embedding: the dense buffer's length less the embedding's.
        let rest_len = self.flat_grad.numel() as i64 - embedding.1.numel() as i64;
        let mut compact = Tensor::f_empty([head + rest_len], (Kind::Float, self.device()))?;
        compact.f_narrow(0, 0, head)?.f_copy_(&used_rows.f_reshape([-1i64])?)?;
        copy_gradients_into(rest, &mut compact, head)?;
        if let Some(w) = weight {
            let _ = compact.f_mul_scalar_(w)?;
        }

        profile::time(Bucket::Collective, || self.collective.all_reduce_mean(&mut compact))?;
        let norm = profile::time(Bucket::Clip, || clip_global_norm_on_device(&mut compact, clip))?;

        let _ = embedding_grad.f_zero_()?;
        let reduced_rows = compact.f_narrow(0, 0, head)?.f_view([-1, embed_dim])?;
        let _ = embedding_grad.f_index_copy_(0, rows, &reduced_rows)?;
        copy_into_gradients(&compact, rest, head)?;
        Ok(norm)
    }

    /// One optimizer step on `batch`: forward and backward per TBPTT window, gradients into
    /// one flat buffer, all-reduced (mean) across ranks, written back, clipped by global
    /// norm, then the optimizer (Adam or SGD).
    pub fn train_step(&mut self, batch: &Batch) -> Result<StepStats> {
        let shape = self.model.shape().clone();
        let device = self.device();
        let batch = profile::time(Bucket::ToDevice, || {
            DeviceBatch::with_classes(batch, shape.vocab_size, shape.num_classes, device)
        })?;
        tch::manual_seed(step_seed(self.config.train.seed, self.rank(), self.global_step));
        profile::time(Bucket::ZeroGrad, || self.model.zero_grad())?;

        // Forward and backward, window by window.
        let out = profile::time(Bucket::Forward, || {
            run_windows(&self.model, &batch, Pass::Train, self.pass_options)
        })?;
        let loss = out.loss_sum / batch.size as f64;
        if !loss.is_finite() {
            return Err(WorkerError::Diverged {
                step: self.global_step,
                message: format!("the loss is {loss}; lower train.lr or set train.clip_norm"),
            });
        }

        // The point where ranks meet: one flat buffer, averaged over all of them.
        let grad_norm = self.reduce_and_clip_gradients(&batch.tokens, batch.size)?;

        // The optimizer step.
        let lr = self.current_lr();
        let params: Vec<&Tensor> = self.model.parameters().iter().map(|(_, t)| t).collect();
        profile::time(Bucket::Optimizer, || self.optimizer.step(&params, lr))?;

        // The norm and the accuracy in one read, once the step's work is queued (each read
        // waits for the device). A non-finite norm has by then reached the parameters; the
        // error ends the run, and a restart resumes from a checkpoint, never from them.
        let (grad_norm, correct) =
            profile::time(Bucket::Stats, || norm_and_correct(&grad_norm, &out.logits, &batch.labels))?;
        if !grad_norm.is_finite() {
            return Err(WorkerError::Diverged {
                step: self.global_step,
                message: format!("the gradient norm is {grad_norm}; lower train.lr or set train.clip_norm"),
            });
        }
        self.global_step += 1;
        Ok(StepStats {
            loss,
            correct,
            examples: batch.size,
            tokens: batch.num_tokens,
            grad_norm,
            lr,
            windows: out.windows,
        })
    }

    /// Accuracy and loss over `indices` of `split` (evaluation mode, no gradients), as sums.
    pub fn evaluate(&self, split: &EncodedSplit, indices: &[u32]) -> Result<EvalCounts> {
        if let Some(&bad) = indices.iter().find(|&&i| i as usize >= split.len()) {
            return Err(WorkerError::Invalid(format!(
                "evaluation index {bad} is outside the split (0..{})",
                split.len()
            )));
        }
        let d = &self.config.data;
        // Sorted by length: little padding, and mostly dense windows.
        let mut order = indices.to_vec();
        order.sort_by_key(|&i| std::cmp::Reverse(split.length(i as usize)));
        let mut counts = EvalCounts::default();
        for chunk in order.chunks(self.config.train.eval_batch_size.max(1)) {
            let batch = collate(split, chunk, d.max_len, d.truncation);
            let shape = self.model.shape();
            let batch =
                DeviceBatch::with_classes(&batch, shape.vocab_size, shape.num_classes, self.device())?;
            let out = run_windows(&self.model, &batch, Pass::Eval, self.pass_options)?;
            let confusion = confusion_of(&out.logits, &batch.labels, shape.num_classes)?;
            let correct = (0..shape.num_classes).map(|c| confusion[c * shape.num_classes + c]).sum();
            counts.add(&EvalCounts { correct, total: batch.size as u64, loss_sum: out.loss_sum, confusion });
        }
        Ok(counts)
    }

    /// P(positive) for each row of `batch`, in the batch's order.
    pub fn positive_probabilities(&self, batch: &Batch) -> Result<Vec<f32>> {
        positive_probabilities(&self.model, batch, self.pass_options)
    }

    /// A hash of every parameter's bytes in the canonical order: equal on every rank iff
    /// the replicas are identical.
    pub fn parameter_checksum(&self) -> Result<u64> {
        parameter_checksum(&self.model)
    }
}

/// P(positive) for each row of `batch`, in the batch's order.
pub fn positive_probabilities(
    model: &LstmClassifier,
    batch: &Batch,
    options: PassOptions,
) -> Result<Vec<f32>> {
    Ok(class_probabilities(model, batch, options)?
        .into_iter()
        .map(|p| p.get(1).copied().unwrap_or(0.0))
        .collect())
}

/// The probability of every class for each row of `batch`, in the batch's order.
pub fn class_probabilities(
    model: &LstmClassifier,
    batch: &Batch,
    options: PassOptions,
) -> Result<Vec<Vec<f32>>> {
    let shape = model.shape();
    let classes = shape.num_classes;
    let batch = DeviceBatch::with_classes(batch, shape.vocab_size, classes, model.device())?;
    let out = run_windows(model, &batch, Pass::Eval, options)?;
    let probs =
        batch.unsort(&out.logits)?.f_softmax(1, Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let flat = Vec::<f32>::try_from(&probs.f_flatten(0, -1)?)?;
    Ok(flat.chunks(classes).map(<[f32]>::to_vec).collect())
}

/// FNV-1a over the names and f32 bytes of the parameters, in order.
pub fn parameter_checksum(model: &LstmClassifier) -> Result<u64> {
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    for (name, p) in model.parameters() {
        feed(name.as_bytes());
        let values = Vec::<f32>::try_from(
            &p.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?.f_reshape([-1i64])?,
        )?;
        for v in values {
            feed(&v.to_le_bytes());
        }
    }
    Ok(hash)
}

/// The gradient norm (0-dim f64) and the number of correct predictions, in one host read.
fn norm_and_correct(norm: &Tensor, logits: &Tensor, labels: &Tensor) -> Result<(f64, usize)> {
    let correct = logits.f_argmax(1, false)?.f_eq_tensor(labels)?.f_sum(Kind::Double)?;
    let both = Tensor::f_stack(&[norm.f_to_kind(Kind::Double)?, correct], 0)?.f_to_device(Device::Cpu)?;
    match Vec::<f64>::try_from(&both)?.as_slice() {
        &[norm, correct] => Ok((norm, correct as usize)),
        other => Err(WorkerError::Invalid(format!("internal: {} step statistics, expected 2", other.len()))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use trainer_core::batch::Batch;

    use super::*;
    use crate::collective::ring::connect_local_ring;
    use crate::collective::{CollectiveError, NoopCollective, RingOptions};
    use crate::predict::batch_of;

    const VOCAB: usize = 1000;

    /// A collective that records the length of every buffer it all-reduces.
    struct Recording {
        inner: Box<dyn Collective>,
        reduced_lengths: Arc<Mutex<Vec<i64>>>,
    }

    impl Collective for Recording {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world_size(&self) -> usize {
            self.inner.world_size()
        }
        fn backend(&self) -> &'static str {
            self.inner.backend()
        }
        fn all_reduce_mean(&mut self, buffer: &mut Tensor) -> std::result::Result<(), CollectiveError> {
            self.reduced_lengths.lock().unwrap().push(buffer.numel() as i64);
            self.inner.all_reduce_mean(buffer)
        }
        fn broadcast(
            &mut self,
            buffer: &mut Tensor,
            root: usize,
        ) -> std::result::Result<(), CollectiveError> {
            self.inner.broadcast(buffer, root)
        }
        fn barrier(&mut self) -> std::result::Result<(), CollectiveError> {
            self.inner.barrier()
        }
    }

    /// SGD, so that the two-rank run and the single process, which differ only in float
    /// summation order, stay within a bound derived below (Adam would amplify that noise
    /// where gradients are tiny).
    fn config() -> JobConfig {
        let mut c = JobConfig::default();
        c.train.optimizer = trainer_core::config::Optimizer::Sgd;
        c.model.embed_dim = 8;
        c.model.hidden = 8;
        c.model.layers = 1;
        c.model.dropout = 0.0;
        c.train.lr = 0.5;
        c.train.weight_decay = 1e-3;
        // Small enough to bind, so that clipping the compact buffer is checked too.
        c.train.clip_norm = 0.05;
        c.train.device = "cpu".into();
        // Each rank's batch of four is its share of the global batch.
        c.train.batch_size = 4;
        c
    }

    /// Four reviews per rank and step; rank 0 uses ids 2..42 and rank 1 ids 30..90 (they
    /// overlap), so each step touches under a tenth of the vocabulary.
    fn rows(rank: usize, step: usize) -> Vec<Vec<u32>> {
        let (base, span) = if rank == 0 { (2u32, 40u32) } else { (30, 60) };
        (0..4u32)
            .map(|r| (0..(3 + r * 3)).map(|t| base + (r * 11 + t * 7 + step as u32 * 5) % span).collect())
            .collect()
    }

    fn batch(rows: &[Vec<u32>]) -> Batch {
        let mut b = batch_of(rows);
        b.labels = (0..rows.len() as i64).map(|i| i % 2).collect();
        b
    }

    fn parameters(trainer: &Trainer) -> Vec<f32> {
        let flat: Vec<Tensor> = trainer.param_refs().iter().map(|p| p.detach().reshape([-1i64])).collect();
        Vec::<f32>::try_from(Tensor::cat(&flat, 0)).unwrap()
    }

    #[test]
    fn two_ranks_exchanging_only_used_embedding_rows_match_one_process_with_both_batches() {
        tch::set_num_threads(1);
        let steps = 3;
        let rings =
            connect_local_ring(2, RingOptions { timeout: Duration::from_secs(20), ..RingOptions::new("t") });
        // Initialisation draws from libtorch's global generator, which other tests of this
        // process share: the ranks start from rank 0's weights (as in a real job), and the
        // single process from a copy of them.
        let replicas: Vec<(Trainer, Arc<Mutex<Vec<i64>>>)> = rings
            .into_iter()
            .map(|ring| {
                let lengths = Arc::new(Mutex::new(Vec::new()));
                let collective = Recording { inner: Box::new(ring), reduced_lengths: Arc::clone(&lengths) };
                let mut t = Trainer::new(&config(), VOCAB, Device::Cpu, Box::new(collective)).unwrap();
                t.set_total_steps(steps as u64);
                (t, lengths)
            })
            .collect();
        let initial_values = parameters(&replicas[0].0);
        let initial = Tensor::from_slice(&initial_values);
        let results: Vec<(Vec<f32>, Vec<i64>, Vec<StepStats>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = replicas
                .into_iter()
                .enumerate()
                .map(|(rank, (mut t, lengths))| {
                    scope.spawn(move || {
                        t.broadcast_parameters().unwrap();
                        let stats: Vec<StepStats> =
                            (0..steps).map(|step| t.train_step(&batch(&rows(rank, step))).unwrap()).collect();
                        let lengths = lengths.lock().unwrap().clone();
                        (parameters(&t), lengths, stats)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });

        // One process, both ranks' reviews in one batch of 8 (the mean loss over 8 reviews
        // is the mean of the two ranks' means over 4).
        let mut single = Trainer::new(&config(), VOCAB, Device::Cpu, Box::new(NoopCollective)).unwrap();
        single.set_total_steps(steps as u64);
        single.write_flat_into_parameters(&initial).unwrap();
        let single_stats: Vec<StepStats> = (0..steps)
            .map(|step| {
                let both: Vec<Vec<u32>> = rows(0, step).into_iter().chain(rows(1, step)).collect();
                single.train_step(&batch(&both)).unwrap()
            })
            .collect();
        let expected = parameters(&single);

        // The ranks' replicas are the same bits: the same reduced buffer on both.
        let (rank0, lengths, stats) = &results[0];
        let (rank1, _, _) = &results[1];
        assert!(rank0.iter().zip(rank1).all(|(a, b)| a.to_bits() == b.to_bits()), "replicas differ");
        // Against the single process, equal up to float summation order. The reduced
        // gradient's norm (before clipping) first: ~1e-7 relative apart, 1e-4 allowed.
        for (t, (got, want)) in stats.iter().zip(&single_stats).enumerate() {
            let rel = (got.grad_norm - want.grad_norm).abs() / want.grad_norm;
            assert!(
                rel <= 1e-4,
                "step {t}: gradient norm {} vs {} ({rel:.2e})",
                got.grad_norm,
                want.grad_norm
            );
        }
        // Then the parameters. An SGD step is theta <- (1 - lr wd) theta - lr clip(g): weight
        // decay shrinks both runs' difference alike, and the gradient part moves a run by at
        // most lr min(||g||, clip); M sums that over the steps. Float order changes the
        // reduced gradient by ~1e-7 of itself (at most n u ~ 1e-5 for sums of tens of
        // terms), so the runs end within a small fraction of M (1e-3 M allowed), plus one
        // ulp per element and step where the updates' own roundings land apart
        // (steps * eps_f32 * ||theta||). A wrong exchange (a row missed or misplaced, the
        // compact buffer clipped differently, a sum instead of a mean) is a difference of
        // order M.
        let t = config().train;
        let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let theta = norm(&expected).max(norm(&initial_values));
        let moved: f64 = single_stats.iter().map(|s| t.lr * s.grad_norm.min(t.clip_norm)).sum();
        let bound = 1e-3 * moved + steps as f64 * f64::from(f32::EPSILON) * theta;
        let diff: Vec<f32> = rank0.iter().zip(&expected).map(|(a, b)| a - b).collect();
        eprintln!("||two ranks - one process|| = {:.3e}, bound {bound:.3e}, M = {moved:.3e}", norm(&diff));
        assert!(norm(&diff) <= bound, "||two ranks - one process|| = {:.3e} > {bound:.3e}", norm(&diff));
        assert!(
            bound < 0.01 * moved,
            "the bound {bound:.3e} could not tell a wrong exchange (M = {moved:.3e})"
        );
        // Each step: the vocabulary-sized mask, then a compact buffer far smaller than the
        // dense one (the used rows of the embedding plus the LSTM and the head).
        let dense = single.flat_grad.numel() as i64;
        assert_eq!(lengths.len(), 2 * steps, "{lengths:?}");
        for pair in lengths.chunks(2) {
            assert_eq!(pair[0], VOCAB as i64, "{lengths:?}");
            assert!(pair[1] < dense / 4, "compact {} vs dense {dense}", pair[1]);
        }
    }
}
