//! The decisions of the randomized rank-revealing sketch (HMT's adaptive range finder), apart
//! from the arithmetic that feeds them, so the CPU solver (`spectrum::randomized::low_rank`) and
//! the device one (`cuda::sketch`) take the same decisions on the same numbers: how many columns
//! each round sketches, when the cancelling estimate of the tail is replaced by the explicit
//! residual, when the sketch has captured the operator, the two early refusals, and the final
//! truncation of the revealed rank.

use super::SketchParams;

/// What the sketch does after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing of the operator is left outside the sketch but the threshold's worth (or the
    /// sketch stopped growing: the operator lies in its span): reveal the rank.
    Reveal,
    /// More directions than `max_rank` are needed (or, by the early estimates, would be).
    NotLowRank,
    /// Sketch another round.
    Continue,
}

/// The rules of one sketch of a rows × cols operator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SketchRule {
    /// `‖op‖_F²`.
    pub total: f64,
    pub threshold2: f64,
    pub floor: f64,
    pub max_rank: usize,
    pub first_block: usize,
    /// Most sketch columns: `min(max_rank + oversampling, min(rows, cols))`.
    pub cap: usize,
}

impl SketchRule {
    pub fn new(rows: usize, cols: usize, p: &SketchParams) -> SketchRule {
        SketchRule {
            total: p.frobenius * p.frobenius,
            threshold2: p.threshold * p.threshold,
            floor: p.floor,
            max_rank: p.max_rank,
            first_block: p.first_block,
            cap: p
                .max_rank
                .saturating_add(p.oversampling)
                .min(rows.min(cols)),
        }
    }

    /// Columns of the next round's sketch with `m` captured: the first block, then doubling, up
    /// to the cap. 0 means the cap is reached (the operator is not of low rank).
    pub fn take(&self, m: usize) -> usize {
        if m == 0 { self.first_block } else { m }.min(self.cap - m)
    }

    /// `‖op‖² − captured`, never below 0.
    pub fn tail2(&self, captured: f64) -> f64 {
        (self.total - captured).max(0.0)
    }

    /// `‖op‖² − ‖Qᵀop‖²` cancels: when it gets near the threshold (f32 storage rounding can be
    /// 1e-13 of ‖ΔW‖²), or when the sketch stopped growing, the decision is taken on the
    /// residual itself, formed explicitly.
    pub fn wants_explicit(&self, tail2: f64, added: usize, take: usize) -> bool {
        tail2 <= 1e-6 * self.total || added < take
    }

    /// After a round that added `added` of `take` columns (`m` in all now), captured
    /// `gained` more of `‖op‖²` and left `tail2` outside; `s4` computes Hutchinson's estimate
    /// of `Σσ⁴` on the first round's sketch (`E‖opᵀ op ω‖² = Σσ⁴`), called only when it
    /// decides.
    pub fn step<X>(&self, round: Round, s4: impl FnOnce() -> Result<f64, X>) -> Result<Step, X> {
        let Round {
            m,
            added,
            take,
            gained,
            tail2,
            first,
        } = round;
        if tail2 <= self.threshold2 || added < take {
            return Ok(Step::Reveal);
        }
        if first {
            // The effective rank ‖op‖_F⁴ / Σσ⁴ is more than twice max_rank.
            let s4 = s4()?;
            if s4 > 0.0 && self.total * self.total / s4 > 2.0 * self.max_rank as f64 {
                return Ok(Step::NotLowRank);
            }
        }
        // The energy still outside exceeds twice what the directions left could hold at the
        // rate the last round captured.
        let rate = gained / added as f64;
        let room = self.max_rank.saturating_sub(m) as f64;
        if tail2 - self.threshold2 > 2.0 * room * rate {
            return Ok(Step::NotLowRank);
        }
        Ok(Step::Continue)
    }

    /// The revealed rank from the sketch's singular values `sigma` (descending) with `outside2`
    /// of `‖op‖²` outside the sketch: the smallest rank whose dropped singular values are at
    /// most `floor` each and keep the total residual within the threshold. Returns the rank and
    /// the squared residual of the truncated factorisation.
    pub fn truncate(&self, sigma: &[f64], outside2: f64) -> (usize, f64) {
        let mut dropped = outside2;
        let mut rank = sigma.len();
        while rank > 0
            && sigma[rank - 1] <= self.floor
            && dropped + sigma[rank - 1] * sigma[rank - 1] <= self.threshold2
        {
            rank -= 1;
            dropped += sigma[rank] * sigma[rank];
        }
        (rank, dropped)
    }
}

/// The numbers of one round, for [`SketchRule::step`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Round {
    /// Columns captured after the round.
    pub m: usize,
    pub added: usize,
    pub take: usize,
    pub gained: f64,
    pub tail2: f64,
    /// The first round (Hutchinson's estimate is taken on its sketch).
    pub first: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> SketchRule {
        SketchRule::new(
            100,
            80,
            &SketchParams {
                frobenius: 10.0,
                threshold: 1.0,
                floor: 0.5,
                max_rank: 20,
                first_block: 8,
                oversampling: 4,
                seed: 1,
            },
        )
    }

    #[test]
    fn rounds_double_up_to_the_cap() {
        let r = rule();
        assert_eq!(r.cap, 24);
        let takes: Vec<usize> = [0, 8, 16, 24].iter().map(|&m| r.take(m)).collect();
        assert_eq!(takes, [8, 8, 8, 0]);
    }

    #[test]
    fn steps_and_truncation() {
        let r = rule();
        let round = Round {
            m: 8,
            added: 8,
            take: 8,
            gained: 90.0,
            tail2: 10.0,
            first: true,
        };
        let step = |round, s4: f64| r.step(round, || Ok::<_, ()>(s4)).unwrap();
        assert_eq!(step(round, 1e4), Step::Continue);
        // Effective rank 1e4 / 100 = 100 > 2·20.
        assert_eq!(step(round, 100.0), Step::NotLowRank);
        assert_eq!(
            step(
                Round {
                    tail2: 0.5,
                    ..round
                },
                100.0
            ),
            Step::Reveal
        );
        assert_eq!(step(Round { added: 7, ..round }, 100.0), Step::Reveal);
        // 12 directions left at 0.1 each cannot hold 9 outside.
        let slow = Round {
            gained: 0.8,
            first: false,
            ..round
        };
        assert_eq!(r.step(slow, || Err(())), Ok(Step::NotLowRank));
        // 0.4 and 0.3 dropped (each ≤ floor, 0.25 + 0.16 + 0.09 ≤ 1), 0.6 kept (> floor).
        let (rank, d) = r.truncate(&[3.0, 0.6, 0.4, 0.3], 0.25);
        assert!(rank == 2 && (d - 0.5).abs() < 1e-12, "{rank} {d}");
        // Dropping 0.4 too would exceed the threshold: 0.3 only.
        let (rank, d) = r.truncate(&[3.0, 0.4, 0.3], 0.8);
        assert!(rank == 2 && (d - 0.89).abs() < 1e-12, "{rank} {d}");
        assert_eq!(r.truncate(&[], 0.3), (0, 0.3));
    }
}
