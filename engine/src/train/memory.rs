//! Bounding the activation memory of a training batch. A batch of MNRL with hard negatives
//! embeds `batch * (2 + negatives)` texts and keeps every text's graph until the backward pass:
//! 32 pairs with 5 negatives at 256 tokens keep about 20 GiB with all-MiniLM-L6-v2 (measured:
//! 5.8 GB peak at 56 texts, 10.8 GB at 112, so ~90 MB per 256-token text). When a batch would
//! take more than half the memory the system has available, training switches to GradCache
//! (the same gradients, computed one mini-batch of texts at a time, at the cost of a second
//! forward pass) with the largest mini-batch that fits.

use crate::device::{estimate_training_memory_with, LayerKernels};
use crate::embed::config::BertConfig;

/// Bytes of activations one text of `len` tokens keeps for the backward pass on the fused CPU
/// kernels ([`crate::device`]'s calibrated count: 106 MB per 256-token text for
/// all-MiniLM-L6-v2, against ~90 MB measured).
pub fn activation_bytes_per_text(c: &BertConfig, len: usize) -> u64 {
    estimate_training_memory_with(LayerKernels::FusedCpu, c, 1, len, 0).activations
}

/// The GradCache mini-batch (texts per forward pass) that keeps a batch of `texts` texts within
/// `budget` bytes of activations, or `None` when the whole batch fits.
pub fn mini_batch_within(texts: usize, per_text: u64, budget: u64) -> Option<usize> {
    if per_text == 0 || (texts as u64).saturating_mul(per_text) <= budget {
        return None;
    }
    Some(((budget / per_text) as usize).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm() -> BertConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
            "num_attention_heads": 12, "intermediate_size": 1536,
            "max_position_embeddings": 512
        }))
        .unwrap()
    }

    #[test]
    fn the_estimate_covers_what_was_measured() {
        let per = activation_bytes_per_text(&minilm(), 256);
        // Measured: ~90 MB per 256-token text; the estimate may be above, not far below.
        assert!((85_000_000..130_000_000).contains(&per), "{per}");
        // Attention grows with the square of the length.
        assert!(activation_bytes_per_text(&minilm(), 128) < per / 2);
    }

    #[test]
    fn only_a_batch_over_budget_is_cached() {
        let per = 100;
        assert_eq!(mini_batch_within(224, per, 22_400), None);
        assert_eq!(mini_batch_within(224, per, 10_000), Some(100));
        assert_eq!(mini_batch_within(224, per, 50), Some(1));
    }
}
