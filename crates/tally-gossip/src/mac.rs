//! Value MACs: every gossip value is `"{payload}~{tag}"`, where the tag authenticates the
//! payload together with the node that published it and the key it sits under
//! (DESIGN.md §4, integrity).
//!
//! chitchat's wire format is crate-private, so integrity cannot be added around its
//! messages; it is added to each value instead. Binding the publisher and the key into the
//! tag stops a peer holding a valid value from replaying it under another node's state
//! (raising that node's slot) or under another key (moving usage between limits). Replay of
//! the *same* value under the *same* key and publisher is harmless: slots merge by maximum
//! and config by version.
//!
//! The tag is HMAC-SHA256 truncated to 128 bits (RFC 2104 §5 allows truncation to half the
//! output), in base64url without padding. This module knows nothing of what payloads mean.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::text::{b64_decode, b64_encode, b64_len};

/// Separates the payload from its tag. Payloads never contain it (they are decimal or
/// base64url), and [`open`] splits at the last one anyway.
pub const TAG_SEPARATOR: char = '~';
/// Bytes of HMAC-SHA256 output kept in a tag.
pub const TAG_BYTES: usize = 16;
/// Characters of a tag in base64url without padding.
pub const TAG_CHARS: usize = b64_len(TAG_BYTES);
/// How many bytes [`seal`] adds to a payload.
pub const SEAL_OVERHEAD_BYTES: usize = TAG_SEPARATOR.len_utf8() + TAG_CHARS;
/// Shortest accepted cluster secret. Shorter secrets are refused as a configuration
/// mistake: the MAC is only as strong as the secret (no password stretching is done).
pub const CLUSTER_KEY_BYTES_MIN: usize = 16;
/// Longest accepted cluster secret (HMAC hashes long keys down to 32 bytes anyway).
pub const CLUSTER_KEY_BYTES_MAX: usize = 1024;

/// Versions the MAC input, so a future format cannot be confused with this one.
const DOMAIN: &[u8] = b"tally-gossip-mac-v1";
/// The key of [`ClusterKey::insecure`]. Public knowledge by design.
const INSECURE_SECRET: &[u8] = b"tally insecure cluster key: detects corruption, not forgery";

type HmacSha256 = Hmac<Sha256>;

/// The secret shared by all nodes of a cluster. `Debug` never shows it.
#[derive(Clone)]
pub struct ClusterKey {
    /// HMAC state already keyed: cloning it is cheaper than re-keying per value.
    mac: HmacSha256,
    insecure: bool,
}

/// Why a cluster secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("the cluster key must be at least {min} bytes, got {len}")]
    TooShort { len: usize, min: usize },
    #[error("the cluster key must be at most {max} bytes, got {len}")]
    TooLong { len: usize, max: usize },
}

impl ClusterKey {
    /// A key from a shared secret: random bytes, or a long random passphrase
    /// (`openssl rand -base64 32`). The secret is used as the HMAC key as is.
    pub fn new(secret: &[u8]) -> Result<ClusterKey, KeyError> {
        if secret.len() < CLUSTER_KEY_BYTES_MIN {
            return Err(KeyError::TooShort {
                len: secret.len(),
                min: CLUSTER_KEY_BYTES_MIN,
            });
        }
        if secret.len() > CLUSTER_KEY_BYTES_MAX {
            return Err(KeyError::TooLong {
                len: secret.len(),
                max: CLUSTER_KEY_BYTES_MAX,
            });
        }
        Ok(ClusterKey::from_secret(secret, secret == INSECURE_SECRET))
    }

    /// The key of a cluster started without one: an HMAC under a fixed, published key.
    ///
    /// It still detects values corrupted in transit or in a buggy peer, but it gives **no
    /// authenticity**: anyone who can reach the gossip port can forge any value (raise
    /// usage, change limits). Use it only on loopback or behind `--insecure`.
    pub fn insecure() -> ClusterKey {
        ClusterKey::from_secret(INSECURE_SECRET, true)
    }

    /// Whether this is [`ClusterKey::insecure`] (forgeable by anyone).
    pub fn is_insecure(&self) -> bool {
        self.insecure
    }

    fn from_secret(secret: &[u8], insecure: bool) -> ClusterKey {
        let mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
        ClusterKey { mac, insecure }
    }

