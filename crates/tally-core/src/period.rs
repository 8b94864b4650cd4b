//! Budget periods: parsing `<n><unit>` / `never`, and the window (index, start, end) that
//! contains an instant, for calendar-aligned periods in any IANA zone and for rolling
//! periods from an anchor.
//!
//! The period index is the period's start instant in Unix milliseconds. It is a pure
//! function of (spec, instant), strictly increasing from one period to the next, and needs
//! no per-unit origin, so every node computes the same index for the same event (I5).
//!
//! Aligned sub-day units (s, m, h) follow the local wall clock: a boundary is every instant
//! whose local time is on the unit grid. When clocks go back, a repeated wall-clock boundary
//! is a boundary each time it occurs (each real hour gets its own hourly period); when
//! clocks jump forward over a boundary, the period starts at the transition. Day and longer
//! units start at local midnight (or, where midnight does not exist, when the day begins).
//! Rolling d/w/M/Y periods use calendar arithmetic from the anchor in the limit's zone
//! (Jan 31 + 1M = Feb 28), rolling s/m/h are fixed spans of absolute time.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::{AmbiguousOffset, TimeZone, TimeZoneDatabase};
use jiff::{Span, Timestamp, ToSpan};

/// A period unit.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    fn letter(self) -> char {
        match self {
            Unit::Second => 's',
            Unit::Minute => 'm',
            Unit::Hour => 'h',
            Unit::Day => 'd',
            Unit::Week => 'w',
            Unit::Month => 'M',
            Unit::Year => 'Y',
        }
    }

    /// The largest count accepted: about a century of this unit.
    fn count_max(self) -> u32 {
        match self {
            Unit::Second => 3_155_760_000,
            Unit::Minute => 52_596_000,
            Unit::Hour => 876_600,
            Unit::Day => 36_525,
            Unit::Week => 5_218,
            Unit::Month => 1_200,
            Unit::Year => 100,
        }
    }

    fn is_sub_day(self) -> bool {
        matches!(self, Unit::Second | Unit::Minute | Unit::Hour)
    }

    fn fixed_ms(self) -> Option<i64> {
        match self {
            Unit::Second => Some(1_000),
            Unit::Minute => Some(60_000),
            Unit::Hour => Some(3_600_000),
            _ => None,
        }
    }

    /// Average length, used only to guess a rolling period's index before correcting it.
    fn average_ms(self) -> i64 {
        match self {
            Unit::Second => 1_000,
            Unit::Minute => 60_000,
            Unit::Hour => 3_600_000,
            Unit::Day => 86_400_000,
            Unit::Week => 7 * 86_400_000,
            Unit::Month => 2_629_746_000,
            Unit::Year => 31_556_952_000,
        }
    }

    fn span(self, n: i64) -> Span {
        match self {
            Unit::Second => n.seconds(),
            Unit::Minute => n.minutes(),
            Unit::Hour => n.hours(),
            Unit::Day => n.days(),
            Unit::Week => (n * 7).days(),
            Unit::Month => n.months(),
            Unit::Year => n.years(),
        }
    }
}

/// A period: `never`, or every `n` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Period {
    Never,
    Every { n: u32, unit: Unit },
}

/// Why a period, timezone or alignment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeriodError {
    #[error("period {0:?} is not of the form <n><s|m|h|d|w|M|Y> or never")]
    Syntax(String),
    #[error("period {0:?} must be at least 1 unit long")]
    Zero(String),
    #[error("period {input:?} is too long: at most {max}{unit} is accepted")]
    TooLong { input: String, max: u32, unit: char },
    #[error(
        "calendar-aligned period {input:?} does not divide {whole} evenly; use one of {choices}, or a rolling period"
    )]
    Misaligned {
        input: String,
        whole: &'static str,
        choices: &'static str,
    },
    #[error("unknown timezone {0:?}: use an IANA name such as UTC or Europe/Berlin")]
    UnknownTimezone(String),
}

impl FromStr for Period {
    type Err = PeriodError;

