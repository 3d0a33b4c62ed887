//! LoRA adapters: PEFT directories on disk, or modules a host hands over in memory.
//! Everything here is validated before any maths runs on it.

pub mod config;
mod load;
mod write;

pub use config::AdapterConfig;
pub use load::{load_peft_dir, ModuleShape, PeftDir};
pub use write::{write_peft_dir, TOOL};

use crate::bail;
use crate::error::Result;
use crate::limits::Limits;
use crate::tensor::DType;
use rayon::prelude::*;
use std::path::PathBuf;

/// One adapted matrix: ΔW = scale · B · A.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// Module path, `base_model.model.` stripped, no `.lora_A.weight`.
    pub name: String,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// `[rank, in]`, row-major.
    pub a: Vec<f32>,
    /// `[out, rank]`, row-major.
    pub b: Vec<f32>,
    pub alpha: f64,
    pub scale: f64,
    /// Stored dtype of A and B.
    pub dtype: DType,
    /// DoRA's magnitude vector `m` (out_features long): the module's weight is then
    /// `m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row` (PEFT's `lora_magnitude_vector`). `None` for LoRA.
    pub magnitude: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct Adapter {
    /// The directory's name, or the host's name for it.
    pub name: String,
    pub path: Option<PathBuf>,
    pub config: Option<AdapterConfig>,
    /// Sorted by name.
    pub modules: Vec<LoraModule>,
    /// Base weights are stored `[in, out]`; the screen transposes them.
    pub fan_in_fan_out: bool,
    /// Tensor keys in the weights file that are not LoRA A/B pairs and so are not screened.
    pub not_screened: Vec<String>,
}

impl Adapter {
    /// For in-memory adapters built by a host (no config file); runs the same validation as
    /// [`load_peft_dir`].
    pub fn from_modules(name: &str, modules: Vec<LoraModule>, limits: &Limits) -> Result<Self> {
        let adapter = Adapter {
            name: name.to_string(),
            path: None,
            config: None,
            modules,
            fan_in_fan_out: false,
            not_screened: Vec::new(),
        };
        adapter.validate(limits)
    }

    /// Checks every module, sorts them and refuses empty or repeated ones.
    fn validate(mut self, limits: &Limits) -> Result<Self> {
        if self.modules.is_empty() {
            bail!(
                BaseMismatch,
                "adapter {} has no LoRA modules: it touches no base tensor",
                self.name
            );
        }
        // Each module's finiteness and norm pass over its factors, in parallel where a pool is at
        // hand; the first error in module order is the one returned.
        let checked = map_in_pool(&self.modules, |m| validate_module(m, limits));
        if let Some(e) = checked.into_iter().find_map(Result::err) {
            return Err(e.context(format!("adapter {}", self.name)));
        }
        self.modules.sort_by(|x, y| x.name.cmp(&y.name));
        if let Some(w) = self.modules.windows(2).find(|w| w[0].name == w[1].name) {
            bail!(
                Format,
                "adapter {}: module {} appears more than once",
                self.name,
                w[0].name
            );
        }
        Ok(self)
    }
}

/// `f` over `items`, results in order: in parallel when called from inside a rayon pool (the
/// gate's, which loads adapters on it), serially otherwise, so that loading an adapter from a
/// host's own thread (`ig_adapter_load`, a direct [`load_peft_dir`]) never starts rayon's global
/// pool behind the host's back.
fn map_in_pool<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync + Send) -> Vec<R> {
    if rayon::current_thread_index().is_some() {
        items.par_iter().map(f).collect()
    } else {
        items.iter().map(f).collect()
    }
}

/// `‖v‖₂` accumulated in f64, which no f32 input overflows, with eight partial sums: one chain of
/// dependent additions was most of an adapter's load, which runs before the parallel screening.
fn frobenius(v: &[f32]) -> f64 {
    let chunks = v.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| f64::from(x).powi(2))
        .sum();
    let mut acc = [0.0f64; 8];
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f64::from(x) * f64::from(x);
        }
    }
    (acc.iter().sum::<f64>() + tail).sqrt()
}

