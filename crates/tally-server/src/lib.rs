//! tally-server: the `tally` binary's library half — the HTTP API, configuration and the
//! command line (DESIGN.md §4, §5; API.md).
//!
//! Codemap: `cli` parses arguments (clap), `config` resolves `tally serve` settings from
//! flags, environment, file and defaults, `client` implements the client commands over
//! HTTP, `serve` runs a node, `ui` serves the dashboard at `/ui` and the endpoints
//! only it needs. Only this crate knows HTTP and JSON.

pub mod cli;
pub mod client;
pub mod config;
pub mod http;
pub mod json;
pub mod logging;
pub mod metrics;
pub mod prices;
pub mod proxies;
pub mod serve;
pub mod ui;
