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
use crate::model::{LstmClassifier, ModelShape};
use crate::optim::{clip_global_norm, lr_at, Adam, AdamConfig};
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

/// Evaluation results as sums, so that ranks can add theirs up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalCounts {
    pub correct: u64,
    pub total: u64,
    /// Sum of per-review cross-entropy.
    pub loss_sum: f64,
}

impl EvalCounts {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }

    pub fn mean_loss(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.loss_sum / self.total as f64
        }
    }

    pub fn add(&mut self, other: &EvalCounts) {
        self.correct += other.correct;
        self.total += other.total;
        self.loss_sum += other.loss_sum;
    }
}

/// A model replica with its optimizer and the collective that joins it to the others.
pub struct Trainer {
    config: JobConfig,
    model: LstmClassifier,
    optimizer: Adam,
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
        let model = LstmClassifier::new(shape.clone(), config.model.dropout, device)?;
        let params: Vec<&Tensor> = model.parameters().iter().map(|(_, t)| t).collect();
        let optimizer = Adam::new(&params, AdamConfig::from_train(&config.train))?;
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

    pub fn optimizer(&self) -> &Adam {
        &self.optimizer
    }

    pub fn optimizer_mut(&mut self) -> &mut Adam {
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
        let _guard = tch::no_grad_guard();
        let mut offset = 0i64;
        for (_, p) in self.model.parameters() {
            let n = p.numel() as i64;
            let mut slot = self.flat_grad.f_narrow(0, offset, n)?;
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

    /// Writes the flat buffer back into the parameters' gradients.
    fn scatter_gradients(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut offset = 0i64;
        for (name, p) in self.model.parameters() {
            let n = p.numel() as i64;
            let slot = self.flat_grad.f_narrow(0, offset, n)?.f_view(p.size().as_slice())?;
            let mut g = p.f_grad()?;
            if !g.defined() {
                return Err(WorkerError::Invalid(format!(
                    "internal: parameter {name} has no gradient buffer"
                )));
            }
            g.f_copy_(&slot)?;
            offset += n;
        }
        Ok(())
    }

    /// One optimizer step on `batch`: forward and backward per TBPTT window, gradients into
    /// one flat buffer, all-reduced (mean) across ranks, written back, clipped by global
    /// norm, then Adam.
    pub fn train_step(&mut self, batch: &Batch) -> Result<StepStats> {
        let shape = self.model.shape().clone();
        let device = self.device();
        let batch = DeviceBatch::new(batch, shape.vocab_size, device)?;
        tch::manual_seed(step_seed(self.config.train.seed, self.rank(), self.global_step));
        self.model.zero_grad()?;

        // Forward and backward, window by window.
        let out = run_windows(&self.model, &batch, Pass::Train, self.pass_options)?;
        let loss = out.loss_sum / batch.size as f64;
        if !loss.is_finite() {
            return Err(WorkerError::Diverged {
                step: self.global_step,
                message: format!("the loss is {loss}; lower train.lr or set train.clip_norm"),
            });
        }

        // The point where ranks meet: one flat buffer, averaged over all of them.
        self.gather_gradients()?;
        self.collective.all_reduce_mean(&mut self.flat_grad)?;
        let grad_norm = clip_global_norm(&mut self.flat_grad, self.config.train.clip_norm)?;
        if !grad_norm.is_finite() {
            return Err(WorkerError::Diverged {
                step: self.global_step,
                message: format!("the gradient norm is {grad_norm}; lower train.lr or set train.clip_norm"),
            });
        }
        self.scatter_gradients()?;

        // The optimizer step.
        let lr = self.current_lr();
        let params: Vec<&Tensor> = self.model.parameters().iter().map(|(_, t)| t).collect();
        self.optimizer.step(&params, lr)?;
        self.global_step += 1;

        let correct = count_correct(&out.logits, &batch.labels)?;
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
            let batch = DeviceBatch::new(&batch, self.model.shape().vocab_size, self.device())?;
            let out = run_windows(&self.model, &batch, Pass::Eval, self.pass_options)?;
            counts.add(&EvalCounts {
                correct: count_correct(&out.logits, &batch.labels)? as u64,
                total: batch.size as u64,
                loss_sum: out.loss_sum,
            });
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
    let batch = DeviceBatch::new(batch, model.shape().vocab_size, model.device())?;
    let out = run_windows(model, &batch, Pass::Eval, options)?;
    let probs = batch
        .unsort(&out.logits)?
        .f_softmax(1, Kind::Float)?
        .f_select(1, 1)?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?;
    Ok(Vec::<f32>::try_from(&probs)?)
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

fn count_correct(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let predicted = logits.f_argmax(1, false)?;
    let correct = predicted.f_eq_tensor(labels)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    Ok(correct as usize)
}
