//! Every tuning constant of the Brand solve in one place, with its default and the reason for it
//! (faer-style explicit parameters: the solver stages read these, never constants of their own).

/// Parameters of the core solve ([`super::brand::solve`] and [`super::krylov::top_triplets`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SolverParams {
    /// Residual tolerance relative to σ₁: every returned triplet meets `‖K y − σ x‖ ≤ tol·σ₁`.
    /// Default 1e-9 (`Config::krylov_tolerance`).
    pub tol: f64,
    /// Largest Krylov basis (columns) before the dense fallback. Default 400; the gate uses
    /// `40 · clamp(top_k, 2, 16)`.
    pub max_dim: usize,
    /// Seed of the random start block (used only without a start block).
    pub seed: u64,
    /// Jacobi–Davidson rounds on the k+1 Ritz vectors alone before the basis grows. Default 3:
    /// the first round converges most pairs, a second finishes the one left just short.
    pub polish_rounds: usize,
    /// A Ritz pair whose residual is below this (relative to σ₁) takes a shift-inverse step.
    /// Default 1e-3: measured on the MiniLM fixtures it beat 1e-1, 1e-2 and 1e-4.
    pub shift_invert_below: f64,
    /// Above this adapter rank the Woodbury shift-inverse (a 2r×rows×2r product per shift) costs
    /// more than the Rayleigh–Ritz steps it saves. Default 32.
    pub max_shift_invert_rank: usize,
    /// Top base directions in the start block beyond the wanted count. Default 8.
    pub start_extra: usize,
    /// A factor's residual outside the base span below this fraction of its norm is treated as
    /// empty (the base spans it). Default 1e-7, about f32 round-off.
    pub residual_drop: f64,
}

impl Default for SolverParams {
    fn default() -> Self {
        SolverParams {
            tol: 1e-9,
            max_dim: 400,
            seed: 0x1A7E_5EED,
            polish_rounds: 3,
            shift_invert_below: 1e-3,
            max_shift_invert_rank: 32,
            start_extra: 8,
            residual_drop: 1e-7,
        }
    }
}

impl SolverParams {
    /// The gate's parameters for a screening of the top `top_k` at tolerance `tol`.
    pub fn for_screening(top_k: usize, tol: f64) -> Self {
        SolverParams {
            tol,
            max_dim: 40 * top_k.clamp(2, 16),
            ..SolverParams::default()
        }
    }
}
