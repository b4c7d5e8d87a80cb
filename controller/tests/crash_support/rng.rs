//! A small seeded generator (SplitMix64): the same seed gives the same campaign on every
//! machine and every version of every crate.

/// SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The seed of run `run` of a campaign seeded with `seed` (each run can be replayed alone).
    pub fn run_seed(seed: u64, run: u64) -> u64 {
        Rng::new(seed ^ run.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A seed from the environment (`VIRTKUBE_CRASH_SEED`, decimal or 0x-hex) or from the clock.
pub fn seed_from_env() -> u64 {
    if let Ok(text) = std::env::var("VIRTKUBE_CRASH_SEED") {
        let text = text.trim();
        let parsed = match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse(),
        };
        if let Ok(seed) = parsed {
            return seed;
        }
        panic!("VIRTKUBE_CRASH_SEED={text:?} is not a number");
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}
