//! The period oracle (I5) of the simulation, independent of `tally_core::PeriodSpec`: the
//! calendar-aligned period that contains an instant, by plain `jiff` calendar arithmetic
//! in the limit's timezone (what a person with a calendar would say), so a wrong window
//! in the code under test cannot agree with itself.

use jiff::civil;
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, ToSpan as _};

/// Where `never` periods start (tally's one epoch of an all-time limit: the Unix epoch).
pub const NEVER_START_MS: i64 = 0;

fn parse(period: &str) -> (i64, char) {
    let unit = period.chars().last().expect("period unit");
    let n: i64 = period[..period.len() - unit.len_utf8()]
        .parse()
        .unwrap_or_else(|_| panic!("oracle cannot read period {period:?}"));
    (n, unit)
}

fn span(n: i64, unit: char) -> Span {
    match unit {
        's' => n.seconds(),
        'm' => n.minutes(),
        'h' => n.hours(),
        'd' => n.days(),
        'w' => n.weeks(),
        'M' => n.months(),
        'Y' => n.years(),
        other => panic!("oracle does not know unit {other}"),
    }
}

/// `(start_ms, end_ms)` of the calendar-aligned `period` (`"1d"`, `"1M"`, `"never"`, ...)
/// in `tz` that contains `at_ms`: it starts on a unit boundary in `tz` (second, minute,
/// hour, midnight, Monday, the 1st, Jan 1; `nM` with n dividing 12 counts months from
/// January) and lasts one span. `never`: from [`NEVER_START_MS`], no end.
pub fn aligned_window(period: &str, tz: &str, at_ms: i64) -> (i64, Option<i64>) {
    if period == "never" {
        return (NEVER_START_MS, None);
    }
    let (n, unit) = parse(period);
    assert!(
        n == 1 || (unit == 'M' && 12 % n == 0),
        "oracle does not define aligned {period}"
    );
    let tz = TimeZone::get(tz).unwrap_or_else(|e| panic!("timezone {tz}: {e}"));
    let z = Timestamp::from_millisecond(at_ms)
        .expect("instant in range")
        .to_zoned(tz.clone());
    // Seconds, minutes and hours: back from the instant to the start of its local unit
    // (local minutes already include offsets like +05:30), one fixed span long. Clocks
    // change on the hour, so an hour that repeats in autumn is two distinct periods.
    let fixed = |unit_ms: i64, local_ms: i64| {
        let start = at_ms - local_ms;
        (start, Some(start + unit_ms))
    };
    let sub_ms = i64::from(z.millisecond());
    match unit {
        's' => return fixed(1_000, sub_ms),
        'm' => return fixed(60_000, i64::from(z.second()) * 1_000 + sub_ms),
        'h' => {
            return fixed(
                3_600_000,
                i64::from(z.minute()) * 60_000 + i64::from(z.second()) * 1_000 + sub_ms,
            );
        }
        _ => {}
    }
    let d = z.date();
    let start: civil::DateTime = match unit {
        'd' => d.at(0, 0, 0, 0),
        'w' => d
            .checked_sub(i64::from(d.weekday().to_monday_zero_offset()).days())
            .expect("date arithmetic")
            .at(0, 0, 0, 0),
        'M' => {
            let month = (i64::from(d.month()) - 1) / n * n + 1;
            civil::date(d.year(), month as i8, 1).at(0, 0, 0, 0)
        }
        'Y' => civil::date(d.year(), 1, 1).at(0, 0, 0, 0),
        other => panic!("oracle does not define aligned unit {other}"),
    };
    let end = start.checked_add(span(n, unit)).expect("date arithmetic");
    // Midnight that a clock change skips starts the day at the first instant after it.
    let ms = |dt: civil::DateTime| {
        dt.to_zoned(tz.clone())
            .expect("local time in tz")
            .timestamp()
            .as_millisecond()
    };
    (ms(start), Some(ms(end)))
}

#[cfg(test)]
mod tests {
    use super::aligned_window;

    fn ms(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    /// The oracle itself, against dates worked out by hand.
    #[test]
    fn aligned_windows_by_hand() {
        let cases = [
            (
                "1d",
                "UTC",
                "2025-03-14T12:00:00Z",
                "2025-03-14T00:00:00Z",
                "2025-03-15T00:00:00Z",
            ),
            (
                "1M",
                "UTC",
                "2025-02-28T23:59:59.999Z",
                "2025-02-01T00:00:00Z",
                "2025-03-01T00:00:00Z",
            ),
            (
                "1M",
                "UTC",
                "2025-03-01T00:00:00Z",
                "2025-03-01T00:00:00Z",
                "2025-04-01T00:00:00Z",
            ),
            // Berlin springs forward on 2025-03-30: that day has 23 hours.
            (
                "1d",
                "Europe/Berlin",
                "2025-03-30T12:00:00Z",
                "2025-03-29T23:00:00Z",
                "2025-03-30T22:00:00Z",
            ),
            // New York falls back on 2025-11-02: 01:00-02:00 local happens twice.
            (
                "1h",
                "America/New_York",
                "2025-11-02T05:30:00Z",
                "2025-11-02T05:00:00Z",
                "2025-11-02T06:00:00Z",
            ),
            (
                "1h",
                "America/New_York",
                "2025-11-02T06:30:00Z",
                "2025-11-02T06:00:00Z",
                "2025-11-02T07:00:00Z",
            ),
            (
                "3M",
                "UTC",
                "2025-05-20T00:00:00Z",
                "2025-04-01T00:00:00Z",
                "2025-07-01T00:00:00Z",
            ),
            (
                "1w",
                "UTC",
                "2025-03-16T23:00:00Z",
                "2025-03-10T00:00:00Z",
                "2025-03-17T00:00:00Z",
            ),
        ];
        for (period, tz, at, start, end) in cases {
            assert_eq!(
                aligned_window(period, tz, ms(at)),
                (ms(start), Some(ms(end))),
                "{period} {tz} at {at}"
            );
        }
        assert_eq!(
            aligned_window("never", "UTC", ms("2025-03-14T12:00:00Z")),
            (0, None)
        );
    }
}
