//! tally-gossip: how tally's replicated state travels between nodes (DESIGN.md §4).
//!
//! This crate owns the gossip format: what each key in a node's chitchat state means
//! ([`keys`]), how payloads are written ([`values`]), and the MAC that seals every value
//! to its publisher and key under the cluster key ([`mac`]). It will also own the chitchat
//! glue (publishing, relays of departed nodes, the transport seam); nothing else in tally
//! knows chitchat, and nothing here decides what a value means for counting: merges and
//! decisions stay in tally-core.
//!
//! `keys`, `values` and `mac` are pure: plain strings in, plain values out. `cluster` runs
//! chitchat; its network is a [`Transport`] (UDP in production, simulated in `sim/`).
//! Decoders never panic on peer input; they return `None` or an error value, and the
//! caller ignores and counts what it cannot read.
//!
//! A published value is built in three steps, each reversible by the receiver:
//! `payload = values::encode_*(…)`, `value = mac::seal(key, me, &gossip_key.encode(),
//! &payload)`, and on receipt `mac::open` → `values::decode_*` → check that the record
//! matches its `GossipKey`.

pub mod cluster;
pub mod keys;
pub mod mac;
mod text;
pub mod values;

pub use chitchat::transport::{ChannelTransport, RecvOutcome, SendOutcome, Socket, Transport};
pub use chitchat::{ChitchatEnvelope, ChitchatMessage};
pub use cluster::{
    Gossip, GossipConfig, GossipError, GossipNetwork, GossipStats, Incoming, Member, udp_transport,
};
pub use keys::{
    DECOMMISSION_PREFIX, DEMAND_PREFIX, ENTITY_PREFIX, GRANT_PREFIX, GossipKey, HELLO_KEY,
    LIMIT_PREFIX, RELAY_PREFIX, RESET_PREFIX, SLOT_PREFIX,
};
pub use mac::{ClusterKey, KeyError, MacError, open, seal};
pub use values::{
    Demand, PAYLOAD_BYTES_MAX, VALUE_BYTES_MAX, ValueError, decode_demand, decode_hello,
    decode_record, decode_slot, encode_demand, encode_hello, encode_record, encode_slot,
};
