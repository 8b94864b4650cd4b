//! Text forms shared by keys, values and tags: base64url without padding (RFC 4648 §5) and
//! canonical decimal integers.
//!
//! Every decoder here is strict: it accepts exactly the strings its encoder produces. Keys
//! and values are compared as strings by chitchat and by the MAC, so two spellings of one
//! value (`007` and `7`, a base64 string with non-zero padding bits) would be two different
//! keys or values; refusing them keeps `encode(decode(s)) == s` for every accepted `s`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Length of the base64url-no-padding text of `bytes_len` bytes.
pub(crate) const fn b64_len(bytes_len: usize) -> usize {
    (bytes_len * 4).div_ceil(3)
}

/// base64url, no padding.
pub(crate) fn b64_encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Inverse of [`b64_encode`]; `None` for any string it would not have produced (foreign
/// characters, padding, an impossible length, non-zero trailing bits): the engine's
/// `RequireNone` padding mode and its refusal of trailing bits make it exactly as strict
/// as the encoder (`legacy_agreement` below holds it to the hand-written codec it
/// replaced, so values written by earlier versions read the same).
pub(crate) fn b64_decode(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}

/// `0` or a non-zero digit followed by digits; nothing else (no sign, no leading zeros).
fn canonical_digits(digits: &str) -> bool {
    match digits.as_bytes() {
        [b'0'] => true,
        [first, rest @ ..] => {
            (b'1'..=b'9').contains(first) && rest.iter().all(|b| b.is_ascii_digit())
        }
        [] => false,
    }
}

/// A u64 in canonical decimal, as `u64::to_string` writes it.
pub(crate) fn parse_u64(text: &str) -> Option<u64> {
    if !canonical_digits(text) {
        return None;
    }
    text.parse().ok()
}

/// An i64 in canonical decimal, as `i64::to_string` writes it (so no `+` and no `-0`).
pub(crate) fn parse_i64(text: &str) -> Option<i64> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !canonical_digits(digits) || text == "-0" {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The hand-written codec that earlier versions wrote gossip values with, kept as the
    /// oracle the crate's codec must agree with byte for byte.
    mod legacy {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

        pub fn encode(bytes: &[u8]) -> String {
            let mut out = String::new();
            for chunk in bytes.chunks(3) {
                let b = [
                    chunk[0],
                    chunk.get(1).copied().unwrap_or(0),
                    chunk.get(2).copied().unwrap_or(0),
                ];
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                for i in 0..=chunk.len() {
                    let sextet = (n >> (18 - 6 * i)) & 0x3f;
                    out.push(char::from(ALPHABET[sextet as usize]));
                }
            }
            out
        }

        fn sextet(c: u8) -> Option<u32> {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'-' => 62,
                b'_' => 63,
                _ => return None,
            };
            Some(u32::from(v))
        }

        pub fn decode(text: &str) -> Option<Vec<u8>> {
            let text = text.as_bytes();
            if text.len() % 4 == 1 {
                return None;
            }
            let mut out = Vec::new();
            for chunk in text.chunks(4) {
                let mut n = 0u32;
                for (i, c) in chunk.iter().enumerate() {
                    n |= sextet(*c)? << (18 - 6 * i);
                }
                let bytes = chunk.len() - 1;
                if n & (0x00ff_ffff >> (8 * bytes)) != 0 {
                    return None;
                }
                for i in 0..bytes {
                    out.push((n >> (16 - 8 * i)) as u8);
                }
            }
            Some(out)
        }
    }

    #[test]
    fn legacy_agreement_exhaustive_short() {
        // Every string of up to 3 characters over the alphabet plus the usual foreigners,
        // and every 0-, 1- and 2-byte input.
        let chars: Vec<char> =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/= ."
                .chars()
                .collect();
        let mut texts = vec![String::new()];
        for len in 1..=3 {
            let prev: Vec<String> = texts
                .iter()
                .filter(|t| t.len() == len - 1)
                .cloned()
                .collect();
            for t in prev {
                for c in &chars {
                    texts.push(format!("{t}{c}"));
                }
            }
        }
        for text in &texts {
            assert_eq!(b64_decode(text), legacy::decode(text), "decode {text:?}");
        }
        for a in 0..=255u8 {
            assert_eq!(b64_encode(&[a]), legacy::encode(&[a]));
            for b in 0..=255u8 {
                assert_eq!(b64_encode(&[a, b]), legacy::encode(&[a, b]));
            }
        }
    }

    #[test]
    fn b64_known_vectors() {
        // RFC 4648 §10, in the URL alphabet without padding.
        let cases: &[(&[u8], &str)] = &[
            (b"", ""),
            (b"f", "Zg"),
            (b"fo", "Zm8"),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg"),
            (b"fooba", "Zm9vYmE"),
            (b"foobar", "Zm9vYmFy"),
            (&[0xfb, 0xff, 0xbf], "-_-_"),
        ];
        for (bytes, text) in cases {
            assert_eq!(b64_encode(bytes), *text, "encode {bytes:?}");
            assert_eq!(b64_decode(text).as_deref(), Some(*bytes), "decode {text:?}");
        }
    }

    #[test]
    fn b64_rejects_garbage() {
        for text in [
            "Z",      // impossible length
            "Zm9vY",  // impossible length
            "Zh",     // non-zero trailing bits ("Zg" is canonical)
            "Zm9=",   // padding
            "Zg==",   // padding
            "Zm+v",   // standard alphabet
            "Zm/v",   // standard alphabet
            "Zm 9v",  // whitespace
            "Zm9v\n", // newline
            "Zm9vé",  // non-ASCII
        ] {
            assert_eq!(b64_decode(text), None, "{text:?}");
        }
    }

    #[test]
    fn decimal_table() {
        let u64s: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("7", Some(7)),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
            ("", None),
            ("00", None),
            ("07", None),
            ("+7", None),
            ("-7", None),
            ("-0", None),
            (" 7", None),
            ("7 ", None),
            ("1e3", None),
            ("٣", None),
        ];
        for (text, want) in u64s {
            assert_eq!(parse_u64(text), *want, "u64 {text:?}");
        }
        let i64s: &[(&str, Option<i64>)] = &[
            ("0", Some(0)),
            ("-1", Some(-1)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("-9223372036854775809", None),
            ("-0", None),
            ("-", None),
            ("--1", None),
            ("-01", None),
            ("+1", None),
            ("01", None),
        ];
        for (text, want) in i64s {
            assert_eq!(parse_i64(text), *want, "i64 {text:?}");
        }
    }

    proptest! {
        #[test]
        fn b64_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let text = b64_encode(&bytes);
            prop_assert_eq!(text.len(), b64_len(bytes.len()));
            prop_assert_eq!(b64_decode(&text), Some(bytes));
        }

        #[test]
        fn legacy_agreement(bytes in proptest::collection::vec(any::<u8>(), 0..256),
                            text in "[A-Za-z0-9_=+/-]{0,40}") {
            prop_assert_eq!(b64_encode(&bytes), legacy::encode(&bytes));
            prop_assert_eq!(b64_decode(&text), legacy::decode(&text));
        }

        #[test]
        fn b64_decode_is_canonical(text in "[A-Za-z0-9_=+/-]{0,12}") {
            if let Some(bytes) = b64_decode(&text) {
                prop_assert_eq!(b64_encode(&bytes), text);
            }
        }

        #[test]
        fn decimals_round_trip(u in any::<u64>(), i in any::<i64>()) {
            prop_assert_eq!(parse_u64(&u.to_string()), Some(u));
            prop_assert_eq!(parse_i64(&i.to_string()), Some(i));
        }

        #[test]
        fn decimal_parse_is_canonical(text in "[-+0-9]{0,21}") {
            if let Some(u) = parse_u64(&text) {
                prop_assert_eq!(u.to_string(), text.clone());
            }
            if let Some(i) = parse_i64(&text) {
                prop_assert_eq!(i.to_string(), text);
            }
        }
    }
}
