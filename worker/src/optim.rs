//! The optimizers (Adam, plain SGD), the learning-rate schedule and global-norm clipping.
//!
//! Adam is written out (rather than tch's optimizer) so that its state can be saved in a
//! checkpoint and restored bit for bit. It follows `torch.optim.Adam` (eps 1e-8, weight
//! decay added to the gradient, bias correction), step for step, or `torch.optim.AdamW`
//! (decoupled weight decay) with the same state. SGD follows
//! `torch.optim.SGD` with momentum 0, which has no state besides the step count.

use tch::{Kind, Tensor};
use trainer_core::config::{self, Schedule, TrainConfig};

use crate::error::{Result, WorkerError};

pub const ADAM_EPS: f64 = 1e-8;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW: decay the parameters (`p *= 1 - lr * weight_decay`) instead of adding
    /// `weight_decay * p` to the gradient.
    pub decoupled: bool,
}

impl AdamConfig {
    pub fn from_train(t: &TrainConfig) -> Self {
        Self {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: ADAM_EPS,
            weight_decay: t.weight_decay,
            decoupled: t.optimizer == config::Optimizer::AdamW,
        }
    }
}

/// Adam's state: the step count and the two moment estimates per parameter.
#[derive(Debug)]
pub struct Adam {
    pub config: AdamConfig,
    pub steps: u64,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
}

impl Adam {
    pub fn new(params: &[&Tensor], config: AdamConfig) -> Result<Self> {
        let zeros = |p: &Tensor| Tensor::f_zeros_like(p).map_err(WorkerError::from);
        Ok(Self {
            config,
            steps: 0,
            exp_avg: params.iter().map(|p| zeros(p)).collect::<Result<_>>()?,
            exp_avg_sq: params.iter().map(|p| zeros(p)).collect::<Result<_>>()?,
        })
    }

    /// One update of every parameter from its `.grad`, with learning rate `lr`.
    pub fn step(&mut self, params: &[&Tensor], lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let AdamConfig { beta1, beta2, eps, weight_decay, decoupled } = self.config;
        let t = self.steps as i32;
        let bias1 = 1.0 - beta1.powi(t);
        let bias2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        for ((param, m), v) in params.iter().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq) {
            let mut grad = param.f_grad()?;
            if !grad.defined() {
                continue;
            }
            let mut param = param.shallow_clone();
            if weight_decay != 0.0 {
                if decoupled {
                    let _ = param.f_mul_scalar_(1.0 - lr * weight_decay)?;
                } else {
                    grad = grad.f_add(&param.f_mul_scalar(weight_decay)?)?;
                }
            }
            let _ = m.f_lerp_(&grad, 1.0 - beta1)?;
            let _ = v.f_mul_scalar_(beta2)?;
            let _ = v.f_add_(&grad.f_mul(&grad)?.f_mul_scalar(1.0 - beta2)?)?;
            let denom = correctly_rounded_sqrt(v)?.f_div_scalar(bias2_sqrt)?.f_add_scalar(eps)?;
            let update = m.f_div(&denom)?.f_mul_scalar(lr / bias1)?;
            let _ = param.f_sub_(&update)?;
        }
        Ok(())
    }
}

/// `sqrt(v)`, correctly rounded on every device, so that every replica gets the same bits.
///
/// libtorch computes a CPU float `sqrt` with MKL's vector math, whose result depends on the
/// code path MKL picks at run time for the processor (`MKL_CBWR`): AVX2 and AVX-512 paths
/// disagree in the last bit for about 1 value in 160, and neither is correctly rounded. Two
/// processes whose paths differ then make different Adam steps from identical gradients,
/// and the replicas drift apart. In f64 every path is accurate enough that rounding back to
/// f32 gives the correctly rounded root (checked on all of [1, 4), denormals and 4 million
/// random floats, on each MKL path). CUDA's `sqrt` is already correctly rounded.
pub fn correctly_rounded_sqrt(v: &Tensor) -> Result<Tensor> {
    if v.device() != tch::Device::Cpu || v.kind() != Kind::Float {
        return Ok(v.f_sqrt()?);
    }
    Ok(v.f_to_kind(Kind::Double)?.f_sqrt()?.f_to_kind(Kind::Float)?)
}

/// Plain SGD: `p -= lr * (g + weight_decay * p)`. Stateless, so a checkpoint holds only
/// the step count; its update is linear in the gradient, so float-order differences in the
/// gradient stay as small in the parameters (unlike Adam's division by sqrt(v)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    pub weight_decay: f64,
    pub steps: u64,
}

