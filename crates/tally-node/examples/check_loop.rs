//! Runs `Node::check` N times, allowed or denied, for instruction counts under
//! callgrind (BENCHMARKS.md, issue 16): the difference between two values of N, divided
//! by their difference, is the instructions one check costs, free of the timing noise of
//! a shared machine.
//!
//! `cargo run --release -p tally-node --example check_loop -- allowed|denied N`

use tally_core::{Amounts, LimitInput, Metric, Micros};
use tally_node::{Node, NodeConfig};

const ATTRS: [(&str, &str); 5] = [
    ("virtual_key", "vk-0"),
    ("team", "team-0"),
    ("customer", "cust-0"),
    ("provider", "openai"),
    ("model", "gpt-4o"),
];

fn limit(scope: &[(&str, &str)], max: u64) -> LimitInput {
    LimitInput {
        scope: scope
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        metric: Metric::Cost,
        max,
        period: "1M".parse().expect("period"),
        calendar_aligned: true,
        timezone: "UTC".into(),
        mode: Default::default(),
        members: Vec::new(),
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let denied = args.next().as_deref() == Some("denied");
    let n: u64 = args.next().unwrap_or_else(|| "1000".into()).parse()?;
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let node = Node::open(NodeConfig::new(dir.path()))?;
    rt.block_on(async {
        for (i, (k, v)) in ATTRS.iter().enumerate().take(3) {
            node.put_limit(&format!("l{i}"), limit(&[(k, v)], 1_000_000_000_000_000))
                .await?;
        }
        node.put_limit("pm", limit(&ATTRS[3..], 1_000_000_000_000_000))
            .await?;
        // Denies every check that asks for more than 1 USD.
        node.put_limit("global", limit(&[], 1_000_000)).await?;
        anyhow::Ok(())
    })?;
    let ask = Amounts {
        cost: Micros(if denied { 2_000_000 } else { 0 }),
        tokens: 0,
        requests: 1,
    };
    let mut allowed = 0u64;
    for _ in 0..n {
        allowed += u64::from(std::hint::black_box(node.check(&ATTRS, ask)).allowed);
    }
    assert_eq!(allowed, if denied { 0 } else { n });
    rt.block_on(node.shutdown());
    Ok(())
}