    fn from_str(s: &str) -> Result<Period, PeriodError> {
        if s == "never" {
            return Ok(Period::Never);
        }
        let syntax = || PeriodError::Syntax(s.to_string());
        let unit = match s.chars().last().ok_or_else(syntax)? {
            's' => Unit::Second,
            'm' => Unit::Minute,
            'h' => Unit::Hour,
            'd' => Unit::Day,
            'w' => Unit::Week,
            'M' => Unit::Month,
            'Y' => Unit::Year,
            _ => return Err(syntax()),
        };
        let digits = &s[..s.len() - 1];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let too_long = || PeriodError::TooLong {
            input: s.to_string(),
            max: unit.count_max(),
            unit: unit.letter(),
        };
        let n: u64 = digits.parse().map_err(|_| too_long())?;
        if n == 0 {
            return Err(PeriodError::Zero(s.to_string()));
        }
        if n > u64::from(unit.count_max()) {
            return Err(too_long());
        }
        Ok(Period::Every { n: n as u32, unit })
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Period::Never => f.write_str("never"),
            Period::Every { n, unit } => write!(f, "{n}{}", unit.letter()),
        }
    }
}

/// The time-zone database every node uses: the copy compiled into the binary, never the
/// host's, so two nodes with different system tzdata still agree on boundaries (I5).
fn tzdb() -> &'static TimeZoneDatabase {
    static DB: OnceLock<TimeZoneDatabase> = OnceLock::new();
    DB.get_or_init(TimeZoneDatabase::bundled)
}

/// Looks up an IANA time zone in the bundled database.
pub fn timezone(name: &str) -> Result<TimeZone, PeriodError> {
    if name == "UTC" {
        return Ok(TimeZone::UTC);
    }
    tzdb()
        .get(name)
        .map_err(|_| PeriodError::UnknownTimezone(name.to_string()))
}

/// One period of a limit: `[start_ms, end_ms)`. `index == start_ms`; a `never` period has
/// `end_ms == i64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub index: i64,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Window {
    pub fn contains(&self, t_ms: i64) -> bool {
        self.start_ms <= t_ms && t_ms < self.end_ms
    }
}

/// Everything that decides a limit's windows.
#[derive(Debug, Clone)]
pub struct PeriodSpec {
    period: Period,
    aligned: bool,
    tz: TimeZone,
    anchor_ms: i64,
}

/// The start of a `never` period. Any fixed value works; this one is readable.
const NEVER_START_MS: i64 = 0;

impl PeriodSpec {
    /// Builds a spec, refusing aligned periods that do not tile their calendar unit.
    pub fn new(
        period: Period,
        aligned: bool,
        timezone_name: &str,
        anchor_ms: i64,
    ) -> Result<PeriodSpec, PeriodError> {
        let tz = timezone(timezone_name)?;
        if let (true, Period::Every { n, unit }) = (aligned, period) {
            let (whole, choices, divides) = match unit {
                Unit::Second => ("a minute", "1s 2s 3s 4s 5s 6s 10s 12s 15s 20s 30s 60s", 60),
                Unit::Minute => ("an hour", "1m 2m 3m 4m 5m 6m 10m 12m 15m 20m 30m 60m", 60),
                Unit::Hour => ("a day", "1h 2h 3h 4h 6h 8h 12h 24h", 24),
                Unit::Month => ("a year", "1M 2M 3M 4M 6M 12M", 12),
                Unit::Day | Unit::Week | Unit::Year => ("", "", 0),
            };
            if divides != 0 && divides % n != 0 {
                return Err(PeriodError::Misaligned {
                    input: period.to_string(),
                    whole,
                    choices,
                });
            }
        }
        Ok(PeriodSpec {
            period,
            aligned,
            tz,
            anchor_ms,
        })
    }

    pub fn period(&self) -> Period {
        self.period
    }

    /// The window that contains `t_ms`.
    pub fn window(&self, t_ms: i64) -> Window {
        let w = match self.period {
            Period::Never => Window {
                index: NEVER_START_MS,
                start_ms: NEVER_START_MS,
                end_ms: i64::MAX,
            },
            Period::Every { n, unit } if self.aligned => self.aligned_window(t_ms, n, unit),
            Period::Every { n, unit } => self.rolling_window(t_ms, n, unit),
        };
        debug_assert!(
            self.period == Period::Never || w.contains(t_ms),
            "{w:?} must contain {t_ms}"
        );
        w
    }