impl Sgd {
    pub fn new(weight_decay: f64) -> Self {
        Self { weight_decay, steps: 0 }
    }

    /// One update of every parameter from its `.grad`, with learning rate `lr`.
    pub fn step(&mut self, params: &[&Tensor], lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        for param in params {
            let mut grad = param.f_grad()?;
            if !grad.defined() {
                continue;
            }
            if self.weight_decay != 0.0 {
                grad = grad.f_add(&param.f_mul_scalar(self.weight_decay)?)?;
            }
            let mut param = param.shallow_clone();
            let _ = param.f_sub_(&grad.f_mul_scalar(lr)?)?;
        }
        Ok(())
    }
}

/// The replica's optimizer, as `train.optimizer` chose it.
#[derive(Debug)]
pub enum Optimizer {
    Adam(Adam),
    Sgd(Sgd),
}

impl Optimizer {
    pub fn new(params: &[&Tensor], train: &TrainConfig) -> Result<Self> {
        Ok(match train.optimizer {
            config::Optimizer::Adam | config::Optimizer::AdamW => {
                Self::Adam(Adam::new(params, AdamConfig::from_train(train))?)
            }
            config::Optimizer::Sgd => Self::Sgd(Sgd::new(train.weight_decay)),
        })
    }

    /// Which one this is, as the config names it.
    pub fn kind(&self) -> config::Optimizer {
        match self {
            Self::Adam(adam) if adam.config.decoupled => config::Optimizer::AdamW,
            Self::Adam(_) => config::Optimizer::Adam,
            Self::Sgd(_) => config::Optimizer::Sgd,
        }
    }

    pub fn step(&mut self, params: &[&Tensor], lr: f64) -> Result<()> {
        match self {
            Self::Adam(adam) => adam.step(params, lr),
            Self::Sgd(sgd) => sgd.step(params, lr),
        }
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        match self {
            Self::Adam(adam) => adam.steps,
            Self::Sgd(sgd) => sgd.steps,
        }
    }

    pub fn set_steps(&mut self, steps: u64) {
        match self {
            Self::Adam(adam) => adam.steps = steps,
            Self::Sgd(sgd) => sgd.steps = steps,
        }
    }
}

/// The learning rate at `step` (0-based): linear warm-up over `warmup` steps, then the
/// schedule over the remaining steps up to `total` (decaying ones reach 0 at `total`).
pub fn lr_at(base: f64, schedule: Schedule, warmup: u64, total: u64, step: u64) -> f64 {
    if warmup > 0 && step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step.saturating_sub(warmup)) as f64 / span).clamp(0.0, 1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Scales the flat gradient in place so that its L2 norm is at most `max_norm` (0: no
/// clipping), as `torch.nn.utils.clip_grad_norm_` does; returns the norm before clipping.
pub fn clip_global_norm(flat: &mut Tensor, max_norm: f64) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let norm = flat.f_norm()?.f_to_kind(Kind::Double)?.f_double_value(&[])?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            let _ = flat.f_mul_scalar_(coef)?;
        }
    }
    Ok(norm)
}

