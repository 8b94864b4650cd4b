//! The command line of API.md against a real node: every client command, its table and
//! its `--json` output, exit codes, and the token from `--token` or `TALLY_TOKEN`.
//! Checks I8 through the CLI too: a refused command changes nothing.

use std::process::{Command, Output};

use serde_json::{Value, json};
use tally_tests::{Node, NodeOpts, tally_bin};

/// One `tally` client command: its exit status, stdout and stderr.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

fn tally(url: &str, env_token: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = Command::new(tally_bin());
    cmd.args(args)
        .arg("--url")
        .arg(url)
        .env_remove("TALLY_TOKEN");
    if let Some(t) = env_token {
        cmd.env("TALLY_TOKEN", t);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run tally");
    Run {
        ok: status.success(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// The data rows of the table in `text` (the lines after its `ID …` header), split on
/// runs of spaces.
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("ID "))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The test reads usage back from a calendar month (UTC) and a calendar day
/// (Europe/Berlin): if either period ended while it ran, the usage would be history and
/// the test would fail for no fault of tally. Within `margin` of either boundary, this
/// waits until both are safely behind (at most `margin` plus a second, once a day).
fn wait_out_period_ends(margin: std::time::Duration) {
    use jiff::{ToSpan as _, Zoned};
    let now = jiff::Timestamp::now();
    let utc = now.to_zoned(jiff::tz::TimeZone::UTC);
    let month_end = utc
        .first_of_month()
        .and_then(|d| d.start_of_day())
        .and_then(|d| d.checked_add(1.month()))
        .expect("next month");
    let berlin: Zoned = now.in_tz("Europe/Berlin").expect("Europe/Berlin");
    let day_end = berlin
        .tomorrow()
        .and_then(|d| d.start_of_day())
        .expect("tomorrow");
    for end in [month_end.timestamp(), day_end.timestamp()] {
        let until = end.as_millisecond() - now.as_millisecond();
        if until >= 0 && (until as u128) < margin.as_millis() {
            eprintln!("a period ends at {end}: waiting {until} ms so the test runs in one period");
            std::thread::sleep(std::time::Duration::from_millis(until as u64 + 1_000));
        }
    }
}

#[test]
fn client_commands_print_tables_and_json() {
    // The whole test takes a few seconds, a minute at most on a loaded machine.
    wait_out_period_ends(std::time::Duration::from_secs(120));
    let node = Node::single();
    let url = node.url();
    let run = |args: &[&str]| {
        let r = tally(url, None, args);
        assert!(r.ok, "tally {args:?} failed: {}{}", r.stdout, r.stderr);
        r
    };

    let put = run(&[
        "limits",
        "put",
        "team-eng-monthly",
        "--scope",
        "team=eng",
        "--metric",
        "cost",
        "--max",
        "100",
        "--period",
        "1M",
        "--calendar-aligned",
        "--json",
    ]);
    let v = put.json();
    assert_eq!(
        (&v["id"], &v["scope"], &v["metric"], &v["max"], &v["period"]),
        (
            &json!("team-eng-monthly"),
            &json!({"team": "eng"}),
            &json!("cost"),
            &json!(100.0),
            &json!("1M")
        )
    );
    assert_eq!(v["calendar_aligned"], true);
    run(&[
        "limits",
        "put",
        "vk-tokens",
        "--scope",
        "virtual_key=vk-1",
        "--metric",
        "tokens",
        "--max",
        "5000",
        "--period",
        "1d",
        "--timezone",
        "Europe/Berlin",
    ]);
    let e = run(&[
        "entities",
        "put",
        "virtual_key/vk-1",
        "--parent",
        "team=eng",
        "--json",
    ])
    .json();
    assert_eq!(
        e,
        json!({"dimension": "virtual_key", "value": "vk-1", "parents": {"team": "eng"}})
    );

    // check: a table of both applicable limits, and the same in JSON.
    let c = run(&["check", "--attr", "virtual_key=vk-1", "--cost", "0.02"]);
    assert!(c.stdout.starts_with("ALLOWED"), "{}", c.stdout);
    let ids: Vec<String> = rows(&c.stdout).iter().map(|r| r[0].clone()).collect();
    assert_eq!(ids, ["team-eng-monthly", "vk-tokens"]);
    let cj = run(&[
        "check",
        "--attr",
        "virtual_key=vk-1",
        "--tokens",
        "6000",
        "--json",
    ])
    .json();
    assert_eq!(cj["allowed"], false);
    assert_eq!(cj["denied_by"], json!(["vk-tokens"]));

    // usage: applied once, then a repeat is not applied again.
    let usage = [
        "usage",
        "--id",
        "req-7f3a",
        "--attr",
        "virtual_key=vk-1",
        "--cost",
        "0.0123",
        "--tokens",
        "1800",
    ];
    let u = run(&[&usage[..], &["--json"]].concat()).json();
    assert_eq!(u["applied"], true);
    let again = run(&usage);
    assert!(again.stdout.contains("not applied"), "{}", again.stdout);

    // limits list / get show the usage.
    let list = run(&["limits", "list"]);
    let table = rows(&list.stdout);
    assert_eq!(table.len(), 2, "{}", list.stdout);
    assert_eq!(table[0][0], "team-eng-monthly");
    assert_eq!(table[0][3], "0.0123", "{}", list.stdout);
    let g = run(&["limits", "get", "vk-tokens", "--json"]).json();
    assert_eq!(
        (g["used"].clone(), g["remaining"].clone()),
        (json!(1800), json!(3200))
    );
    assert_eq!(g["timezone"], "Europe/Berlin");
    let listed = run(&["limits", "list", "--json"]).json();
    assert_eq!(listed["limits"].as_array().map(Vec::len), Some(2));

    // reset with a baseline, then delete.
    let r = run(&[
        "limits",
        "reset",
        "team-eng-monthly",
        "--used",
        "40",
        "--json",
    ])
    .json();
    assert_eq!(r["used"], json!(40.0));
    let d = run(&["limits", "delete", "vk-tokens"]);
    assert!(d.stdout.contains("deleted"), "{}", d.stdout);
    assert_eq!(rows(&run(&["limits", "list"]).stdout).len(), 1);

    // status and the health probe.
    let s = run(&["status"]);
    assert!(s.stdout.contains("healthy  yes"), "{}", s.stdout);
    assert!(s.stdout.contains("ready    yes"), "{}", s.stdout);
    assert!(s.stdout.contains(node.node_id()), "{}", s.stdout);
    let h = run(&["status", "--health-only"]);
    assert_eq!(h.stdout, "healthy  yes\n");
}

#[test]
fn refused_commands_exit_non_zero_and_change_nothing() {
    let node = Node::start(
        NodeOpts::default()
            .arg("--admin-token")
            .arg("adm")
            .arg("--client-token")
            .arg("cli"),
    );
    let url = node.url();
    let spec = [
        "limits", "put", "l", "--metric", "requests", "--max", "3", "--period", "1h",
    ];
    // No token, then a client token: 401 and 403, nothing written.
    let r = tally(url, None, &spec);
    assert!(
        !r.ok && r.stderr.contains("unauthenticated"),
        "{}",
        r.stderr
    );
    let r = tally(url, Some("cli"), &spec);
    assert!(
        !r.ok && r.stderr.contains("permission_denied"),
        "{}",
        r.stderr
    );
    let r = tally(url, Some("cli"), &["limits", "list", "--json"]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.json(), json!({"limits": []}));
    // The admin token from the environment, or from --token, may write.
    assert!(tally(url, Some("adm"), &spec).ok);
    let mut with_flag = spec.to_vec();
    with_flag[2] = "l2";
    with_flag.extend(["--token", "adm"]);
    assert!(tally(url, None, &with_flag).ok);
    // Bad input is refused by the server with its error code, and changes nothing.
    let r = tally(
        url,
        Some("adm"),
        &[
            "limits", "put", "l", "--metric", "requests", "--max", "3", "--period", "0h",
        ],
    );
    assert!(
        !r.ok && r.stderr.contains("invalid_argument"),
        "{}",
        r.stderr
    );
    let r = tally(url, Some("cli"), &["limits", "get", "missing"]);
    assert!(!r.ok && r.stderr.contains("not_found"), "{}", r.stderr);
    let r = tally(url, Some("cli"), &["limits", "get", "l", "--json"]);
    assert_eq!(r.json()["period"], "1h");
    // The health probe needs no token; a dead URL fails.
    assert!(tally(url, None, &["status", "--health-only"]).ok);
    assert!(!tally("http://127.0.0.1:9", None, &["status", "--health-only"]).ok);
}

/// `tally limits history`: the periods of a limit, newest first, as a table and as JSON;
/// a bad `--limit` is refused by the node with its message.
#[test]
fn limits_history_prints_periods() {
    let node = Node::single();
    let url = node.url();
    let run = |args: &[&str]| tally(url, None, args);
    assert!(
        run(&[
            "limits", "put", "daily", "--metric", "cost", "--max", "10", "--period", "1d"
        ])
        .ok
    );
    assert!(run(&["usage", "--id", "u-1", "--cost", "2.5"]).ok);
    assert!(run(&["usage", "--id", "u-2", "--cost", "0.25"]).ok);
    let table = run(&["limits", "history", "daily"]);
    assert!(table.ok, "{}{}", table.stdout, table.stderr);
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", table.stdout);
    assert!(lines[0].starts_with("PERIOD_START"), "{}", table.stdout);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row[2..],
        ["2.75", &format!("{}=2.75", node.node_id()), "current"],
        "{}",
        table.stdout
    );
    let j = run(&["limits", "history", "daily", "--limit", "1", "--json"]).json();
    assert_eq!(j["epochs"].as_array().unwrap().len(), 1);
    assert_eq!(j["epochs"][0]["used"], json!(2.75));
    let bad = run(&["limits", "history", "daily", "--since", "last week"]);
    assert!(!bad.ok);
    assert!(bad.stderr.contains("invalid_argument"), "{}", bad.stderr);
    let missing = run(&["limits", "history", "nope"]);
    assert!(!missing.ok);
    assert!(missing.stderr.contains("not_found"), "{}", missing.stderr);
}
