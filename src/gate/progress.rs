//! What `index` tells its caller: one line per finished tensor, and a summary.

use crate::spectrum::cache::Source;

/// One tensor finished by `index`.
pub struct IndexProgress<'a> {
    /// Tensors finished so far, this one included.
    pub done: usize,
    pub total: usize,
    pub name: &'a str,
    pub shape: [usize; 2],
    pub source: Source,
    pub elapsed_s: f64,
}

impl IndexProgress<'_> {
    /// Seconds left at the average pace so far.
    pub fn eta_s(&self) -> f64 {
        self.elapsed_s / self.done as f64 * (self.total - self.done) as f64
    }
}

impl std::fmt::Display for IndexProgress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}/{}] {} [{}x{}] {} ({:.1}s elapsed, ETA {:.0}s)",
            self.done,
            self.total,
            self.name,
            self.shape[0],
            self.shape[1],
            self.source.label(),
            self.elapsed_s,
            self.eta_s()
        )
    }
}

/// What `index` did.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexSummary {
    pub tensors: usize,
    pub computed: usize,
    pub already_cached: usize,
    pub seconds: f64,
}

impl std::fmt::Display for IndexSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "indexed {} tensors: {} computed, {} already cached, in {:.1}s",
            self.tensors, self.computed, self.already_cached, self.seconds
        )
    }
}
