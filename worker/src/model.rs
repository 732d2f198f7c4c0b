//! The tutorial's classifier: Embedding → multi-layer LSTM (batch-first) → Dropout → Linear(2)
//! on the last layer's final hidden state; or ULMFiT's concat pooling head, which feeds
//! `[last state, max over time, mean over time]` to the linear layer. Optionally
//! bidirectional (the head reads both directions' features) and with AWD-LSTM's
//! regularisers ([`Dropouts`]), all off by default.
//!
//! The parameters are plain leaf tensors in a fixed order, named as PyTorch names them
//! (`embedding.weight`, `lstm.weight_ih_l0`, ..., `fc.weight`), so that the exported
//! safetensors file loads into the tutorial's module and every rank flattens its gradients
//! in the same order.

use tch::{Device, Kind, Tensor};
use trainer_core::config::ModelConfig;

use crate::error::{Result, WorkerError};

pub use trainer_core::model_shape::{ModelShape, NUM_CLASSES};

/// The dropout probabilities of training (none of them changes a parameter's shape).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Dropouts {
    /// On the head's input features (`model.dropout`).
    pub head: f64,
    /// Whole embedding rows per batch (`model.embedding_dropout`).
    pub embedding: f64,
    /// Locked masks on the LSTM's input and between layers (`model.variational_dropout`).
    pub variational: f64,
    /// DropConnect on `weight_hh` (`model.weight_drop`).
    pub weight: f64,
}

impl Dropouts {
    pub fn from_config(config: &ModelConfig) -> Self {
        Self {
            head: config.dropout,
            embedding: config.embedding_dropout,
            variational: config.variational_dropout,
            weight: config.weight_drop,
        }
    }
}

/// The model replica: parameters as leaf tensors that require gradients.
#[derive(Debug)]
pub struct LstmClassifier {
    shape: ModelShape,
    dropouts: Dropouts,
    device: Device,
    params: Vec<(String, Tensor)>,
}

impl LstmClassifier {
    /// A freshly initialised model, with PyTorch's default initialisation: embedding
    /// N(0, 1); LSTM weights and biases U(-1/√hidden, 1/√hidden); linear U(-1/√in, 1/√in).
    /// Seed libtorch (`tch::manual_seed`) first for reproducible weights.
    pub fn new(shape: ModelShape, dropouts: Dropouts, device: Device) -> Result<Self> {
        if shape.vocab_size < 2 {
            return Err(WorkerError::Invalid(format!(
                "vocabulary of {} entries: needs at least <pad> and <unk>",
                shape.vocab_size
            )));
        }
        let mut params = Vec::new();
        let _guard = tch::no_grad_guard();
        let lstm_bound = 1.0 / (shape.hidden as f64).sqrt();
        let fc_bound = 1.0 / (shape.head_inputs() as f64).sqrt();
        for (name, dims) in shape.parameter_shapes() {
            let mut t = Tensor::f_empty(dims.as_slice(), (Kind::Float, device))?;
            if name.starts_with("embedding") {
                let _ = t.f_normal_(0.0, 1.0)?;
            } else if name.starts_with("lstm") {
                let _ = t.f_uniform_(-lstm_bound, lstm_bound)?;
            } else {
                let _ = t.f_uniform_(-fc_bound, fc_bound)?;
            }
            params.push((name, t.f_set_requires_grad(true)?));
        }
        drop(_guard);
        // Allocate every gradient now (as zeros), so that all ranks always hold the same
        // set of gradient buffers, whatever a batch touched.
        let mut touch = Tensor::f_zeros([], (Kind::Float, device))?;
        for (_, p) in &params {
            touch = touch.f_add(&p.f_sum(Kind::Float)?.f_mul_scalar(0.0)?)?;
        }
        touch.f_backward()?;
        Ok(Self { shape, dropouts, device, params })
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn dropouts(&self) -> Dropouts {
        self.dropouts
    }

    /// (name, tensor) in the canonical order.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn embedding_weight(&self) -> &Tensor {
        &self.params[0].1
    }

    /// The LSTM's flat weight list as `Tensor::lstm` expects it: per layer and direction
    /// `[w_ih, w_hh, b_ih, b_hh]`.
    pub fn lstm_weights(&self) -> Vec<&Tensor> {
        let n = 4 * self.shape.layers * self.shape.directions();
        self.params[1..1 + n].iter().map(|(_, t)| t).collect()
    }

    pub fn fc(&self) -> (&Tensor, &Tensor) {
        let n = self.params.len();
        (&self.params[n - 2].1, &self.params[n - 1].1)
    }

    /// Copies named tensors into the parameters; every parameter must be present with its
    /// exact shape. `source` names the file for error messages.
    pub fn load_named(&mut self, named: &[(String, Tensor)], source: &str) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (name, param) in &mut self.params {
            let (_, value) = named
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| WorkerError::Invalid(format!("{source}: parameter {name} is missing")))?;
            if value.size() != param.size() {
                return Err(WorkerError::Invalid(format!(
                    "{source}: parameter {name} has shape {:?}, the model expects {:?}",
                    value.size(),
                    param.size()
                )));
            }
            param.f_copy_(&value.f_to_kind(Kind::Float)?.f_to_device(self.device)?)?;
        }
        if let Some((extra, _)) = named.iter().find(|(n, _)| !self.params.iter().any(|(p, _)| p == n)) {
            return Err(WorkerError::Invalid(format!(
                "{source}: unexpected tensor {extra} (not a parameter of this model)"
            )));
        }
        Ok(())
    }

    /// Sets every parameter's gradient to zero (allocating it on first use).
    pub fn zero_grad(&self) -> Result<()> {
        for (_, p) in &self.params {
            let mut g = p.f_grad()?;
            if g.defined() {
                let _guard = tch::no_grad_guard();
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }
}