    fn rolling_window(&self, t_ms: i64, n: u32, unit: Unit) -> Window {
        if let Some(ms) = unit.fixed_ms() {
            let span = ms * i64::from(n);
            let k = (t_ms - self.anchor_ms).div_euclid(span);
            let start = self.anchor_ms + k * span;
            return Window {
                index: start,
                start_ms: start,
                end_ms: start + span,
            };
        }
        let anchor = civil(&self.tz, self.anchor_ms);
        let start_of = |k: i64| -> i64 {
            anchor
                .checked_add(unit.span(k * i64::from(n)))
                .map(|dt| resolve_compatible(&self.tz, dt))
                .unwrap_or(if k < 0 { i64::MIN / 2 } else { i64::MAX / 2 })
        };
        let mut k = (t_ms - self.anchor_ms).div_euclid(unit.average_ms() * i64::from(n));
        // The guess is off by at most one or two periods (month lengths, DST); correct it.
        while start_of(k) > t_ms {
            k -= 1;
        }
        while start_of(k + 1) <= t_ms {
            k += 1;
        }
        let start = start_of(k);
        Window {
            index: start,
            start_ms: start,
            end_ms: start_of(k + 1),
        }
    }

    fn aligned_window(&self, t_ms: i64, n: u32, unit: Unit) -> Window {
        let grid = Grid {
            tz: &self.tz,
            n: i64::from(n),
            unit,
        };
        let mut c = grid.floor(civil(&self.tz, t_ms));
        let mut start = None;
        for _ in 0..8 {
            if let Some(b) = grid
                .boundaries(c)
                .into_iter()
                .flatten()
                .filter(|b| *b <= t_ms)
                .max()
            {
                start = Some(b);
                break;
            }
            c = grid.step(c, -1);
        }
        let mut start = start.expect("a boundary at or before every instant");
        // Where clocks went back across a boundary, a later grid point may already have
        // occurred: the latest boundary at or before t wins.
        for _ in 0..8 {
            let next = grid.step(c, 1);
            match grid
                .boundaries(next)
                .into_iter()
                .flatten()
                .filter(|b| *b <= t_ms)
                .max()
            {
                Some(b) if b > start => {
                    start = b;
                    c = next;
                }
                _ => break,
            }
        }
        let mut end = i64::MAX;
        let mut probe = c;
        for _ in 0..3 {
            for b in grid.boundaries(probe).into_iter().flatten() {
                if b > start && b < end {
                    end = b;
                }
            }
            probe = grid.step(probe, 1);
        }
        // Clocks going back restart the wall-clock grid at an earlier civil time, which
        // walking forward in civil time cannot see: the first grid point at or after the
        // transition may end this window first.
        if let Some(tr) = self.tz.following(timestamp(start)).next() {
            let tt = ms(tr.timestamp());
            if tt < end {
                let mut g = grid.floor(civil(&self.tz, tt));
                for _ in 0..3 {
                    for b in grid.boundaries(g).into_iter().flatten() {
                        if b >= tt && b > start && b < end {
                            end = b;
                        }
                    }
                    g = grid.step(g, 1);
                }
            }
        }
        debug_assert!(end > t_ms && end != i64::MAX);
        Window {
            index: start,
            start_ms: start,
            end_ms: end,
        }
    }
}

fn timestamp(t_ms: i64) -> Timestamp {
    Timestamp::from_millisecond(t_ms).unwrap_or(if t_ms < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    })
}

fn civil(tz: &TimeZone, t_ms: i64) -> DateTime {
    tz.to_datetime(timestamp(t_ms))
}

fn ms(ts: Timestamp) -> i64 {
    ts.as_millisecond()
}

/// The instant of a civil time: the earlier one in a fold, the transition in a gap.
fn resolve_compatible(tz: &TimeZone, dt: DateTime) -> i64 {
    tz.to_ambiguous_timestamp(dt)
        .compatible()
        .map(ms)
        .unwrap_or(i64::MAX / 2)
}

/// The calendar grid of an aligned period: civil grid points and the instants they occur.
struct Grid<'a> {
    tz: &'a TimeZone,
    n: i64,
    unit: Unit,
}