/// [`clip_global_norm`] without reading the norm on the host (a wait for the device's
/// queue on CUDA): the scale `min(1, max_norm / (norm + 1e-6))` is computed on the device
/// in the same f64 arithmetic and applied as the same f32 multiply (`x * 1.0` is `x`), so
/// the buffer gets the same bits. Returns the norm before clipping as a 0-dim f64 tensor,
/// to read once the step's work is queued. A non-finite norm scales by NaN or 0: the caller
/// must refuse the step when it reads it.
pub fn clip_global_norm_on_device(flat: &mut Tensor, max_norm: f64) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let norm = flat.f_norm()?.f_to_kind(Kind::Double)?;
    if max_norm > 0.0 {
        let max = Tensor::f_full([] as [i64; 0], max_norm, (Kind::Double, flat.device()))?;
        let coef = max.f_div(&norm.f_add_scalar(1e-6)?)?.f_clamp_max(1.0)?;
        let _ = flat.f_mul_(&coef.f_to_kind(Kind::Float)?)?;
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_and_decay() {
        let lr = |s, step| lr_at(1.0, s, 10, 110, step);
        assert!((lr(Schedule::Constant, 0) - 0.1).abs() < 1e-12);
        assert!((lr(Schedule::Constant, 9) - 1.0).abs() < 1e-12);
        assert!((lr(Schedule::Constant, 500) - 1.0).abs() < 1e-12);
        assert!((lr(Schedule::Linear, 60) - 0.5).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 60) - 0.5).abs() < 1e-12);
        assert!(lr(Schedule::Cosine, 110).abs() < 1e-12);
        assert!(lr(Schedule::Linear, 109) > 0.0);
    }

    #[test]
    fn adam_matches_the_closed_form_first_steps() {
        tch::set_num_threads(1);
        // With a constant gradient g, Adam's first step is -lr * sign(g) (up to eps) and
        // weight decay adds wd * p to the gradient.
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let cfg = AdamConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false };
        let mut adam = Adam::new(&[&p], cfg).unwrap();
        (&p * Tensor::from_slice(&[3.0f32, -0.5])).sum(Kind::Float).backward();
        adam.step(&[&p], 0.1).unwrap();
        let v: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        assert!((v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6, "{v:?}");
        assert_eq!(adam.steps, 1);
    }

    #[test]
    fn adamw_decays_the_parameter_not_the_gradient() {
        // With a zero gradient Adam's update is 0, so AdamW moves p by exactly -lr*wd*p,
        // while Adam's coupled decay turns wd*p into a gradient (a full -lr*sign step).
        let run = |decoupled| {
            let p = Tensor::from_slice(&[2.0f32]).set_requires_grad(true);
            let cfg = AdamConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.5, decoupled };
            let mut adam = Adam::new(&[&p], cfg).unwrap();
            (&p * 0.0).sum(Kind::Float).backward();
            adam.step(&[&p], 0.1).unwrap();
            p.detach().double_value(&[0])
        };
        assert!((run(true) - 2.0 * (1.0 - 0.1 * 0.5)).abs() < 1e-6);
        assert!((run(false) - 1.9).abs() < 1e-5);
    }

    #[test]
    fn clipping_on_the_device_gives_the_same_bits_as_on_the_host() {
        let values: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0).collect();
        for max_norm in [0.0, 0.5, 3.0, 1e6] {
            let mut host = Tensor::from_slice(&values);
            let mut device = Tensor::from_slice(&values);
            let norm = clip_global_norm(&mut host, max_norm).unwrap();
            let norm_t = clip_global_norm_on_device(&mut device, max_norm).unwrap();
            assert_eq!(norm.to_bits(), norm_t.double_value(&[]).to_bits(), "max_norm {max_norm}");
            let (h, d) = (Vec::<f32>::try_from(&host).unwrap(), Vec::<f32>::try_from(&device).unwrap());
            assert!(h.iter().zip(&d).all(|(a, b)| a.to_bits() == b.to_bits()), "max_norm {max_norm}");
        }
    }

    #[test]
    fn the_adam_square_root_is_correctly_rounded() {
        // Tiny, denormal, ordinary and large values, and every float of [1, 1 + 2^-9): the
        // result must be the f32 nearest to the exact root (f64's root rounded to f32 is).
        let mut values: Vec<f32> =
            vec![0.0, f32::MIN_POSITIVE / 3.0, 3.631_520_4e-21, 6.234_299_7e-37, 7.5, 1e30];
        values.extend((0u32..1 << 14).map(|i| f32::from_bits(0x3f80_0000 + i)));
        let roots = correctly_rounded_sqrt(&Tensor::from_slice(&values)).unwrap();
        let roots = Vec::<f32>::try_from(&roots).unwrap();
        for (x, r) in values.iter().zip(&roots) {
            assert_eq!(r.to_bits(), ((*x as f64).sqrt() as f32).to_bits(), "sqrt({x:e}) gave {r:e}");
        }
    }

    #[test]
    fn sgd_subtracts_lr_times_the_decayed_gradient() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut sgd = Sgd::new(0.5);
        (&p * Tensor::from_slice(&[3.0f32, -0.5])).sum(Kind::Float).backward();
        sgd.step(&[&p], 0.1).unwrap();
        // p - 0.1 * (g + 0.5 p): 1 - 0.1 * 3.5 and -2 - 0.1 * (-1.5).
        let v: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        assert!((v[0] - 0.65).abs() < 1e-6 && (v[1] + 1.85).abs() < 1e-6, "{v:?}");
        assert_eq!(sgd.steps, 1);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = Tensor::from_slice(&[3.0f32, 4.0]);
        let norm = clip_global_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let v: Vec<f32> = Vec::try_from(&g).unwrap();
        assert!((v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5);
        let mut h = Tensor::from_slice(&[0.3f32, 0.4]);
        clip_global_norm(&mut h, 1.0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&h).unwrap(), vec![0.3, 0.4]);
    }
}
