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
        }
    }
}
