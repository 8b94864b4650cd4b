//! The load tool's latency histogram: an HdrHistogram (crate `hdrhistogram`) with one fixed
//! configuration, plus the exact count, sum, min and max.
//!
//! Values are nanoseconds. Below 256 ns every value has its own bucket; above, each power
//! of two `[2^e, 2^(e+1))` is split into 128 equal buckets (two significant digits), so a
//! bucket's width is at most 1/128 (0.78%) of its lowest value. That is the relative
//! precision of every reported percentile, from 1 µs up to [`VALUE_MAX_NS`] (10 s); larger
//! values are clamped into the last bucket (the exact maximum is still kept). It is small
//! enough (~28 KiB) that every connection owns one and the hot path never shares a cache
//! line.

/// The largest value with its own bucket: 10 s in nanoseconds.
pub const VALUE_MAX_NS: u64 = 10_000_000_000;

/// Significant decimal digits of every bucket (HdrHistogram's precision parameter).
const SIGNIFICANT_DIGITS: u8 = 2;

/// Counts of nanosecond values in log-linear buckets, plus the exact count, sum, min, max.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    buckets: hdrhistogram::Histogram<u64>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            buckets: hdrhistogram::Histogram::new_with_bounds(1, VALUE_MAX_NS, SIGNIFICANT_DIGITS)
                .expect("valid fixed bounds"),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    pub fn record(&mut self, value_ns: u64) {
        self.buckets.saturating_record(value_ns.min(VALUE_MAX_NS));
        self.count += 1;
        self.sum += u128::from(value_ns);
        self.min = self.min.min(value_ns);
        self.max = self.max.max(value_ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        self.buckets
            .add(&other.buckets)
            .expect("histograms of one configuration");
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The exact largest value recorded, 0 when empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The exact mean, 0 when empty.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.sum as f64 / self.count as f64
    }

    /// The value at `percentile` (0–100, to four decimals: 99.99 is fine): the smallest
    /// recorded value `v` such that at least that share of values are ≤ `v`, reported as the
    /// highest value of its bucket (never below the truth, at most 0.78% above it) and
    /// clamped to the exact min and max; p100 is the exact max. 0 when empty.
    pub fn percentile(&self, percentile: f64) -> u64 {
        assert!(
            (0.0..=100.0).contains(&percentile),
            "percentile {percentile} out of 0..=100"
        );
        if self.count == 0 {
            return 0;
        }
        // Integer rank so that p99.9 of 1000 values is exactly the 999th, with no float
        // rounding in the comparison (HdrHistogram's `value_at_quantile` multiplies floats).
        let per_million = (percentile * 10_000.0).round() as u128;
        let rank = (u128::from(self.count) * per_million)
            .div_ceil(1_000_000)
            .max(1);
        if rank >= u128::from(self.count) {
            // The last value is the max, known exactly even beyond VALUE_MAX_NS.
            return self.max;
        }
        let mut seen: u128 = 0;
        for bucket in self.buckets.iter_recorded() {
            seen += u128::from(bucket.count_at_value());
            if seen >= rank {
                return bucket.value_iterated_to().clamp(self.min, self.max);
            }
        }
        unreachable!("rank {rank} ≤ count {} yet not reached", self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(values: &[u64], expected: &[(f64, u64)]) {
        let mut histogram = Histogram::new();
        for &value in values {
            histogram.record(value);
        }
        for &(percentile, want) in expected {
            assert_eq!(
                histogram.percentile(percentile),
                want,
                "p{percentile} of {} values",
                values.len()
            );
        }
    }

    #[test]
    fn buckets_are_tight_up_to_the_max() {
        let buckets = Histogram::new().buckets;
        let mut value = 1u64;
        while value <= VALUE_MAX_NS {
            let (low, high) = (
                buckets.lowest_equivalent(value),
                buckets.highest_equivalent(value),
            );
            assert!(low <= value && value <= high);
            // Relative width below 1%; exact below 256 ns.
            assert!(
                (high - low) * 128 <= low.max(1),
                "bucket of {value} too wide"
            );
            if value < 256 {
                assert_eq!(low, high);
            }
            value = value * 3 / 2 + 1;
        }
        assert!(buckets.high() >= VALUE_MAX_NS);
    }

    #[test]
    fn exact_percentiles_on_small_values() {
        // 1..=100: every value has its own bucket.
        let values: Vec<u64> = (1..=100).collect();
        check(
            &values,
            &[
                (0.0, 1),
                (1.0, 1),
                (50.0, 50),
                (90.0, 90),
                (99.0, 99),
                (99.9, 100),
                (100.0, 100),
            ],
        );
    }

    #[test]
    fn exact_ranks_on_a_thousand_values() {
        // Each of 1..=100 (one bucket per value) appears 10 times. p99 is rank 990, the
        // last 99; p99.9 is rank 999, a 100; p0.1 is rank 1, a 1.
        let values: Vec<u64> = (0..1000).map(|i| i % 100 + 1).collect();
        check(&values, &[(50.0, 50), (99.0, 99), (99.9, 100), (0.1, 1)]);
    }

    #[test]
    fn bucket_lows_are_exact_and_percentiles_never_underreport() {
        // Microsecond-scale values that are bucket lower bounds come back as their bucket's
        // high, clamped to the max recorded.
        let value = 1_000_000; // 1 ms
        check(&[value; 10], &[(50.0, value), (100.0, value)]);

        let mut histogram = Histogram::new();
        for value in [1_000u64, 2_000, 3_000, 50_000, 1_234_567, 9_999_999_999] {
            histogram.record(value);
        }
        for (percentile, truth) in [(10.0, 1_000u64), (50.0, 3_000), (70.0, 1_234_567)] {
            let got = histogram.percentile(percentile);
            assert!(got >= truth, "p{percentile}: {got} < {truth}");
            assert!(
                (got - truth) * 100 <= truth,
                "p{percentile}: {got} vs {truth}"
            );
        }
        assert_eq!(histogram.percentile(100.0), 9_999_999_999);
        assert_eq!(histogram.max(), 9_999_999_999);
    }

    #[test]
    fn values_beyond_the_range_are_clamped_but_max_is_exact() {
        check(&[5, 60_000_000_000], &[(50.0, 5), (100.0, 60_000_000_000)]);
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let mut left = Histogram::new();
        let mut right = Histogram::new();
        let mut all = Histogram::new();
        for value in 0..5_000u64 {
            let value = value * 977 % 3_000_000;
            if value % 3 == 0 {
                left.record(value);
            } else {
                right.record(value);
            }
            all.record(value);
        }
        left.merge(&right);
        assert_eq!(left, all);
        assert_eq!(left.count(), 5_000);
    }

    #[test]
    fn empty_histogram_reports_zero() {
        let histogram = Histogram::new();
        assert_eq!(histogram.percentile(99.0), 0);
        assert_eq!(histogram.max(), 0);
        assert_eq!(histogram.mean(), 0.0);
        let mut merged = Histogram::new();
        merged.merge(&histogram);
        assert_eq!(merged, histogram);
    }

    #[test]
    fn mean_is_exact() {
        let mut histogram = Histogram::new();
        for value in [1_000u64, 2_000, 6_000] {
            histogram.record(value);
        }
        assert_eq!(histogram.mean(), 3_000.0);
    }
}
