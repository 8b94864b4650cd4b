//! Logging for `tally serve`: text on stderr, filtered by `RUST_LOG` (default `info`), and
//! a guard against log floods from the gossip port.
//!
//! chitchat logs a WARN line for every datagram on the gossip port that is not a chitchat
//! message (`invalid-chitchat-payload`): a port scan or a misdirected sender can write
//! thousands of lines a second. Those events are counted instead
//! ([`gossip_datagrams_invalid`], exported as `tally_gossip_datagrams_invalid_total`) and
//! summarised at most once a minute by [`summarise_invalid_datagrams`].

use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

/// The chitchat module that warns about undecodable datagrams.
const CHITCHAT_UDP: &str = "chitchat::transport::udp";
/// How often at most a summary of them is logged.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

static INVALID: AtomicU64 = AtomicU64::new(0);
static LAST_FROM: Mutex<String> = Mutex::new(String::new());

/// Datagrams on the gossip port that were not chitchat messages, since start.
pub fn gossip_datagrams_invalid() -> u64 {
    INVALID.load(Ordering::Relaxed)
}

fn is_datagram_warning(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() == CHITCHAT_UDP && *meta.level() == Level::WARN
}

/// Counts chitchat's per-datagram warnings and remembers the last sender.
struct CountDatagrams;

impl<S: Subscriber> Layer<S> for CountDatagrams {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if !is_datagram_warning(event.metadata()) {
            return;
        }
        struct From(Option<String>);
        impl Visit for From {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "from" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        let mut from = From(None);
        event.record(&mut from);
        INVALID.fetch_add(1, Ordering::Relaxed);
        if let (Some(f), Ok(mut last)) = (from.0, LAST_FROM.lock()) {
            *last = f;
        }
    }
}

/// Text logs on stderr, filtered by `rust_log` (the value of RUST_LOG; default `info`),
/// without chitchat's per-datagram warnings (counted instead).
pub fn init(rust_log: Option<&str>) {
    let filter = rust_log
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let text = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter_fn(|meta| !is_datagram_warning(meta)));
    tracing_subscriber::registry()
        .with(filter)
        .with(CountDatagrams)
        .with(text)
        .init();
}

/// Logs, at most once per [`SUMMARY_EVERY`], how many invalid datagrams arrived since the
/// last summary. Runs until the process ends.
pub async fn summarise_invalid_datagrams() {
    let mut reported = 0;
    loop {
        tokio::time::sleep(SUMMARY_EVERY).await;
        let now = gossip_datagrams_invalid();
        if now > reported {
            let last_from = LAST_FROM.lock().map(|l| l.clone()).unwrap_or_default();
            tracing::warn!(
                datagrams = now - reported,
                last_from = %last_from,
                "datagrams on the gossip port that are not chitchat messages were dropped; \
                 if this repeats, check what sends to this port (a scanner, a node of another \
                 tally version) and firewall it"
            );
            reported = now;
        }
    }
}