    /// The keyed MAC over the unambiguous encoding of `(publisher, gossip_key, payload)`:
    /// a domain label, then each part prefixed by its length as a u64, big-endian. Without
    /// the lengths `("n1", "s/a")` and `("n1s", "/a")` would be the same message.
    fn mac(&self, publisher: &str, gossip_key: &str, payload: &str) -> HmacSha256 {
        let mut mac = self.mac.clone();
        for part in [
            DOMAIN,
            publisher.as_bytes(),
            gossip_key.as_bytes(),
            payload.as_bytes(),
        ] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.insecure {
            f.write_str("ClusterKey(insecure)")
        } else {
            f.write_str("ClusterKey(<redacted>)")
        }
    }
}

/// Why a received value was refused. The caller ignores the value and counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MacError {
    #[error("gossip value has no MAC tag")]
    MissingTag,
    #[error("gossip value has a malformed MAC tag")]
    MalformedTag,
    #[error("gossip value MAC does not verify (wrong cluster key, publisher or key, or tampered)")]
    Mismatch,
}

/// `"{payload}~{tag}"`: the value `publisher` puts under `gossip_key`. The result is
/// [`SEAL_OVERHEAD_BYTES`] longer than `payload`.
pub fn seal(key: &ClusterKey, publisher: &str, gossip_key: &str, payload: &str) -> String {
    let tag = key
        .mac(publisher, gossip_key, payload)
        .finalize()
        .into_bytes();
    let tag = b64_encode(&tag[..TAG_BYTES]);
    debug_assert_eq!(tag.len(), TAG_CHARS);
    let mut value = String::with_capacity(payload.len() + SEAL_OVERHEAD_BYTES);
    value.push_str(payload);
    value.push(TAG_SEPARATOR);
    value.push_str(&tag);
    value
}