/// 1970-01-01 and the Monday before it: the origins of multi-day and multi-week blocks.
const EPOCH_DATE: Date = jiff::civil::date(1970, 1, 1);
const EPOCH_MONDAY: Date = jiff::civil::date(1969, 12, 29);

impl Grid<'_> {
    /// The latest grid point at or before civil time `dt`.
    fn floor(&self, dt: DateTime) -> DateTime {
        let n = self.n;
        let date = dt.date();
        let day_start = |d: Date| d.to_datetime(Time::midnight());
        match self.unit {
            Unit::Second => {
                let s = i64::from(dt.second());
                date.to_datetime(Time::constant(0, 0, 0, 0))
                    .with()
                    .hour(dt.hour())
                    .minute(dt.minute())
                    .second((s - s % n) as i8)
                    .build()
                    .expect("valid time")
            }
            Unit::Minute => {
                let m = i64::from(dt.minute());
                date.to_datetime(Time::midnight())
                    .with()
                    .hour(dt.hour())
                    .minute((m - m % n) as i8)
                    .build()
                    .expect("valid time")
            }
            Unit::Hour => {
                let h = i64::from(dt.hour());
                date.to_datetime(Time::midnight())
                    .with()
                    .hour((h - h % n) as i8)
                    .build()
                    .expect("valid time")
            }
            Unit::Day => {
                let days = days_between(EPOCH_DATE, date);
                day_start(add_days(EPOCH_DATE, days.div_euclid(n) * n))
            }
            Unit::Week => {
                let days = days_between(EPOCH_MONDAY, date);
                day_start(add_days(EPOCH_MONDAY, days.div_euclid(7 * n) * 7 * n))
            }
            Unit::Month => {
                let m = i64::from(date.month()) - 1;
                let month = (m - m % n + 1) as i8;
                day_start(Date::new(date.year(), month, 1).expect("valid date"))
            }
            Unit::Year => {
                let y = i64::from(date.year());
                let year = y.div_euclid(n) * n;
                let year = year.clamp(-9999, 9999) as i16;
                day_start(Date::new(year, 1, 1).expect("valid date"))
            }
        }
    }

    /// The grid point `k` steps after (or before, when negative) `c`.
    fn step(&self, c: DateTime, k: i64) -> DateTime {
        c.checked_add(self.unit.span(k * self.n)).unwrap_or(c)
    }

    /// The instants at which civil grid point `c` occurs. Sub-day grid points occur twice
    /// in a fold; day-and-longer ones start the day once, at its first occurrence.
    fn boundaries(&self, c: DateTime) -> [Option<i64>; 2] {
        let amb = self.tz.to_ambiguous_timestamp(c);
        match amb.offset() {
            AmbiguousOffset::Fold { .. } if self.unit.is_sub_day() => {
                [amb.earlier().ok().map(ms), amb.later().ok().map(ms)]
            }
            _ => [amb.compatible().ok().map(ms), None],
        }
    }
}

fn days_between(from: Date, to: Date) -> i64 {
    // Dates are within ±10 000 years, so whole days fit comfortably.
    let a = from.to_zoned(TimeZone::UTC).expect("in range").timestamp();
    let b = to.to_zoned(TimeZone::UTC).expect("in range").timestamp();
    (b.as_second() - a.as_second()).div_euclid(86_400)
}

