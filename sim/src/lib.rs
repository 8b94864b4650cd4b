//! sim: tally's deterministic-simulation test bench (DESIGN.md §6).
//!
//! The simulation runs real tally nodes (real redb store, real group-commit writer, real
//! chitchat gossip, the real axum router) on turmoil hosts. It lives in this package's
//! integration test (`tests/sim/`), because turmoil switches on tokio's `test-util` and
//! must stay a dev-dependency. This library holds only what needs no turmoil: how seeds
//! are chosen and the small RNG that turns a seed into a concrete scenario (the black-box
//! tests in `tests/` use the same RNG).
//!
//! Running it:
//! - `cargo test -p sim` runs every scenario under the fixed CI seeds ([`CI_SEEDS`] each).
//! - `TALLY_SIM_SEED=<seed> cargo test -p sim --test sim <scenario>` reruns one seed.
//! - `TALLY_SIM_SEEDS=<n>` runs `n` seeds per scenario (a soak; the first [`CI_SEEDS`] are
//!   the CI ones).
//! - `cargo test --release -p sim --test sim big_fleet_convergence -- --ignored` runs the 25-node,
//!   10 000-limit convergence goal.

/// Seeds per scenario in the default (CI) run.
pub const CI_SEEDS: usize = 32;

/// SplitMix64: tiny, fast, good enough to pick faults; every choice a scenario makes comes
/// from one of these, seeded from the run's seed, so a seed names one concrete scenario.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng::from_state(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    /// The generator whose state is `state` as is (`new` first scrambles its seed); the
    /// black-box tests seed it this way.
    pub const fn from_state(state: u64) -> Rng {
        Rng(state)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "range({lo}, {hi})");
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// FNV-1a, to derive a scenario's fixed seeds from its name.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The `i`-th fixed seed of a scenario: the same on every machine and every run.
pub fn fixed_seed(scenario: &str, i: usize) -> u64 {
    let mut r = Rng::new(fnv(scenario) ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    r.next_u64()
}

/// Which seeds to run for a scenario, from the environment:
/// `TALLY_SIM_SEED` (one seed, decimal or 0x-hex) wins over `TALLY_SIM_SEEDS` (a count),
/// and without either the [`CI_SEEDS`] fixed seeds run.
pub fn seeds(scenario: &str) -> Result<Vec<u64>, String> {
    if let Ok(s) = std::env::var("TALLY_SIM_SEED") {
        return parse_seed(&s).map(|s| vec![s]);
    }
    let n = match std::env::var("TALLY_SIM_SEEDS") {
        Ok(n) => n
            .trim()
            .parse::<usize>()
            .map_err(|e| format!("TALLY_SIM_SEEDS={n:?} is not a count: {e}"))?,
        Err(_) => CI_SEEDS,
    };
    Ok((0..n).map(|i| fixed_seed(scenario, i)).collect())
}

pub fn parse_seed(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("TALLY_SIM_SEED={s:?} is not a u64: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_seeds_are_stable_and_distinct() {
        let a: Vec<u64> = (0..CI_SEEDS)
            .map(|i| fixed_seed("split_brain", i))
            .collect();
        let b: Vec<u64> = (0..CI_SEEDS)
            .map(|i| fixed_seed("split_brain", i))
            .collect();
        assert_eq!(a, b);
        let mut d = a.clone();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), a.len());
        assert_ne!(fixed_seed("split_brain", 0), fixed_seed("flaky_links", 0));
    }

    #[test]
    fn rng_ranges() {
        let mut r = Rng::new(7);
        for _ in 0..1000 {
            let v = r.range(3, 5);
            assert!((3..=5).contains(&v));
        }
        assert_eq!(parse_seed("0x10"), Ok(16));
        assert_eq!(parse_seed("16"), Ok(16));
    }
}
