//! Device selection (CUDA, then Metal, then CPU, with an override) and an estimate of peak
//! training memory for (model, batch size, sequence length) that a scheduler can use.

use std::str::FromStr;

use candle_core::{Device, DeviceLocation};
use serde::Serialize;

use crate::embed::config::BertConfig;

/// Errors raised while choosing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device string is not understood.
    #[error("unknown device {given:?}: use auto, cpu, cuda, cuda:N, metal or metal:N")]
    Parse {
        /// The string given.
        given: String,
    },
    /// The backend is not compiled in or the device cannot be opened.
    #[error("device {wanted} is unavailable: {reason}")]
    Unavailable {
        /// The device asked for.
        wanted: String,
        /// Why, and what to do.
        reason: String,
    },
}

/// Which device to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicePref {
    /// CUDA if available, then Metal, then CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
    /// An Apple Metal GPU by ordinal.
    Metal(usize),
}

impl FromStr for DevicePref {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let err = || DeviceError::Parse { given: s.into() };
        let (kind, ord) = match s.split_once(':') {
            Some((k, n)) => (k, Some(n.parse::<usize>().map_err(|_| err())?)),
            None => (s, None),
        };
        match (kind.to_ascii_lowercase().as_str(), ord) {
            ("auto", None) => Ok(Self::Auto),
            ("cpu", None) => Ok(Self::Cpu),
            ("cuda", n) => Ok(Self::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(Self::Metal(n.unwrap_or(0))),
            _ => Err(err()),
        }
    }
}

fn open_cuda(n: usize) -> Result<Device, DeviceError> {
    if !candle_core::utils::cuda_is_available() {
        return Err(DeviceError::Unavailable {
            wanted: format!("cuda:{n}"),
            reason: "this build has no CUDA support; rebuild with `--features cuda`".into(),
        });
    }
    Device::new_cuda(n).map_err(|e| DeviceError::Unavailable {
        wanted: format!("cuda:{n}"),
        reason: e.to_string(),
    })
}

fn open_metal(n: usize) -> Result<Device, DeviceError> {
    if !candle_core::utils::metal_is_available() {
        return Err(DeviceError::Unavailable {
            wanted: format!("metal:{n}"),
            reason: "this build has no Metal support; rebuild with `--features metal`".into(),
        });
    }
    // Candle's Metal constructor panics when the machine has no Metal device (candle#3839).
    match std::panic::catch_unwind(|| Device::new_metal(n)) {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(DeviceError::Unavailable {
            wanted: format!("metal:{n}"),
            reason: e.to_string(),
        }),
        Err(_) => Err(DeviceError::Unavailable {
            wanted: format!("metal:{n}"),
            reason: "no Metal device found".into(),
        }),
    }
}

/// Opens the preferred device; `Auto` tries CUDA, then Metal, then falls back to the CPU.
pub fn select(pref: DevicePref) -> Result<Device, DeviceError> {
    let dev = match pref {
        DevicePref::Cpu => Device::Cpu,
        DevicePref::Cuda(n) => open_cuda(n)?,
        DevicePref::Metal(n) => open_metal(n)?,
        DevicePref::Auto => open_cuda(0)
            .or_else(|_| open_metal(0))
            .unwrap_or(Device::Cpu),
    };
    tracing::info!(device = %describe(&dev), "selected device");
    Ok(dev)
}

/// `cpu`, `cuda:N` or `metal:N`.
pub fn describe(dev: &Device) -> String {
    match dev.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Estimated peak memory of a training run, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// Model weights (f32).
    pub weights: u64,
    /// Gradients plus AdamW moments of the trainable variables.
    pub gradients_and_optimizer: u64,
    /// Activations kept for the backward pass, with backward's transient copies.
    pub activations: u64,
    /// Fixed runtime overhead (allocator, tokenizer, code).
    pub overhead: u64,
    /// Sum of the above.
    pub total: u64,
}

/// Fixed process overhead measured on CPU (binary, tokenizer, allocator arenas).
const OVERHEAD_BYTES: u64 = 300 << 20;
/// Calibration of the composed-op activation count: all-MiniLM-L6-v2, 64 texts x 128 tokens,
/// measured 4.94 GiB peak RSS on CPU where the raw count x 2 gave 12.0 GiB (candle frees
/// intermediates during backward and many counted tensors are views), so the factor is 0.7.
const BACKWARD_FACTOR: f64 = 0.7;
/// Calibration of the fused CPU count: the same run measured 3.36 GiB peak RSS
/// (`/usr/bin/time -v ragd-worker train --batch-size 32 --max-seq-len 128` on pairs of two
/// passages of 128+ tokens), 2.73 GiB of it activations, against 1.97 GiB counted: backward
/// holds each layer's gradients while it makes the next ones.
const FUSED_BACKWARD_FACTOR: f64 = 1.4;

/// Which implementation of the encoder's layers a device runs (`embed::fused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKernels {
    /// The fused CPU ops (one graph node per linear layer, attention, layer norm, GELU).
    FusedCpu,
    /// Candle's element-wise ops (CUDA, Metal): more and larger intermediates.
    Composed,
}

impl LayerKernels {
    /// The kernels `device` runs.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Self::FusedCpu
        } else {
            Self::Composed
        }
    }
}

/// Estimates peak memory for training a model with config `cfg` on batches of `texts` sequences
/// (pairs x (2 + negatives), or one GradCache mini-batch) of `seq_len` tokens, updating
/// `trainable` parameters with AdamW, on any device: the larger (composed-op) figure, for
/// placement before the device is known.
pub fn estimate_training_memory(
    cfg: &BertConfig,
    texts: usize,
    seq_len: usize,
    trainable: u64,
) -> MemoryEstimate {
    estimate_training_memory_with(LayerKernels::Composed, cfg, texts, seq_len, trainable)
}