/// The payload of `value`, if its tag verifies for `publisher` and `gossip_key` under
/// `key`. The comparison runs in constant time.
pub fn open<'a>(
    key: &ClusterKey,
    publisher: &str,
    gossip_key: &str,
    value: &'a str,
) -> Result<&'a str, MacError> {
    let (payload, tag) = value
        .rsplit_once(TAG_SEPARATOR)
        .ok_or(MacError::MissingTag)?;
    if tag.len() != TAG_CHARS {
        return Err(MacError::MalformedTag);
    }
    // Strict decoding: a tag with different padding bits is refused, not accepted as an
    // alias, so one payload has exactly one valid sealed value.
    let tag = b64_decode(tag).ok_or(MacError::MalformedTag)?;
    debug_assert_eq!(tag.len(), TAG_BYTES);
    key.mac(publisher, gossip_key, payload)
        .verify_truncated_left(&tag)
        .map_err(|_| MacError::Mismatch)?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(secret: &str) -> ClusterKey {
        ClusterKey::new(secret.as_bytes()).unwrap()
    }

    const SECRET: &str = "correct horse battery staple";

    #[test]
    fn seal_then_open() {
        let k = key(SECRET);
        let value = seal(&k, "n1", "s/lim/0/0", "42");
        assert_eq!(value.len(), 2 + SEAL_OVERHEAD_BYTES);
        assert!(value.starts_with("42~"));
        assert_eq!(open(&k, "n1", "s/lim/0/0", &value), Ok("42"));
        // Empty payloads work too.
        let empty = seal(&k, "n1", "l/a", "");
        assert_eq!(open(&k, "n1", "l/a", &empty), Ok(""));
        // Deterministic: the same inputs give the same value on every node.
        assert_eq!(seal(&k, "n1", "s/lim/0/0", "42"), value);
    }

    #[test]
    fn payload_containing_separator_is_still_robust() {
        let k = key(SECRET);
        let value = seal(&k, "n1", "l/a", "a~b~c");
        assert_eq!(open(&k, "n1", "l/a", &value), Ok("a~b~c"));
    }

    #[test]
    fn open_refuses() {
        use MacError::{MalformedTag, Mismatch, MissingTag};
        let k = key(SECRET);
        let other = key("another secret of enough length");
        let insecure = ClusterKey::insecure();
        let v = seal(&k, "n1", "s/lim/0/0", "42");
        let tag = &v[3..];
        let cut = |n: usize| v[..v.len() - n].to_string();
        #[rustfmt::skip]
        let cases: &[(&str, &ClusterKey, &str, &str, String, MacError)] = &[
            ("other publisher",      &k,        "n2",  "s/lim/0/0", v.clone(),               Mismatch),
            ("other gossip key",     &k,        "n1",  "s/lim/0/1", v.clone(),               Mismatch),
            ("other cluster key",    &other,    "n1",  "s/lim/0/0", v.clone(),               Mismatch),
            ("insecure cluster key", &insecure, "n1",  "s/lim/0/0", v.clone(),               Mismatch),
            ("other payload",        &k,        "n1",  "s/lim/0/0", format!("43~{tag}"),     Mismatch),
            ("payload to publisher", &k,        "n14", "s/lim/0/0", format!("2~{tag}"),      Mismatch),
            ("no tag",               &k,        "n1",  "s/lim/0/0", "42".into(),             MissingTag),
            ("empty value",          &k,        "n1",  "s/lim/0/0", String::new(),           MissingTag),
            ("empty tag",            &k,        "n1",  "s/lim/0/0", "42~".into(),            MalformedTag),
            ("tag cut by 1",         &k,        "n1",  "s/lim/0/0", cut(1),                  MalformedTag),
            ("tag cut by 4",         &k,        "n1",  "s/lim/0/0", cut(4),                  MalformedTag),
            ("tag extended",         &k,        "n1",  "s/lim/0/0", format!("{v}A"),         MalformedTag),
            ("tag padded",           &k,        "n1",  "s/lim/0/0", format!("{}==", cut(2)), MalformedTag),
        ];
        for (what, ck, publisher, gossip_key, value, want) in cases {
            assert_eq!(open(ck, publisher, gossip_key, value), Err(*want), "{what}");
        }
    }

    #[test]
    fn insecure_key_still_detects_corruption() {
        let k = ClusterKey::insecure();
        assert!(k.is_insecure());
        assert!(!key(SECRET).is_insecure());
        let v = seal(&k, "n1", "l/a", "payload");
        assert_eq!(open(&k, "n1", "l/a", &v), Ok("payload"));
        assert_eq!(
            open(&k, "n1", "l/a", &v.replace("pay", "pey")),
            Err(MacError::Mismatch)
        );
        // Passing the well-known secret explicitly is just as insecure.
        assert!(ClusterKey::new(INSECURE_SECRET).unwrap().is_insecure());
    }

    #[test]
    fn secrets_are_bounded_and_never_printed() {
        assert_eq!(
            ClusterKey::new(b"short").unwrap_err(),
            KeyError::TooShort {
                len: 5,
                min: CLUSTER_KEY_BYTES_MIN
            }
        );
        assert!(matches!(
            ClusterKey::new(&[7; CLUSTER_KEY_BYTES_MAX + 1]),
            Err(KeyError::TooLong { .. })
        ));
        assert!(ClusterKey::new(&[0; CLUSTER_KEY_BYTES_MAX]).is_ok());
        let printed = format!("{:?} {:#?}", key(SECRET), key(SECRET));
        assert!(!printed.contains("horse"), "{printed}");
        assert_eq!(
            format!("{:?}", ClusterKey::insecure()),
            "ClusterKey(insecure)"
        );
    }

    proptest! {
        #[test]
        fn round_trip(publisher in "[a-z0-9-]{1,16}", gossip_key in "[a-z0-9/]{1,40}", payload in "[A-Za-z0-9_-]{0,200}") {
            let k = key(SECRET);
            let v = seal(&k, &publisher, &gossip_key, &payload);
            prop_assert_eq!(v.len(), payload.len() + SEAL_OVERHEAD_BYTES);
            prop_assert_eq!(open(&k, &publisher, &gossip_key, &v), Ok(payload.as_str()));
        }

        /// Flipping any bit of any byte, in the payload or the tag, is detected.
        #[test]
        fn any_flipped_bit_is_detected(payload in "[A-Za-z0-9_-]{0,40}", at in any::<prop::sample::Index>(), bit in 0u8..7) {
            let k = key(SECRET);
            let v = seal(&k, "n1", "l/a", &payload);
            let mut bytes = v.into_bytes();
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            // Bits 0..7 keep ASCII ASCII, so the value stays a string.
            let tampered = String::from_utf8(bytes).unwrap();
            prop_assert!(open(&k, "n1", "l/a", &tampered).is_err(), "{}", tampered);
        }

        /// Length prefixes keep the three parts apart: moving bytes across a boundary
        /// changes the tag.
        #[test]
        fn parts_do_not_run_together(a in "[a-z]{0,6}", b in "[a-z]{0,6}", c in "[a-z]{0,6}", cut in 0usize..18) {
            let k = key(SECRET);
            let joined = format!("{a}{b}{c}");
            let cut1 = cut.min(joined.len());
            let (a2, rest) = joined.split_at(cut1);
            let cut2 = (cut / 2).min(rest.len());
            let (b2, c2) = rest.split_at(cut2);
            prop_assume!((a2, b2, c2) != (a.as_str(), b.as_str(), c.as_str()));
            let v = seal(&k, &a, &b, &c);
            let moved = format!("{c2}~{}", &v[c.len() + 1..]);
            prop_assert_eq!(open(&k, a2, b2, &moved), Err(MacError::Mismatch));
        }
    }
}
