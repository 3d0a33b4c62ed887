//! Input limits, checked before anything of the declared size is allocated.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest safetensors file accepted (adapter or one base shard).
    pub max_file_bytes: u64,
    /// Largest safetensors JSON header accepted.
    pub max_header_bytes: u64,
    /// Largest JSON document accepted: `adapter_config.json`, a policy file.
    pub max_config_bytes: u64,
    /// Largest LoRA rank accepted.
    pub max_rank: usize,
    /// Largest matrix dimension (rows or columns) accepted.
    pub max_dim: usize,
    /// Largest Frobenius norm of a base tensor, and of a LoRA update (bounded by
    /// `|scale|·‖B‖·‖A‖`), accepted. Finite entries can still overflow the f32 arithmetic of
    /// the screen (squared singular values pass f32's 3.4e38 above a norm of ~1.8e19); real
    /// weights have norms of 1 to 1e4.
    pub max_norm: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // A 70B-parameter shard in bf16 is ~5-10 GB; whole f32 files of 13B are ~52 GB.
            max_file_bytes: 256 << 30,
            // Real headers are a few hundred KB even for 1000-tensor shards.
            max_header_bytes: 64 << 20,
            max_config_bytes: 1 << 20,
            max_rank: 4096,
            // Largest dims in the field are vocabularies (~256k); matrices we screen are far smaller.
            max_dim: 1 << 20,
            // Six orders of magnitude of headroom below f32's overflow for sums of products.
            max_norm: 1e13,
        }
    }
}

/// Most worker threads a gate accepts (`Config::threads`): four per core the machine reports, at
/// least 16. The work is CPU-bound, so threads beyond the cores only add scheduling (1,000 turn
/// a 20 ms scan into seconds), and a pool of thousands can fail to start.
pub fn max_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (4 * cores).max(16)
}
