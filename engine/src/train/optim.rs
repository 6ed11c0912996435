//! AdamW (decoupled weight decay, as `torch.optim.AdamW`), the linear warmup / linear decay
//! schedule of `transformers.get_linear_schedule_with_warmup`, and global-norm gradient clipping.

use candle_core::{Tensor, Var};

/// Errors raised by the optimiser.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// Saved optimiser state does not fit the variables.
    #[error("optimizer state does not match the model: {message}")]
    StateMismatch {
        /// What differs.
        message: String,
    },
    /// A tensor computation failed.
    #[error("optimizer computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// AdamW hyperparameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (not applied to biases and layer norms).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW over a fixed, ordered list of variables.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    names: Vec<String>,
    lr_scales: Vec<f64>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
}

/// Whether weight decay applies to the variable called `name` (not to biases and layer norms,
/// as sentence-transformers' `fit` and most BERT recipes do).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("LayerNorm"))
}

impl AdamW {
    /// A fresh optimiser for `vars`.
    pub fn new(vars: &[(String, Var)], cfg: AdamWConfig) -> Result<Self, OptimError> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            names: vars.iter().map(|(n, _)| n.clone()).collect(),
            lr_scales: vec![1.0; vars.len()],
            m: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<Result<_, _>>()?,
            v: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<Result<_, _>>()?,
            step: 0,
            cfg,
        })
    }

    /// Sets a learning-rate multiplier per variable (in the order of `new`'s `vars`), such as a
    /// larger rate for a new head than for a pretrained encoder.
    pub fn set_lr_scales(&mut self, scales: Vec<f64>) -> Result<(), OptimError> {
        if scales.len() != self.names.len() {
            return Err(OptimError::StateMismatch {
                message: format!(
                    "{} learning-rate scales for {} variables",
                    scales.len(),
                    self.names.len()
                ),
            });
        }
        self.lr_scales = scales;
        Ok(())
    }

    /// Number of updates applied.
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// Applies one update with learning rate `lr`; `grads[i]` belongs to `vars[i]` (a missing
    /// gradient leaves the variable and its moments unchanged).
    pub fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &[Option<Tensor>],
        lr: f64,
    ) -> Result<(), OptimError> {
        self.step += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for (i, ((name, var), g)) in vars.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let lr = lr * self.lr_scales[i];
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + self.cfg.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let theta = var.as_tensor();
            let decayed = if decays(name) && self.cfg.weight_decay > 0.0 {
                (theta * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                theta.clone()
            };
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments as named tensors (`m.NAME`, `v.NAME`) plus the step count, for checkpoints.
    pub fn state(&self) -> (Vec<(String, Tensor)>, usize) {
        let mut out = Vec::with_capacity(2 * self.names.len());
        for (i, n) in self.names.iter().enumerate() {
            out.push((format!("m.{n}"), self.m[i].clone()));
            out.push((format!("v.{n}"), self.v[i].clone()));
        }
        (out, self.step)
    }

    /// Restores moments and step count saved by [`AdamW::state`].
    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        step: usize,
    ) -> Result<(), OptimError> {
        for (i, n) in self.names.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{n}");
                let t = tensors.get(&key).ok_or_else(|| OptimError::StateMismatch {
                    message: format!("no {key}"),
                })?;
                if t.dims() != slot.dims() {
                    return Err(OptimError::StateMismatch {
                        message: format!(
                            "{key} has shape {:?}, expected {:?}",
                            t.dims(),
                            slot.dims()
                        ),
                    });
                }
                *slot = t.to_device(slot.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warmup from 0 to `base_lr` over `warmup` steps, then linear decay to 0 at `total`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearSchedule {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// Total optimiser steps.
    pub total: usize,
}

impl LinearSchedule {
    /// A schedule whose warmup is `ratio` of `total` steps (rounded up, as transformers does).
    pub fn with_ratio(base_lr: f64, ratio: f64, total: usize) -> Self {
        Self {
            base_lr,
            warmup: (ratio * total as f64).ceil() as usize,
            total,
        }
    }

    /// Learning rate for the update that follows `step` completed updates.
    pub fn lr(&self, step: usize) -> f64 {
        let f = if step < self.warmup {
            step as f64 / self.warmup.max(1) as f64
        } else {
            let rest = self.total.saturating_sub(self.warmup).max(1);
            (self.total.saturating_sub(step) as f64 / rest as f64).max(0.0)
        };
        self.base_lr * f
    }
}

/// Scales gradients so that their global L2 norm is at most `max_norm`; returns the norm before
/// clipping (`torch.nn.utils.clip_grad_norm_`).
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64, OptimError> {
    let mut sq = 0.0f64;
    for g in grads.iter().flatten() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let c = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * c)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_hand_computed_update() {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let vars = vec![("w.weight".to_string(), w.clone())];
        let mut opt = AdamW::new(&vars, AdamWConfig::default()).unwrap();
        let g = Tensor::new(&[0.5f32, -0.1], &dev).unwrap();
        opt.step(&vars, &[Some(g)], 0.1).unwrap();
        // First step: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (eps negligible),
        // after decoupled decay theta * (1 - lr * wd).
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.1, -2.0 * (1.0 - 0.001) + 0.1];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{got:?}");
        }
        let (state, step) = opt.state();
        assert_eq!(step, 1);
        let map = state.into_iter().collect();
        let mut opt2 = AdamW::new(&vars, AdamWConfig::default()).unwrap();
        opt2.load_state(&map, 1).unwrap();
        assert_eq!(opt2.steps_taken(), 1);
    }

    #[test]
    fn no_decay_on_bias_and_layer_norm() {
        assert!(decays("encoder.layer.0.output.dense.weight"));
        assert!(!decays("encoder.layer.0.output.dense.bias"));
        assert!(!decays("embeddings.LayerNorm.weight"));
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = LinearSchedule::with_ratio(1.0, 0.1, 100);
        assert_eq!(s.warmup, 10);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(55) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr(100), 0.0);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let dev = Device::Cpu;
        let mut g = vec![Some(Tensor::new(&[3f32, 4.], &dev).unwrap()), None];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let v = g[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5);
        let n2 = clip_grad_norm(&mut g, 10.0).unwrap();
        assert!((n2 - 1.0).abs() < 1e-5);
    }
}
