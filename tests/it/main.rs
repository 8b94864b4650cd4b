//! Black-box tests of the real `tally` binary on loopback (one integration binary per crate).
//!
//! Every test starts its own node(s) through `tally_tests::Node`, talks HTTP as a gateway
//! would, and names in a comment the DESIGN.md §3 invariants it checks.
//!
//! - `api`: the HTTP contract of API.md, bad input (I8) and auth.
//! - `contract`: every reply read as its `tally_api` type and written back byte for byte;
//!   `/openapi.json`; 405 for a method a path lacks (I8).
//! - `cli`: the `tally` client commands against a node: tables, `--json`, exit codes.
//! - `periods`: rolling and calendar-aligned periods, epochs of recorded events (I5).
//! - `crash`: SIGKILL / SIGTERM under concurrent load (I1, I2, I3).
//! - `disk_full`: the data directory on a small tmpfs that fills up under load: 503 while
//!   full, writes resume once space is freed (I1, I2); run by `tests/disk_full.sh` (root).
//! - `cluster`: fleets gossiping on loopback: replication, a crash under load, a node
//!   removed for good, a wrong cluster key, readiness (I1, I3, I4).
//! - `hard`: hard limits: reservations, overrun, restart and crash, rights moving to
//!   the busy node of a fleet, decommission (I7, I8).
//! - `hostile`: thousands of slow connections, trickled headers and bodies (I8, bounds).
//! - `prices`: usage and checks priced from token counts; access rules of entities;
//!   `tally prices import` (I1, I4, I8).
//! - `proxies`: forward-auth, usage from access-log lines, envoyproxy/ratelimit import
//!   (I2, I8).
//! - `metrics`: `/metrics` histograms count exactly the requests sent; per-limit series
//!   are opt-in; process metrics; gossip lag and bytes in a fleet of two.
//! - `ui`: what `/ui` serves and its headers; `/v1/whoami` and `/v1/denials` (I8).

mod api;
mod cli;
mod cluster;
mod contract;
mod crash;
mod disk_full;
mod hard;
mod hostile;
mod metrics;
mod periods;
mod prices;
mod proxies;
mod ui;