/// Rank, limits, buffer sizes and finiteness of one module.
pub fn validate_module(m: &LoraModule, limits: &Limits) -> Result<()> {
    let name = &m.name;
    if m.rank == 0 {
        bail!(
            Shape,
            "module {name}: rank 0; a LoRA rank must be at least 1"
        );
    }
    if m.rank > limits.max_rank {
        bail!(
            Limit,
            "module {name}: rank {} is over the limit of {} (max_rank)",
            m.rank,
            limits.max_rank
        );
    }
    for (what, d) in [
        ("in_features", m.in_features),
        ("out_features", m.out_features),
    ] {
        if d == 0 {
            bail!(Shape, "module {name}: {what} is 0");
        }
        if d > limits.max_dim {
            bail!(
                Limit,
                "module {name}: {what} {d} is over the limit of {} (max_dim)",
                limits.max_dim
            );
        }
    }
    // Both products are bounded by max_rank · max_dim, far from overflow.
    if m.a.len() != m.rank * m.in_features {
        bail!(
            Shape,
            "module {name}: lora_A holds {} values, expected rank {} × in_features {}",
            m.a.len(),
            m.rank,
            m.in_features
        );
    }
    if m.b.len() != m.out_features * m.rank {
        bail!(
            Shape,
            "module {name}: lora_B holds {} values, expected out_features {} × rank {}",
            m.b.len(),
            m.out_features,
            m.rank
        );
    }
    for (what, values, cols) in [("lora_A", &m.a, m.in_features), ("lora_B", &m.b, m.rank)] {
        // A fold first (it vectorises; `position` stops early and does not), then the place.
        if !values.iter().fold(true, |ok, v| ok & v.is_finite()) {
            let i = values
                .iter()
                .position(|v| !v.is_finite())
                .expect("a non-finite value");
            bail!(
                NonFinite,
                "module {name}: {what} has non-finite value {} at (row {}, col {})",
                values[i],
                i / cols,
                i % cols
            );
        }
    }
    if let Some(mag) = &m.magnitude {
        if mag.len() != m.out_features {
            bail!(
                Shape,
                "module {name}: lora_magnitude_vector holds {} values, expected out_features {}",
                mag.len(),
                m.out_features
            );
        }
        if let Some(i) = mag.iter().position(|v| !v.is_finite()) {
            bail!(
                NonFinite,
                "module {name}: lora_magnitude_vector has non-finite value {} at {i}",
                mag[i]
            );
        }
    }
    if !m.scale.is_finite() || !m.alpha.is_finite() {
        bail!(
            NonFinite,
            "module {name}: alpha {} and scale {} must be finite",
            m.alpha,
            m.scale
        );
    }
    // ‖s·B·A‖_F ≤ |s|·‖B‖_F·‖A‖_F, in f64 so the bound itself cannot overflow first.
    let bound = m.scale.abs() * frobenius(&m.a) * frobenius(&m.b);
    if bound.is_nan() || bound > limits.max_norm {
        bail!(
            Limit,
            "module {name}: the update scale·B·A (scale {}) may reach a norm of {bound:.3e}, over the limit of {:e} (max_norm): values this large overflow the screen's f32 arithmetic",
            m.scale,
            limits.max_norm
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(rank: usize, out: usize, inn: usize) -> LoraModule {
        LoraModule {
            name: "m".into(),
            rank,
            in_features: inn,
            out_features: out,
            a: (0..rank * inn)
                .map(|i| (i % 13) as f32 * 0.1 - 0.6)
                .collect(),
            b: (0..out * rank)
                .map(|i| (i % 7) as f32 * 0.2 - 0.5)
                .collect(),
            alpha: 1.0,
            scale: 1.0,
            dtype: DType::F32,
            magnitude: None,
        }
    }

    #[test]
    fn frobenius_matches_a_plain_f64_sum_at_every_length() {
        for n in [0, 1, 7, 8, 9, 63, 1000] {
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
            let plain = v
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt();
            assert!((frobenius(&v) - plain).abs() <= 1e-14 * plain, "n = {n}");
        }
    }

    #[test]
    fn a_non_finite_factor_value_is_named_by_its_row_and_column() {
        let limits = Limits::default();
        let mut m = module(3, 10, 6);
        assert!(validate_module(&m, &limits).is_ok());
        m.b[3 * 4 + 2] = f32::INFINITY;
        m.b[3 * 6] = f32::NAN;
        let e = validate_module(&m, &limits).unwrap_err().to_string();
        assert!(
            e.contains("lora_B has non-finite value inf at (row 4, col 2)"),
            "{e}"
        );
    }
}
