//! Black-box tests of the real `tally` binary on loopback (one integration binary per crate).
//!
//! Every test starts its own node(s) through `tally_tests::Node`, talks HTTP as a gateway
//! would, and names in a comment the DESIGN.md §3 invariants it checks.
//!
//! - `api`: the HTTP contract of API.md, bad input (I8) and auth.
//! - `cli`: the `tally` client commands against a node: tables, `--json`, exit codes.
//! - `periods`: rolling and calendar-aligned periods, epochs of recorded events (I5).
//! - `crash`: SIGKILL / SIGTERM under concurrent load (I1, I2, I3).
//! - `cluster`: fleets gossiping on loopback: replication, a crash under load, a node
//!   removed for good, a wrong cluster key (I1, I3, I4).
//! - `ui`: what `/ui` serves and its headers; `/v1/whoami` and `/v1/denials` (I8).

mod api;
mod cli;
mod cluster;
mod crash;
mod periods;
mod ui;