/// As [`estimate_training_memory`], for the given layer kernels.
pub fn estimate_training_memory_with(
    kernels: LayerKernels,
    cfg: &BertConfig,
    texts: usize,
    seq_len: usize,
    trainable: u64,
) -> MemoryEstimate {
    let (h, i, nh, l) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.num_attention_heads as u64,
        seq_len as u64,
    );
    let params = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size + 2) as u64
        * h
        + cfg.num_hidden_layers as u64 * (4 * h * h + 2 * h * i + 9 * h + i);
    let layers = cfg.num_hidden_layers as u64;
    let (per_text, factor) = match kernels {
        // Tensors kept per sequence, counted from the composed forward pass: 12 L*H for the
        // embeddings; per layer ~35 L*H (projections, heads, layer norms, dropout masks),
        // 3 L*I (feed-forward, GELU) and 8 heads*L^2 (scores, softmax, attention dropout).
        LayerKernels::Composed => (
            12 * l * h + layers * (35 * l * h + 3 * l * i + 8 * nh * l * l),
            BACKWARD_FACTOR,
        ),
        // Fused: per layer ~14 L*H (input, q, k, v, context, projections, dropout, residuals,
        // norms), 2 L*I (feed-forward, GELU) and the attention probabilities once.
        LayerKernels::FusedCpu => (
            12 * l * h + layers * (14 * l * h + 2 * l * i + nh * l * l),
            FUSED_BACKWARD_FACTOR,
        ),
    };
    let activations = (per_text as f64 * texts as f64 * 4.0 * factor) as u64;
    let weights = params * 4;
    let gradients_and_optimizer = trainable * 4 * 3;
    MemoryEstimate {
        weights,
        gradients_and_optimizer,
        activations,
        overhead: OVERHEAD_BYTES,
        total: weights + gradients_and_optimizer + activations + OVERHEAD_BYTES,
    }
}

/// Total and available RAM in bytes, bounded by the cgroup limit where one applies (what the
/// worker advertises, and what training sizes its batches by). Blocking: it reads the OS.
pub fn system_memory() -> (u64, u64) {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory_specifics(sysinfo::MemoryRefreshKind::nothing().with_ram());
    let mut total = sys.total_memory();
    let mut available = sys.available_memory();
    if let Some(limits) = sys.cgroup_limits() {
        if limits.total_memory > 0 && limits.total_memory < total {
            total = limits.total_memory;
            available = available.min(limits.free_memory);
        }
    }
    (total, available.min(total))
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Sets `RAYON_NUM_THREADS` to Candle's own default thread count when it is unset. Candle 0.11
/// works that default out again for every matrix product of its CPU backend, and on Linux that
/// reads `/proc/cpuinfo` (`num_cpus::get_physical`): 7% of the built-in LLM's decoding time
/// (perf). With the variable set, Candle reads it instead, and rayon's pool gets the same count.
/// It changes the process environment: call it first thing in `main`, before any other thread
/// exists.
pub fn settle_thread_count() {
    const VAR: &str = "RAYON_NUM_THREADS";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, candle_core::utils::get_num_threads().to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_strings() {
        assert_eq!("auto".parse::<DevicePref>().unwrap(), DevicePref::Auto);
        assert_eq!("CPU".parse::<DevicePref>().unwrap(), DevicePref::Cpu);
        assert_eq!("cuda:1".parse::<DevicePref>().unwrap(), DevicePref::Cuda(1));
        assert_eq!("metal".parse::<DevicePref>().unwrap(), DevicePref::Metal(0));
        assert!("tpu"
            .parse::<DevicePref>()
            .unwrap_err()
            .to_string()
            .contains("tpu"));
        assert!("cuda:x".parse::<DevicePref>().is_err());
    }

    #[test]
    fn cpu_and_auto_always_work_and_missing_backends_say_how_to_build() {
        assert!(select(DevicePref::Cpu).unwrap().is_cpu());
        let auto = select(DevicePref::Auto).unwrap();
        assert_eq!(
            auto.is_cpu(),
            !cfg!(any(feature = "cuda", feature = "metal"))
        );
        if !cfg!(feature = "cuda") {
            let err = select(DevicePref::Cuda(0)).unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
        assert_eq!(describe(&Device::Cpu), "cpu");
    }

    #[test]
    fn estimate_grows_with_batch_and_length_and_counts_minilm_params() {
        let cfg: BertConfig = serde_json::from_value(serde_json::json!({"vocab_size": 30522,
            "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
            "intermediate_size": 1536, "max_position_embeddings": 512}))
        .unwrap();
        let e = estimate_training_memory(&cfg, 64, 128, 22_565_376);
        // all-MiniLM-L6-v2: 22,713,216 parameters with the pooler, 22,565,376 without.
        assert_eq!(e.weights, 22_565_376 * 4);
        assert!(estimate_training_memory(&cfg, 128, 128, 0).activations > e.activations);
        assert!(estimate_training_memory(&cfg, 64, 256, 0).activations > 2 * e.activations);
        assert!(peak_rss_bytes().unwrap() > 0);
        // The calibration runs: 3.36 GiB measured with the fused CPU kernels, 4.94 composed.
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let fused =
            estimate_training_memory_with(LayerKernels::FusedCpu, &cfg, 64, 128, 22_565_376);
        assert!(
            (gib(fused.total) - 3.36).abs() < 0.25,
            "{}",
            gib(fused.total)
        );
        assert!((gib(e.total) - 4.94).abs() < 0.4, "{}", gib(e.total));
    }
}
