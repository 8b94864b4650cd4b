//! A small JSON writer for the hot replies (check and usage), which are most of the
//! traffic: it writes straight into one pre-sized buffer, amounts from their integer
//! units (exact decimal USD, no float formatting) and times with a fixed-format UTC
//! printer, instead of building `serde_json` values. Other replies use `serde_json`.
//!
//! What it writes is the serde serialisation of the typed replies (`tally_api::CheckReply`,
//! `tally_api::UsageReply`) byte for byte, except that an amount of 1 to 9 micro-USD is
//! spelled `0.000001`…`0.000009` where serde writes `1e-6`…`9e-6`, and a usage sum past
//! 1e9 USD is written as its exact micros where serde prints the float's shortest digits:
//! every amount parses to the same value. The property test `writer_equals_typed_serialisation` below checks
//! both on random replies; BENCHMARKS.md has what the writer buys.

use tally_core::Metric;

/// A reply being written.
pub struct Json(Vec<u8>);

impl Json {
    pub fn with_capacity(bytes: usize) -> Json {
        Json(Vec::with_capacity(bytes))
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// Structural text written as is (`{`, `"key":`, `,`, …).
    pub fn raw(&mut self, s: &str) -> &mut Json {
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    pub fn bool(&mut self, b: bool) -> &mut Json {
        self.raw(if b { "true" } else { "false" })
    }

    pub fn u64(&mut self, v: u64) -> &mut Json {
        self.0
            .extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        self
    }

    /// A JSON string with the escapes RFC 8259 requires.
    pub fn str(&mut self, s: &str) -> &mut Json {
        self.0.push(b'"');
        let bytes = s.as_bytes();
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let esc: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..=0x1f => b"",
                _ => continue,
            };
            self.0.extend_from_slice(&bytes[start..i]);
            if esc.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                self.0.extend_from_slice(b"\\u00");
                self.0.push(HEX[usize::from(b >> 4)]);
                self.0.push(HEX[usize::from(b & 0xf)]);
            } else {
                self.0.extend_from_slice(esc);
            }
            start = i + 1;
        }
        self.0.extend_from_slice(&bytes[start..]);
        self.0.push(b'"');
        self
    }

    /// An amount of `metric`: USD for cost (exact decimal of the micros, with a `.0` on
    /// whole amounts, as a float would print), a whole number otherwise.
    pub fn amount(&mut self, metric: Metric, v: u64) -> &mut Json {
        match metric {
            Metric::Cost => {
                let (whole, frac) = (v / 1_000_000, v % 1_000_000);
                self.u64(whole);
                if frac == 0 {
                    return self.raw(".0");
                }
                let mut digits = [b'.', b'0', b'0', b'0', b'0', b'0', b'0'];
                let mut f = frac;
                for d in digits[1..].iter_mut().rev() {
                    *d = b'0' + (f % 10) as u8;
                    f /= 10;
                }
                let len = 7 - trailing_zero_digits(frac);
                self.0.extend_from_slice(&digits[..len]);
                self
            }
            _ => self.u64(v),
        }
    }

    /// An RFC 3339 UTC time as a JSON string, like jiff's `Timestamp` display
    /// (`2026-12-01T00:00:00Z`, fractions of a second only when present).
    pub fn time(&mut self, ms: i64) -> &mut Json {
        let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
        let (y, m, d) = civil_from_days(days);
        if !(0..=9999).contains(&y) {
            // Far outside anything a period produces; let jiff spell it.
            return match jiff::Timestamp::from_millisecond(ms) {
                Ok(t) => self.str(&t.to_string()),
                Err(_) => self.raw("null"),
            };
        }
        let secs = ms_of_day / 1000;
        let mut buf = *b"\"0000-00-00T00:00:00";
        let put = |buf: &mut [u8; 20], at: usize, v: i64, width: usize| {
            let mut v = v;
            for i in (0..width).rev() {
                buf[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(&mut buf, 1, y, 4);
        put(&mut buf, 6, m, 2);
        put(&mut buf, 9, d, 2);
        put(&mut buf, 12, secs / 3600, 2);
        put(&mut buf, 15, secs / 60 % 60, 2);
        put(&mut buf, 18, secs % 60, 2);
        self.0.extend_from_slice(&buf);
        let frac = ms_of_day % 1000;
        if frac != 0 {
            let digits = [
                b'0' + (frac / 100) as u8,
                b'0' + (frac / 10 % 10) as u8,
                b'0' + (frac % 10) as u8,
            ];
            let len = if frac % 100 == 0 {
                1
            } else if frac % 10 == 0 {
                2
            } else {
                3
            };
            self.0.push(b'.');
            self.0.extend_from_slice(&digits[..len]);
        }
        self.raw("Z\"")
    }
}

/// Trailing zero digits of a non-zero number.
fn trailing_zero_digits(mut v: u64) -> usize {
    let mut n = 0;
    while v % 10 == 0 {
        v /= 10;
        n += 1;
    }
    n
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::units::Micros;

    fn text(f: impl FnOnce(&mut Json)) -> String {
        let mut j = Json::with_capacity(16);
        f(&mut j);
        String::from_utf8(j.into_bytes()).unwrap()
    }

    #[test]
    fn amounts_are_exact_and_parse_like_floats() {
        for (micros, want) in [
            (0, "0.0"),
            (1, "0.000001"),
            (12_500_000, "12.5"),
            (100_000_000, "100.0"),
            (1_012_304, "1.012304"),
            (999_999_999_999_999, "999999999.999999"),
            (1_000_000_000_000_000, "1000000000.0"),
        ] {
            let t = text(|j| {
                j.amount(Metric::Cost, micros);
            });
            assert_eq!(t, want);
            let parsed: f64 = serde_json::from_str(&t).unwrap();
            assert_eq!(parsed, Micros(micros).to_usd(), "{t}");
        }
        let t = text(|j| {
            j.amount(Metric::Tokens, 1800);
        });
        assert_eq!(t, "1800");
    }

    #[test]
    fn strings_are_escaped() {
        let t = text(|j| {
            j.str("a\"b\\c\nd\u{1}é");
        });
        assert_eq!(t, r#""a\"b\\c\nd\u0001é""#);
        let back: String = serde_json::from_str(&t).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é");
    }

    #[test]
    fn times_print_like_jiff() {
        let mut ms: i64 = -86_400_000 * 366;
        let mut step: i64 = 1;
        while ms < 253_402_300_799_000 {
            let want = format!("\"{}\"", jiff::Timestamp::from_millisecond(ms).unwrap());
            let t = text(|j| {
                j.time(ms);
            });
            assert_eq!(t, want, "{ms}");
            step = step * 7 % 1_000_000_007 + 86_399_999;
            ms += step;
        }
        for ms in [
            0,
            1,
            10,
            100,
            120,
            1_500,
            951_782_400_000,
            1_795_327_200_000,
        ] {
            let want = format!("\"{}\"", jiff::Timestamp::from_millisecond(ms).unwrap());
            let t = text(|j| {
                j.time(ms);
            });
            assert_eq!(t, want);
        }
    }

    use proptest::prelude::*;
    use tally_node::LimitReport;

    fn report() -> impl Strategy<Value = LimitReport> {
        (
            // Ids with every kind of character a JSON string must escape.
            "[a-z0-9\"\\\\\n\t\u{1}é:._-]{1,12}",
            prop_oneof![
                Just(Metric::Cost),
                Just(Metric::Tokens),
                Just(Metric::Requests)
            ],
            prop_oneof![0..20u64, 0..1_000_000_000_000_000u64, Just(u64::MAX >> 11)],
            0..1_000_000_000_000_000u64,
            0..1_000_000_000_000_000u64,
            proptest::option::of(-62_135_596_800_000..253_402_300_799_999i64),
            any::<bool>(),
            // Hard limits: (free, reason 0 none / 1 budget / 2 rights, retry after).
            proptest::option::of((
                prop_oneof![-20..20i64, -1_000_000_000_000_000..1_000_000_000_000_000i64],
                0..3u8,
                proptest::option::of(0..100_000u64),
            )),
        )
            .prop_map(
                |(id, metric, used, max, remaining, resets_at_ms, denied, hard)| {
                    let (mode, free, reason, retry_after_ms) = match hard {
                        None => (tally_core::Mode::Soft, 0, None, None),
                        Some((free, r, retry)) => (
                            tally_core::Mode::Hard,
                            free,
                            [
                                None,
                                Some(tally_core::DenyReason::Budget),
                                Some(tally_core::DenyReason::Rights),
                            ][r as usize],
                            retry,
                        ),
                    };
                    LimitReport {
                        id,
                        metric,
                        used,
                        max,
                        remaining,
                        period_start_ms: 0,
                        resets_at_ms,
                        denied,
                        mode,
                        free,
                        reason,
                        retry_after_ms,
                    }
                },
            )
    }

    /// An amount serde spells differently: 1 to 9 micro-USD (`1e-6`), or a sum of usage
    /// past 2^33 USD, where one f64 step is more than a micro-USD and serde prints the
    /// float's shortest digits while the writer prints the exact micros.
    fn spelled_differently(r: &LimitReport) -> bool {
        r.metric == Metric::Cost
            && [r.used, r.max, r.remaining, r.free.unsigned_abs()]
                .iter()
                .any(|v| (1..=9).contains(v) || *v > tally_core::units::MICROS_MAX)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn writer_equals_typed_serialisation(
            limits in proptest::collection::vec(report(), 0..6),
            allowed in any::<bool>(),
            stale in any::<bool>(),
            reserved in proptest::option::of(("[a-z0-9-]{1,12}~[0-9a-f]{1,11}~[0-9a-f]{1,4}", "[a-z0-9-]{1,12}")),
            over in proptest::collection::vec(0..1_000_000u64, 0..3),
            access in proptest::option::of((0..3u8, proptest::option::of("[a-z0-9-]{1,12}"))),
            priced in proptest::option::of((0..1_000_000_000u64, 0..1_000_000_000_000_000u64)),
        ) {
            let extras = crate::http::ReplyExtras {
                access: access.map(|(rule, given)| crate::http::access_view(&tally_core::AccessDenial {
                    dimension: "virtual_key".into(),
                    value: "vk-\"1\"".into(),
                    rule: match rule {
                        0 => tally_core::BrokenRule::Inactive,
                        1 => tally_core::BrokenRule::Expired { expires_at_ms: 1_795_327_200_123 },
                        _ => tally_core::BrokenRule::Allow { attribute: "model".into(), given },
                    },
                })),
                priced: priced.map(|(micros, femto)| crate::http::priced_view(&tally_node::Priced {
                    model: "openai/gpt-4o".into(),
                    femto: u128::from(femto),
                    cost: tally_core::Micros(micros),
                    prices: tally_core::Price { input: femto, output: 1, cache_read: None, cache_creation: None, reasoning: Some(7) }.resolved(),
                })),
            };
            let reservation = reserved.map(|(id, node)| tally_api::Reservation {
                id,
                node,
                expires_at: "2026-12-03T15:00:00.5Z".into(),
            });
            // Overruns name limits of the reply (by index), once each.
            let overrun: Vec<(String, u64)> = over
                .iter()
                .zip(&limits)
                .map(|(v, l)| (l.id.clone(), *v))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_iter()
                .collect();
            let exact = !limits.iter().any(spelled_differently)
                && !overrun.iter().any(|(id, v)| {
                    (1..=9).contains(v)
                        && limits.iter().find(|l| &l.id == id).is_some_and(|l| l.metric == Metric::Cost)
                });
            let written = crate::http::check_reply_json(allowed, stale, &limits, reservation.as_ref(), &extras).into_bytes();
            let typed = serde_json::to_vec(&crate::http::check_reply(allowed, stale, &limits, reservation.as_ref(), &extras)).unwrap();
            let parsed: serde_json::Value = serde_json::from_slice(&written).unwrap();
            prop_assert_eq!(&parsed, &serde_json::from_slice::<serde_json::Value>(&typed).unwrap());
            let back: tally_api::CheckReply = serde_json::from_slice(&written).unwrap();
            prop_assert_eq!(back, crate::http::check_reply(allowed, stale, &limits, reservation.as_ref(), &extras));
            if exact {
                prop_assert_eq!(String::from_utf8(written).unwrap(), String::from_utf8(typed).unwrap());
            }
            let written = crate::http::usage_reply_json(allowed, &limits, &overrun, extras.priced.as_ref()).into_bytes();
            let typed = serde_json::to_vec(&crate::http::usage_reply(allowed, &limits, &overrun, extras.priced.as_ref())).unwrap();
            let parsed: serde_json::Value = serde_json::from_slice(&written).unwrap();
            prop_assert_eq!(&parsed, &serde_json::from_slice::<serde_json::Value>(&typed).unwrap());
            if exact {
                prop_assert_eq!(String::from_utf8(written).unwrap(), String::from_utf8(typed).unwrap());
            }
        }
    }
}
