//! A small deterministic random number generator (SplitMix64), so shuffles, augmentations and
//! generated data depend only on the seed, never on a crate's version or on thread scheduling.

/// SplitMix64 (Steele, Lea, Flood 2014): 64-bit state, full period, good enough statistical
/// quality for shuffles and image synthesis.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

/// Mixes a seed with a stream of identifiers into one well-scrambled seed, so that
/// `derive(seed, &[split, index])` gives independent generators per item.
pub fn derive(seed: u64, ids: &[u64]) -> u64 {
    let mut r = Rng::new(seed);
    let mut h = r.next_u64();
    for &id in ids {
        r.state ^= id.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ h;
        h = r.next_u64();
    }
    h
}

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// A generator for item `ids` of the stream seeded by `seed`.
    pub fn for_item(seed: u64, ids: &[u64]) -> Self {
        Rng::new(derive(seed, ids))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    /// Uniform integer in [0, n), without modulo bias (Lemire's method). Panics if `n == 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform integer in [lo, hi] (inclusive).
    pub fn range_inclusive(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below((hi - lo) as u64 + 1) as u32
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// Standard normal draw (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.f64();
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// The generator of one sample's random draws: a function of (seed, epoch, position in the
/// epoch's global order) only, so the bytes of a batch do not depend on which thread, or how
/// many, produced it.
pub fn sample_rng(seed: u64, epoch: u64, position: u64) -> Rng {
    Rng::for_item(seed, &[0x5341_4d50, epoch, position])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_range() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let x = a.below(10);
            assert!(x < 10);
            b.below(10);
            let f = a.f64();
            assert!((0.0..1.0).contains(&f));
            b.f64();
        }
        assert_ne!(derive(1, &[0, 1]), derive(1, &[1, 0]));
        let mut v: Vec<u32> = (0..100).collect();
        Rng::new(3).shuffle(&mut v);
        let mut s = v.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_ne!(v, s);
    }
}