fn add_days(d: Date, days: i64) -> Date {
    d.checked_add(days.days()).unwrap_or(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn iso(ms: i64) -> String {
        Timestamp::from_millisecond(ms).unwrap().to_string()
    }

    #[test]
    fn parse_table() {
        let ok: &[(&str, Period)] = &[
            ("never", Period::Never),
            (
                "1s",
                Period::Every {
                    n: 1,
                    unit: Unit::Second,
                },
            ),
            (
                "15m",
                Period::Every {
                    n: 15,
                    unit: Unit::Minute,
                },
            ),
            (
                "3M",
                Period::Every {
                    n: 3,
                    unit: Unit::Month,
                },
            ),
            (
                "100Y",
                Period::Every {
                    n: 100,
                    unit: Unit::Year,
                },
            ),
        ];
        for (s, p) in ok {
            assert_eq!(s.parse::<Period>().unwrap(), *p);
            assert_eq!(p.to_string(), *s);
        }
        assert_eq!("0d".parse::<Period>(), Err(PeriodError::Zero("0d".into())));
        for bad in ["", "d", "5x", "1.5h", "-1d", " 1d", "1D", "1dd", "Never"] {
            assert_eq!(
                bad.parse::<Period>(),
                Err(PeriodError::Syntax(bad.into())),
                "{bad}"
            );
        }
        for long in ["101Y", "99999999999999999999999Y", "1201M"] {
            assert!(
                matches!(long.parse::<Period>(), Err(PeriodError::TooLong { .. })),
                "{long}"
            );
        }
    }

    #[test]
    fn aligned_must_tile() {
        let p = |s: &str| s.parse::<Period>().unwrap();
        for bad in ["7s", "45s", "7m", "5h", "5M", "7M"] {
            assert!(
                matches!(
                    PeriodSpec::new(p(bad), true, "UTC", 0),
                    Err(PeriodError::Misaligned { .. })
                ),
                "{bad}"
            );
            assert!(
                PeriodSpec::new(p(bad), false, "UTC", 0).is_ok(),
                "{bad} rolling"
            );
        }
        for good in ["1s", "30s", "15m", "6h", "1d", "2w", "3M", "6M", "2Y"] {
            assert!(PeriodSpec::new(p(good), true, "UTC", 0).is_ok(), "{good}");
        }
        assert_eq!(
            PeriodSpec::new(p("1d"), true, "Mars/Olympus", 0).err(),
            Some(PeriodError::UnknownTimezone("Mars/Olympus".into()))
        );
    }

    /// (period, aligned, zone, anchor, instant) → (start, end), exact.
    #[test]
    fn boundary_table() {
        #[rustfmt::skip]
        let cases: &[(&str, bool, &str, &str, &str, &str, &str)] = &[
            // Calendar months of 28, 29, 30 and 31 days.
            ("1M", true, "UTC", "2026-01-01T00:00:00Z", "2026-02-14T12:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"),
            ("1M", true, "UTC", "2026-01-01T00:00:00Z", "2028-02-29T23:59:59Z", "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"),
            ("1M", true, "UTC", "2026-01-01T00:00:00Z", "2026-11-30T23:59:59.999Z", "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"),
            ("1M", true, "UTC", "2026-01-01T00:00:00Z", "2026-12-01T00:00:00Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
            // Quarters and years.
            ("3M", true, "UTC", "2026-01-01T00:00:00Z", "2026-11-22T06:00:00Z", "2026-10-01T00:00:00Z", "2027-01-01T00:00:00Z"),
            ("3M", true, "UTC", "2026-01-01T00:00:00Z", "2026-05-01T00:00:00Z", "2026-04-01T00:00:00Z", "2026-07-01T00:00:00Z"),
            ("1Y", true, "UTC", "2026-01-01T00:00:00Z", "2028-07-01T00:00:00Z", "2028-01-01T00:00:00Z", "2029-01-01T00:00:00Z"),
            // Weeks start on Monday; 2026-11-22 is a Sunday.
            ("1w", true, "UTC", "2026-01-01T00:00:00Z", "2026-11-22T06:00:00Z", "2026-11-16T00:00:00Z", "2026-11-23T00:00:00Z"),
            // Local midnight in New York, before and after DST ends (2026-11-01 06:00Z).
            ("1d", true, "America/New_York", "2026-01-01T00:00:00Z", "2026-11-01T03:59:59Z", "2026-10-31T04:00:00Z", "2026-11-01T04:00:00Z"),
            ("1d", true, "America/New_York", "2026-01-01T00:00:00Z", "2026-11-01T12:00:00Z", "2026-11-01T04:00:00Z", "2026-11-02T05:00:00Z"),
            ("1M", true, "America/New_York", "2026-01-01T00:00:00Z", "2026-11-22T06:00:00Z", "2026-11-01T04:00:00Z", "2026-12-01T05:00:00Z"),
            // DST starts 2026-03-08 07:00Z in New York: the 23-hour day, and the hour after 01:00 EST.
            ("1d", true, "America/New_York", "2026-01-01T00:00:00Z", "2026-03-08T12:00:00Z", "2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z"),
            ("1h", true, "America/New_York", "2026-01-01T00:00:00Z", "2026-03-08T06:30:00Z", "2026-03-08T06:00:00Z", "2026-03-08T07:00:00Z"),
            ("1h", true, "America/New_York", "2026-01-01T00:00:00Z", "2026-03-08T07:00:00Z", "2026-03-08T07:00:00Z", "2026-03-08T08:00:00Z"),
            // DST ends 2026-11-01: 01:00 local occurs twice, each real hour is its own period.
            ("1h", true, "America/New_York", "2026-01-01T00:00:00Z", "2026-11-01T05:30:00Z", "2026-11-01T05:00:00Z", "2026-11-01T06:00:00Z"),
            ("1h", true, "America/New_York", "2026-01-01T00:00:00Z", "2026-11-01T06:30:00Z", "2026-11-01T06:00:00Z", "2026-11-01T07:00:00Z"),
            // Berlin: DST ends 2026-10-25 01:00Z; the 25-hour day.
            ("1d", true, "Europe/Berlin", "2026-01-01T00:00:00Z", "2026-10-25T12:00:00Z", "2026-10-24T22:00:00Z", "2026-10-25T23:00:00Z"),
            ("6h", true, "Europe/Berlin", "2026-01-01T00:00:00Z", "2026-10-25T01:30:00Z", "2026-10-24T22:00:00Z", "2026-10-25T05:00:00Z"),
            // Lord Howe moves by 30 minutes. DST ends 2026-04-05 at 02:00 local (15:00Z) back to 01:30.
            ("1h", true, "Australia/Lord_Howe", "2026-01-01T00:00:00Z", "2026-04-04T15:15:00Z", "2026-04-04T14:00:00Z", "2026-04-04T15:30:00Z"),
            ("30m", true, "Australia/Lord_Howe", "2026-01-01T00:00:00Z", "2026-04-04T14:45:00Z", "2026-04-04T14:30:00Z", "2026-04-04T15:00:00Z"),
            ("30m", true, "Australia/Lord_Howe", "2026-01-01T00:00:00Z", "2026-04-04T15:10:00Z", "2026-04-04T15:00:00Z", "2026-04-04T15:30:00Z"),
            // DST starts 2026-10-04 at 02:00 local (15:30Z) forward to 02:30.
            ("1h", true, "Australia/Lord_Howe", "2026-01-01T00:00:00Z", "2026-10-03T15:45:00Z", "2026-10-03T15:30:00Z", "2026-10-03T16:00:00Z"),
            ("1d", true, "Australia/Lord_Howe", "2026-01-01T00:00:00Z", "2026-10-04T06:00:00Z", "2026-10-03T13:30:00Z", "2026-10-04T13:00:00Z"),
            // Rolling periods from an anchor.
            ("1s", false, "UTC", "2026-11-22T06:00:00.250Z", "2026-11-22T06:00:05.100Z", "2026-11-22T06:00:04.250Z", "2026-11-22T06:00:05.250Z"),
            ("1m", false, "UTC", "2026-11-22T06:00:10Z", "2026-11-22T05:59:00Z", "2026-11-22T05:58:10Z", "2026-11-22T05:59:10Z"),
            ("1M", false, "UTC", "2026-01-31T10:00:00Z", "2026-02-28T10:00:00Z", "2026-02-28T10:00:00Z", "2026-03-31T10:00:00Z"),
            ("1M", false, "UTC", "2026-01-31T10:00:00Z", "2026-03-30T10:00:00Z", "2026-02-28T10:00:00Z", "2026-03-31T10:00:00Z"),
            ("1M", false, "UTC", "2026-01-31T10:00:00Z", "2028-02-29T11:00:00Z", "2028-02-29T10:00:00Z", "2028-03-31T10:00:00Z"),
            // A rolling day keeps its local time of day across DST (10:00 New York).
            ("1d", false, "America/New_York", "2026-10-30T14:00:00Z", "2026-11-02T00:00:00Z", "2026-11-01T15:00:00Z", "2026-11-02T15:00:00Z"),
            ("1d", false, "America/New_York", "2026-10-30T14:00:00Z", "2026-10-31T15:00:00Z", "2026-10-31T14:00:00Z", "2026-11-01T15:00:00Z"),
        ];
        for &(period, aligned, zone, anchor, t, start, end) in cases {
            let spec = PeriodSpec::new(period.parse().unwrap(), aligned, zone, at(anchor)).unwrap();
            let w = spec.window(at(t));
            assert_eq!(
                (iso(w.start_ms), iso(w.end_ms)),
                (iso(at(start)), iso(at(end))),
                "{period} aligned={aligned} {zone} at {t}"
            );
            assert_eq!(w.index, w.start_ms);
        }
    }

    #[test]
    fn never_is_one_window() {
        let spec = PeriodSpec::new(Period::Never, false, "UTC", 123).unwrap();
        assert_eq!(spec.window(0), spec.window(4_000_000_000_000));
        assert_eq!(spec.window(0).end_ms, i64::MAX);
    }
}

#[cfg(test)]
mod tiling {
    use super::*;
    use proptest::prelude::*;

    const ZONES: &[&str] = &[
        "UTC",
        "America/New_York",
        "Europe/Berlin",
        "Australia/Lord_Howe",
        "Asia/Kathmandu",
        "America/Sao_Paulo",
        "Pacific/Chatham",
    ];
    const PERIODS: &[&str] = &[
        "1s", "15s", "1m", "30m", "1h", "2h", "6h", "1d", "2d", "1w", "1M", "3M", "6M", "1Y",
    ];

    proptest! {
        /// Consecutive periods tile time: each window contains its instant, the next window
        /// starts exactly where this one ends, and indices strictly increase (across DST
        /// changes and month ends, aligned and rolling).
        #[test]
        fn windows_tile_time(
            zone in 0..ZONES.len(),
            period in 0..PERIODS.len(),
            aligned in any::<bool>(),
            // 2020..2030, concentrated near DST transitions by sampling whole days too.
            t in 1_577_836_800_000i64..1_893_456_000_000,
            anchor in 1_577_836_800_000i64..1_893_456_000_000,
        ) {
            let spec = PeriodSpec::new(PERIODS[period].parse().unwrap(), aligned, ZONES[zone], anchor).unwrap();
            let w = spec.window(t);
            prop_assert!(w.contains(t), "{:?} must contain {}", w, t);
            let next = spec.window(w.end_ms);
            prop_assert_eq!(next.start_ms, w.end_ms);
            prop_assert!(next.index > w.index);
            let prev = spec.window(w.start_ms - 1);
            prop_assert_eq!(prev.end_ms, w.start_ms);
            prop_assert_eq!(spec.window(w.start_ms), w);
            prop_assert_eq!(spec.window(w.end_ms - 1), w);
        }

    }

    /// Walks 200 consecutive windows across every 2026 transition of the test zones, for
    /// every aligned unit: each window starts where the last ended (folds and gaps).
    #[test]
    fn windows_tile_across_transitions() {
        let from = Timestamp::from_second(1_767_225_600).unwrap(); // 2026-01-01
        for zone in &ZONES[1..] {
            let tz = timezone(zone).unwrap();
            let transitions: Vec<i64> = tz
                .following(from)
                .take_while(|t| t.timestamp().as_second() < 1_798_761_600)
                .map(|t| t.timestamp().as_millisecond())
                .collect();
            assert!(
                !transitions.is_empty()
                    || *zone == "Asia/Kathmandu"
                    || *zone == "America/Sao_Paulo",
                "{zone}"
            );
            for t in transitions {
                for period in PERIODS {
                    let spec = PeriodSpec::new(period.parse().unwrap(), true, zone, 0).unwrap();
                    let mut w = spec.window(
                        t - 100 * (spec.window(t).end_ms - spec.window(t).start_ms).min(3_600_000),
                    );
                    for _ in 0..200 {
                        let next = spec.window(w.end_ms);
                        assert_eq!(next.start_ms, w.end_ms, "{zone} {period} after {w:?}");
                        assert!(next.index > w.index);
                        assert_eq!(spec.window(w.end_ms - 1), w, "{zone} {period}");
                        w = next;
                    }
                }
            }
        }
    }
}
