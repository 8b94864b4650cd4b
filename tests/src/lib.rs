//! Black-box harness for the real `tally` binary.
//!
//! Owns: building the binary once per test process, running nodes on loopback with a
//! temporary data directory that survives restarts, killing them (SIGKILL / SIGTERM), a
//! small blocking HTTP client for the contract in API.md, fleets of gossiping nodes (free UDP
//! ports, the gossip flags, `/v1/cluster` and `/metrics` readers) and bounded polling. It knows nothing of the server's
//! internals: everything goes through the process boundary and HTTP, as a gateway would.
//!
//! Must not touch: any crate of the workspace (the tests see only the binary).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use serde_json::{Value, json};

/// How long a node may take to print its listening line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM (drain, commit, exit 0).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Per-request bound, so a wedged server fails a test instead of hanging it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Log lines kept per node for failure reports (oldest dropped first).
const LOG_LINES_MAX: usize = 4000;
/// The marker of the one line the server prints when it serves (API.md, Command line).
const LISTENING_PREFIX: &str = "tally listening on http://";

/// An HTTP reply: status and body parsed as JSON. A body that is not JSON becomes a JSON
/// string holding the raw text, so a failing assertion shows what came back.
pub type Reply = (u16, Value);

// ---------------------------------------------------------------------------------------
// The binary.

/// Path of the `tally` binary, built once per test process.
///
/// `TALLY_BIN` overrides the build (handy when running against an installed binary).
/// Otherwise runs `$CARGO build -p tally-server --bin tally` in the workspace root, in release
/// mode iff this test binary was built without debug assertions.
pub fn tally_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(build_tally)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace root")
        .to_path_buf()
}

fn build_tally() -> PathBuf {
    if let Some(bin) = std::env::var_os("TALLY_BIN") {
        return PathBuf::from(bin);
    }
    let root = workspace_root();
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "-p", "tally-server", "--bin", "tally"]);
    if release {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("spawn cargo build");
    assert!(
        out.status.success(),
        "cargo build -p tally-server --bin tally failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        // A relative target dir is relative to where cargo ran: the workspace root.
        Some(dir) => root.join(dir),
        None => root.join("target"),
    };
    let bin = target
        .join(if release { "release" } else { "debug" })
        .join(format!("tally{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "built tally but {} is missing",
        bin.display()
    );
    bin
}

// ---------------------------------------------------------------------------------------
// Nodes.

/// Extra command-line arguments for `tally serve` (after `--listen` and `--data-dir`).
#[derive(Clone, Debug, Default)]
pub struct NodeOpts {
    pub args: Vec<String>,
}

impl NodeOpts {
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }
}

/// One `tally serve` process on loopback. The data directory is a [`tempfile::TempDir`] owned
/// by this value, so it outlives restarts and is removed when the test ends.
pub struct Node {
    opts: NodeOpts,
    data_dir: PathBuf,
    /// Removes the data directory when the node was given a temporary one.
    _temp: Option<tempfile::TempDir>,
    child: Option<Child>,
    url: String,
    node_id: String,
    logs: Arc<Mutex<Vec<String>>>,
    agent: ureq::Agent,
}

impl Node {
    /// A single node with no tokens (the server then only listens on loopback).
    pub fn single() -> Node {
        Node::start(NodeOpts::default())
    }

    /// Spawns `tally serve --listen 127.0.0.1:0 --data-dir <tmp> [opts.args]` and waits for
    /// its listening line. Panics (with the node's output) if it does not come up.
    pub fn start(opts: NodeOpts) -> Node {
        let temp = tempfile::Builder::new()
            .prefix("tally-it-")
            .tempdir()
            .expect("create data dir");
        Node::start_at(temp.path().to_path_buf(), Some(temp), opts)
    }

    /// Like [`Node::start`], with the data directory at `data_dir` (created by the node if
    /// missing, left in place afterwards).
    pub fn start_in(data_dir: &Path, opts: NodeOpts) -> Node {
        Node::start_at(data_dir.to_path_buf(), None, opts)
    }

    fn start_at(data_dir: PathBuf, temp: Option<tempfile::TempDir>, opts: NodeOpts) -> Node {
        let mut node = Node {
            opts,
            data_dir,
            _temp: temp,
            child: None,
            url: String::new(),
            node_id: String::new(),
            logs: Arc::new(Mutex::new(Vec::new())),
            agent: agent(),
        };
        node.spawn();
        node
    }

    /// Base URL, `http://127.0.0.1:PORT` (changes on restart).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The node id the server printed on its last start.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Process id of the running server. Panics if it is not running.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is not running").id()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A client for this node's current URL with no token.
    pub fn client(&self) -> Client {
        Client {
            agent: self.agent.clone(),
            base: self.url.clone(),
            token: None,
        }
    }

    /// A client for this node's current URL sending `Authorization: Bearer <token>`.
    pub fn client_as(&self, token: Option<&str>) -> Client {
        self.client().with_token(token)
    }

    pub fn get(&self, path: &str) -> Reply {
        self.client().get(path)
    }

    pub fn put(&self, path: &str, body: Value) -> Reply {
        self.client().put(path, body)
    }

    pub fn post(&self, path: &str, body: Value) -> Reply {
        self.client().post(path, body)
    }

    pub fn delete(&self, path: &str) -> Reply {
        self.client().delete(path)
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> Reply {
        self.client().post_raw(path, body)
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap. No drain, no commit.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An already-exited child makes kill fail; wait still reaps it.
            let _ = child.kill();
            child.wait().expect("wait for killed tally");
            self.log_line("harness", "--- SIGKILL ---");
        }
    }

    /// SIGTERM and wait (bounded by [`EXIT_TIMEOUT`]) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.pid().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill -TERM");
        assert!(sent.success(), "kill -TERM {pid} failed: {sent}");
        self.wait_exit()
    }

    /// Waits (bounded by [`EXIT_TIMEOUT`]) for the process to exit, after a signal the
    /// caller sent, and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("node is not running");
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait tally") {
                self.log_line("harness", &format!("--- exited {status} ---"));
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.dump_logs();
                panic!("tally did not exit within {EXIT_TIMEOUT:?} of the signal");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data directory with the same arguments
    /// (SIGKILLs it first if it is still running). The port may change.
    pub fn restart(&mut self) {
        self.kill9();
        self.log_line("harness", "--- restart ---");
        self.spawn();
    }

    /// Whether the process is still running (reaps it if it exited on its own).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => child.try_wait().expect("try_wait tally").is_none(),
        }
    }

    /// The node's captured stdout/stderr lines so far (the newest few thousand), each
    /// prefixed with its stream.
    pub fn log_lines(&self) -> Vec<String> {
        self.logs.lock().expect("log lock").clone()
    }

    /// Prints the node's captured stdout/stderr to the test's stderr.
    pub fn dump_logs(&self) {
        let logs = self.logs.lock().expect("log lock");
        eprintln!(
            "==== tally node {} ({}) output, {} lines ====",
            self.node_id,
            self.url,
            logs.len()
        );
        for line in logs.iter() {
            eprintln!("{line}");
        }
        eprintln!("==== end of tally output ====");
    }

    fn log_line(&self, stream: &str, line: &str) {
        push_log(&self.logs, stream, line);
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "spawn while a child is running");
        let mut cmd = Command::new(tally_bin());
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&self.data_dir)
            .args(&self.opts.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Flags win over env, but a stray TALLY_SEED or TALLY_ADMIN_TOKEN in the developer's
        // shell must not leak into a test that does not set the flag.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TALLY_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", tally_bin().display()));
        let (tx, rx) = mpsc::channel();
        drain(
            "stdout",
            child.stdout.take().expect("piped"),
            self.logs.clone(),
            Some(tx),
        );
        drain(
            "stderr",
            child.stderr.take().expect("piped"),
            self.logs.clone(),
            None,
        );
        let deadline = Instant::now() + START_TIMEOUT;
        let (url, node_id) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(found) = parse_listening(&line) {
                        break found;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.dump_logs();
                    panic!("tally printed no `{LISTENING_PREFIX}` line within {START_TIMEOUT:?}");
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait tally");
                    // Let the stderr thread catch up before dumping.
                    std::thread::sleep(Duration::from_millis(100));
                    self.dump_logs();
                    panic!("tally exited ({status}) before printing its listening line");
                }
            }
        };
        self.url = url;
        self.node_id = node_id;
        self.child = Some(child);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `tally listening on http://ADDR node=ID` → (`http://ADDR`, `ID`). Tolerates a log prefix
/// before the marker.
pub fn parse_listening(line: &str) -> Option<(String, String)> {
    let at = line.find(LISTENING_PREFIX)?;
    let rest = &line[at + "tally listening on ".len()..];
    let mut words = rest.split_whitespace();
    let url = words.next()?.to_string();
    let node_id = words.next()?.strip_prefix("node=")?.to_string();
    if node_id.is_empty() || url.len() <= "http://".len() {
        return None;
    }
    Some((url, node_id))
}

fn push_log(logs: &Mutex<Vec<String>>, stream: &str, line: &str) {
    let mut logs = logs.lock().expect("log lock");
    if logs.len() >= LOG_LINES_MAX {
        logs.remove(0);
    }
    logs.push(format!("[{stream}] {line}"));
}

/// Reads `pipe` to its end on a thread, so the child never blocks on a full pipe.
fn drain(
    stream: &'static str,
    pipe: impl Read + Send + 'static,
    logs: Arc<Mutex<Vec<String>>>,
    lines: Option<mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']);
                    push_log(&logs, stream, line);
                    if let Some(tx) = &lines {
                        // The receiver is gone once the node is up; keep draining anyway.
                        let _ = tx.send(line.to_string());
                    }
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------
// HTTP.

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        // 4xx/5xx are answers to assert on, not transport errors.
        .http_status_as_error(false)
        .timeout_global(Some(REQUEST_TIMEOUT))
        // Loopback only: never route through a proxy from the environment.
        .proxy(None)
        .build()
        .into()
}

/// A blocking client for one node's base URL. Cheap to clone and `Send`.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client for `base` (`http://127.0.0.1:PORT`), with no token.
    pub fn new(base: &str) -> Client {
        Client {
            agent: agent(),
            base: base.to_string(),
            token: None,
        }
    }

    pub fn with_token(&self, token: Option<&str>) -> Client {
        Client {
            token: token.map(str::to_string),
            ..self.clone()
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request; `Err` only for transport failures (refused, reset, timeout).
    /// `body`, if any, is sent as `application/json` verbatim.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, String), ureq::Error> {
        let url = format!("{}{}", self.base, path);
        let bearer = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let response = match method {
            "GET" | "DELETE" => {
                let mut req = if method == "GET" {
                    self.agent.get(&url)
                } else {
                    self.agent.delete(&url)
                };
                if let Some(b) = &bearer {
                    req = req.header("authorization", b);
                }
                req.call()?
            }
            "PUT" | "POST" => {
                let mut req = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                if let Some(b) = &bearer {
                    req = req.header("authorization", b);
                }
                req.header("content-type", "application/json")
                    .send(body.unwrap_or(b""))?
            }
            other => panic!("unsupported method {other}"),
        };
        let status = response.status().as_u16();
        let text = response.into_body().read_to_string()?;
        Ok((status, text))
    }

    /// One request with a JSON body; panics on transport failure.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("serialize body"));
        self.request_bytes(method, path, bytes.as_deref())
    }

    fn request_bytes(&self, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
        match self.try_request(method, path, body) {
            Ok((status, text)) => (status, parse_body(&text)),
            Err(e) => panic!("{method} {}{path}: transport error: {e}", self.base),
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, None)
    }

    pub fn put(&self, path: &str, body: Value) -> Reply {
        self.request("PUT", path, Some(&body))
    }

    pub fn post(&self, path: &str, body: Value) -> Reply {
        self.request("POST", path, Some(&body))
    }

    pub fn delete(&self, path: &str) -> Reply {
        self.request("DELETE", path, None)
    }

    /// POST of raw bytes labelled `application/json` (malformed JSON, oversized bodies).
    pub fn post_raw(&self, path: &str, body: &[u8]) -> Reply {
        self.request_bytes("POST", path, Some(body))
    }

    /// PUT of raw bytes labelled `application/json`.
    pub fn put_raw(&self, path: &str, body: &[u8]) -> Reply {
        self.request_bytes("PUT", path, Some(body))
    }

    /// POST over a plain TCP connection that reads the reply while still writing the body.
    ///
    /// For bodies the server must refuse by size (413): it may answer and close before it
    /// has read the body, and a client that only reads after writing everything would see
    /// a broken pipe instead of the answer.
    pub fn post_oversized(&self, path: &str, body: &[u8]) -> Reply {
        let addr = self
            .base
            .strip_prefix("http://")
            .expect("base URL is http://HOST:PORT");
        let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .expect("set read timeout");
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        head.push_str("\r\n");
        let mut writer = stream.try_clone().expect("clone stream");
        let body = body.to_vec();
        let write = std::thread::spawn(move || {
            // Errors are expected once the server has answered and closed.
            let _ = writer.write_all(head.as_bytes());
            let _ = writer.write_all(&body);
        });
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        while http_response_end(&buf).is_none() {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        // Wakes the writer if it is blocked on a server that stopped reading.
        let _ = stream.shutdown(Shutdown::Both);
        write.join().expect("writer thread");
        parse_http_response(&buf).unwrap_or_else(|| {
            panic!(
                "POST {path}: no HTTP response, got {:?}",
                String::from_utf8_lossy(&buf)
            )
        })
    }

    /// GET returning the body as text (for `/metrics`).
    pub fn get_text(&self, path: &str) -> (u16, String) {
        self.try_request("GET", path, None)
            .unwrap_or_else(|e| panic!("GET {}{path}: transport error: {e}", self.base))
    }
}

/// Where a complete HTTP/1.1 response in `buf` ends, if it is complete (Content-Length or
/// chunked; a response with neither ends at EOF, which the caller sees as `None` here).
fn http_response_end(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return (buf.len() >= head_end + len).then_some(head_end + len);
    }
    if head.contains("transfer-encoding: chunked") {
        return buf.ends_with(b"0\r\n\r\n").then_some(buf.len());
    }
    None
}

/// Status and JSON body of a raw HTTP/1.1 response (complete or cut at EOF).
fn parse_http_response(buf: &[u8]) -> Option<Reply> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let end = http_response_end(buf).unwrap_or(buf.len());
    let mut raw = &buf[head_end..end];
    let mut body = Vec::new();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        loop {
            let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
            let size_text = String::from_utf8_lossy(&raw[..line_end]).to_string();
            let size_hex = size_text.split(';').next()?.trim().to_string();
            let size = usize::from_str_radix(&size_hex, 16).ok()?;
            if size == 0 {
                break;
            }
            let start = line_end + 2;
            body.extend_from_slice(raw.get(start..start + size)?);
            raw = raw.get(start + size + 2..)?;
        }
    } else {
        body.extend_from_slice(raw);
    }
    Some((status, parse_body(&String::from_utf8_lossy(&body))))
}

fn parse_body(text: &str) -> Value {
    if text.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(format!("<not JSON> {text}")))
}

// ---------------------------------------------------------------------------------------
// Assertions shared by the suites.

/// Asserts a 200 reply and returns its body.
#[track_caller]
pub fn ok(reply: Reply) -> Value {
    let (status, body) = reply;
    assert_eq!(status, 200, "expected 200, got {status}: {body}");
    body
}

/// Asserts `status` and the exact error shape `{"error": {"code": code, "message": "..."}}`
/// (no other fields, message a non-empty string).
#[track_caller]
pub fn assert_error(reply: &Reply, status: u16, code: &str) {
    if let Err(e) = try_error(reply, status, code) {
        panic!("{e}");
    }
}

/// [`assert_error`] as a value.
pub fn try_error(reply: &Reply, status: u16, code: &str) -> Result<(), String> {
    let (got, body) = reply;
    if (*got, body["error"]["code"].as_str()) != (status, Some(code)) {
        return Err(format!("expected {status} {code}, got {got}: {body}"));
    }
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort_unstable();
        k
    };
    if keys(body) != ["error"] || keys(&body["error"]) != ["code", "message"] {
        return Err(format!(
            "error shape must be {{\"error\": {{\"code\", \"message\"}}}}, got {body}"
        ));
    }
    match body["error"]["message"].as_str() {
        Some(m) if !m.is_empty() => Ok(()),
        _ => Err(format!("error message must be a non-empty string: {body}")),
    }
}

/// Asserts `value` is an object with exactly these keys.
#[track_caller]
pub fn assert_keys(value: &Value, keys: &[&str]) {
    let obj = value
        .as_object()
        .unwrap_or_else(|| panic!("expected an object, got {value}"));
    let mut got: Vec<&str> = obj.keys().map(String::as_str).collect();
    got.sort_unstable();
    let mut want = keys.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "keys of {value}");
}

/// A JSON number as integer micro-units, the server's storage unit for money. Exact for
/// every value the server can hold, and insensitive to `2` vs `2.0` in the encoding.
#[track_caller]
pub fn micros(value: &Value) -> i128 {
    if let Some(n) = value.as_u64() {
        return i128::from(n) * 1_000_000;
    }
    if let Some(n) = value.as_i64() {
        return i128::from(n) * 1_000_000;
    }
    let f = value
        .as_f64()
        .unwrap_or_else(|| panic!("expected a number, got {value}"));
    (f * 1e6).round() as i128
}

/// `value` as a count (tokens, requests): a non-negative integer, possibly encoded `2.0`.
#[track_caller]
pub fn count(value: &Value) -> u64 {
    let m = micros(value);
    assert!(
        m >= 0 && m % 1_000_000 == 0,
        "expected a whole count, got {value}"
    );
    (m / 1_000_000) as u64
}

/// Asserts every field of `expected` is in `actual` with the same value, recursively for
/// objects. Numbers compare by value at micro precision (so `2`, `2.0` and `2.0000000001`
/// agree); everything else compares exactly. Fields of `actual` absent from `expected` are
/// not compared (pair with [`assert_keys`] to pin the field set).
#[track_caller]
pub fn assert_matches(actual: &Value, expected: &Value) {
    if let Err(e) = try_matches(actual, expected) {
        panic!("{e}");
    }
}

/// [`assert_matches`] as a value: `Err` describes the first mismatch.
pub fn try_matches(actual: &Value, expected: &Value) -> Result<(), String> {
    matches_at(actual, expected, String::new())
        .map_err(|at| format!("mismatch at `{at}`:\n  expected {expected}\n  actual   {actual}"))
}

fn matches_at(actual: &Value, expected: &Value, at: String) -> Result<(), String> {
    match (actual, expected) {
        (Value::Number(_), Value::Number(_)) => {
            if micros(actual) == micros(expected) {
                Ok(())
            } else {
                Err(at)
            }
        }
        (Value::Object(a), Value::Object(e)) => {
            for (key, want) in e {
                let got = a.get(key).ok_or_else(|| format!("{at}.{key} (missing)"))?;
                matches_at(got, want, format!("{at}.{key}"))?;
            }
            Ok(())
        }
        (Value::Array(a), Value::Array(e)) => {
            if a.len() != e.len() {
                return Err(format!("{at} (length {} != {})", a.len(), e.len()));
            }
            for (i, (got, want)) in a.iter().zip(e).enumerate() {
                matches_at(got, want, format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        _ if actual == expected => Ok(()),
        _ => Err(at),
    }
}

/// Parses a reply time: an RFC 3339 string in UTC, ending in `Z`.
#[track_caller]
pub fn time(value: &Value) -> jiff::Timestamp {
    let s = value
        .as_str()
        .unwrap_or_else(|| panic!("expected an RFC 3339 string, got {value}"));
    assert!(s.ends_with('Z'), "time {s:?} is not UTC with a `Z` suffix");
    s.parse()
        .unwrap_or_else(|e| panic!("time {s:?} is not RFC 3339: {e}"))
}

/// Whether `s` is a valid limit / record id, `[A-Za-z0-9._:-]{1,128}` (API.md).
pub fn is_valid_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Sorts a JSON array of objects by their `"id"` field (the API does not order lists).
pub fn sorted_by_id(list: &Value) -> Vec<Value> {
    let mut items = list
        .as_array()
        .unwrap_or_else(|| panic!("expected an array, got {list}"))
        .clone();
    items.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    items
}

// ---------------------------------------------------------------------------------------
// Fleets: several nodes gossiping on loopback.

/// The cluster key of test fleets (the server wants at least 16 bytes).
pub const CLUSTER_KEY: &str = "tally-tests-cluster-key-0123456789";
/// Gossip round interval of test fleets, in ms (the server's default, passed explicitly so
/// the timings below do not silently change with it).
pub const GOSSIP_INTERVAL_MS: u64 = 100;
/// How long a fleet may take from its last start until every node is ready and lists every
/// member as live.
pub const FLEET_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two probes of [`wait_until`] and [`wait_for`].
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// A UDP port on 127.0.0.1 that was free a moment ago: binds port 0, reads the port the
/// kernel chose and drops the socket. Never hands out the same port twice in one test
/// process, since tests run on parallel threads and the kernel may offer a port again once
/// it is released. (Another process could still take it before the node binds it; the node
/// then fails to start, loudly.)
pub fn free_udp_port() -> u16 {
    static HANDED_OUT: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    loop {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
        let port = socket.local_addr().expect("local address").port();
        drop(socket);
        if HANDED_OUT.lock().expect("port lock").insert(port) {
            return port;
        }
    }
}

/// `127.0.0.1:{port}`.
pub fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

impl NodeOpts {
    /// Several arguments at once.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The flags of a fleet member: a fixed node id, gossip on `127.0.0.1:{gossip_port}`
    /// (fixed, so a restarted node comes back at the address its peers know), one `--seed`
    /// per port of `seeds`, the cluster key, and [`GOSSIP_INTERVAL_MS`].
    pub fn gossip(node_id: &str, gossip_port: u16, seeds: &[u16], cluster_key: &str) -> Self {
        let mut opts = NodeOpts::default().args([
            "--node-id".to_string(),
            node_id.to_string(),
            "--gossip-listen".to_string(),
            loopback(gossip_port),
            "--cluster-key".to_string(),
            cluster_key.to_string(),
            "--gossip-interval-ms".to_string(),
            GOSSIP_INTERVAL_MS.to_string(),
        ]);
        for &seed in seeds {
            opts = opts.arg("--seed").arg(loopback(seed));
        }
        opts
    }
}

/// Calls `cond` every [`POLL_EVERY`] until it returns true (then returns how long that
/// took) or `timeout` has passed (then returns `None`). `cond` runs at least once.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// Calls `probe` every [`POLL_EVERY`] until it returns `Ok`, and returns that value and how
/// long it took. Panics after `timeout` with `what` and the last `Err` (which should say
/// what was seen instead of what was awaited).
#[track_caller]
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> (T, Duration) {
    let start = Instant::now();
    loop {
        let last = match probe() {
            Ok(value) => return (value, start.elapsed()),
            Err(e) => e,
        };
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// Whether `/readyz` answers 200 (a transport error counts as not ready).
pub fn is_ready(client: &Client) -> bool {
    matches!(client.try_request("GET", "/readyz", None), Ok((200, _)))
}

/// The sum of every sample of the metric `name` in `/metrics` (a plain `name value` line or
/// `name{labels} value` lines), or `None` if the node does not report it.
pub fn metric(client: &Client, name: &str) -> Option<f64> {
    let (status, text) = client.get_text("/metrics");
    assert_eq!(status, 200, "GET /metrics: {status} {text}");
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value: f64 = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric line {line:?} has no number"));
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// Members of the fleet as `GET /v1/cluster` on this node reports them: node id →
/// (gossip address, live). Checks the reply's shape and that it names the node itself.
pub fn cluster_members(
    client: &Client,
) -> Result<std::collections::BTreeMap<String, (String, bool)>, String> {
    let (status, body) = client
        .try_request("GET", "/v1/cluster", None)
        .map_err(|e| format!("GET /v1/cluster: {e}"))?;
    if status != 200 {
        return Err(format!("GET /v1/cluster: {status} {body}"));
    }
    let body = parse_body(&body);
    let nodes = body["nodes"]
        .as_array()
        .ok_or_else(|| format!("no nodes array in {body}"))?;
    let mut members = std::collections::BTreeMap::new();
    for m in nodes {
        let (Some(id), Some(addr), Some(live), true) = (
            m["node_id"].as_str(),
            m["gossip_addr"].as_str(),
            m["live"].as_bool(),
            m["generation"].is_u64(),
        ) else {
            return Err(format!("malformed member {m} in {body}"));
        };
        if members
            .insert(id.to_string(), (addr.to_string(), live))
            .is_some()
        {
            return Err(format!("node {id} listed twice in {body}"));
        }
    }
    let me = body["node_id"]
        .as_str()
        .ok_or_else(|| format!("no node_id in {body}"))?;
    if !members.contains_key(me) {
        return Err(format!("the node does not list itself: {body}"));
    }
    Ok(members)
}

/// `n` nodes `node-1` … `node-n` sharing [`CLUSTER_KEY`], each seeded with the gossip
/// address of every other member (so any of them, restarted, finds the others).
pub struct Fleet {
    pub nodes: Vec<Node>,
    /// Gossip port of `nodes[i]`.
    pub gossip_ports: Vec<u16>,
}

impl Fleet {
    /// Starts the fleet and waits (bounded by [`FLEET_READY_TIMEOUT`]) until it has formed.
    pub fn start(n: usize) -> Fleet {
        let gossip_ports: Vec<u16> = (0..n).map(|_| free_udp_port()).collect();
        let nodes = (0..n)
            .map(|i| {
                let seeds: Vec<u16> = gossip_ports
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, &p)| p)
                    .collect();
                let id = format!("node-{}", i + 1);
                let node = Node::start(NodeOpts::gossip(&id, gossip_ports[i], &seeds, CLUSTER_KEY));
                assert_eq!(node.node_id(), id, "the node took the id it was given");
                node
            })
            .collect();
        let fleet = Fleet {
            nodes,
            gossip_ports,
        };
        let took = fleet.wait_formed(FLEET_READY_TIMEOUT);
        eprintln!("fleet of {n}: ready and fully live after {took:?}");
        fleet
    }

    /// Node ids, in order.
    pub fn ids(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.node_id().to_string()).collect()
    }

    /// Waits until every node answers `/readyz` 200 and lists exactly the fleet's members,
    /// each live, at its gossip address. Returns how long that took.
    #[track_caller]
    pub fn wait_formed(&self, timeout: Duration) -> Duration {
        let want: std::collections::BTreeMap<String, (String, bool)> = self
            .nodes
            .iter()
            .zip(&self.gossip_ports)
            .map(|(n, &p)| (n.node_id().to_string(), (loopback(p), true)))
            .collect();
        let ((), took) = wait_for(timeout, "the fleet to form", || {
            for node in &self.nodes {
                if !is_ready(&node.client()) {
                    return Err(format!("{} not ready", node.node_id()));
                }
                let members = cluster_members(&node.client())?;
                if members != want {
                    return Err(format!(
                        "{} sees {members:?}, want {want:?}",
                        node.node_id()
                    ));
                }
            }
            Ok(())
        });
        took
    }
}

// ---------------------------------------------------------------------------------------
// Record clients that retry an id until it is acknowledged (crash and cluster tests).

/// Pause between attempts while the node is down.
pub const RETRY_PAUSE: Duration = Duration::from_millis(5);

/// What one record client saw.
#[derive(Debug, Default)]
pub struct RetryOutcome {
    /// Ids that got a 200, each once.
    pub acked: Vec<String>,
    /// Of those, ids retried after an unknown outcome that the node said it already had.
    pub retried_already_applied: usize,
    /// Attempts with an unknown outcome (transport error or 503).
    pub unknown: usize,
}

/// What a test's record clients share: when to stop, how many ids got a 200 so far, and the
/// bound on the whole load phase (a wedged server fails instead of hanging).
pub struct RetryLoad<'a> {
    pub stop: &'a AtomicBool,
    pub acked: &'a AtomicU64,
    pub deadline: Instant,
}

/// A client thread that behaves like a careful gateway: records ids `{name}-{k}` (the body
/// of each from `body(id)`) through `target` until `load.stop`, retrying an id whose outcome
/// is unknown (the node died, or refused for now with a 503) against the same target until
/// it gets a 200; it never leaves an id unresolved. While `target` is `None` (the node is
/// being killed, restarted or checked) it holds its pending id and waits: an id is only
/// ever retried against the node that may have applied it, since deduplication is per node.
pub fn retry_client(
    name: &str,
    target: &std::sync::RwLock<Option<Client>>,
    load: RetryLoad<'_>,
    body: impl Fn(&str) -> Value,
) -> RetryOutcome {
    let mut out = RetryOutcome::default();
    let mut k = 0;
    let mut pending: Option<(String, u32)> = None;
    loop {
        let (id, attempts) = match pending.take() {
            Some(p) => p,
            None if load.stop.load(AtomicOrdering::SeqCst) => return out,
            None => {
                k += 1;
                (format!("{name}-{k}"), 0)
            }
        };
        assert!(
            Instant::now() < load.deadline,
            "client {name}: id {id} unresolved at the deadline"
        );
        let Some(client) = target.read().expect("target lock").clone() else {
            pending = Some((id, attempts));
            std::thread::sleep(RETRY_PAUSE);
            continue;
        };
        let body = serde_json::to_vec(&body(&id)).expect("serialize");
        match client.try_request("POST", "/v1/usage", Some(&body)) {
            Ok((200, text)) => {
                let reply: Value = serde_json::from_str(&text).expect("JSON reply");
                let applied = reply["applied"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("no applied in {reply}"));
                if attempts == 0 {
                    assert!(applied, "fresh id {id} answered applied:false: {reply}");
                } else if !applied {
                    out.retried_already_applied += 1;
                }
                out.acked.push(id);
                load.acked.fetch_add(1, AtomicOrdering::SeqCst);
            }
            // Outcome unknown: the node died or is not ready. Retry the same id.
            Ok((503, _)) | Err(_) => {
                out.unknown += 1;
                pending = Some((id, attempts + 1));
                std::thread::sleep(RETRY_PAUSE);
            }
            Ok((status, text)) => panic!("client {name}: {id}: unexpected {status} {text}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Randomness with a printed seed.

/// The simulator's SplitMix64, good enough to pick kill moments.
pub use sim::Rng;

/// An [`Rng`] seeded from `TALLY_TEST_SEED` if set; else, in CI (`CI` set and not
/// `false`), a fixed seed derived from the test's name, so a CI run is repeatable; else from
/// the clock. Always printed so a failing run can be repeated.
pub fn rng_from_env_or_time(test: &str) -> Rng {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    let seed = match std::env::var("TALLY_TEST_SEED") {
        Ok(s) => s.parse().expect("TALLY_TEST_SEED must be a u64"),
        // FNV-1a of the name: fixed per test, different between tests.
        Err(_) if ci => test.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64,
    };
    eprintln!("{test}: seed {seed} (rerun with TALLY_TEST_SEED={seed})");
    // The raw state, so a seed picks the same moments as before the RNG was shared.
    Rng::from_state(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        assert_eq!(
            parse_listening("tally listening on http://127.0.0.1:40123 node=n-7f3a"),
            Some(("http://127.0.0.1:40123".into(), "n-7f3a".into()))
        );
        assert_eq!(
            parse_listening(
                "2026-11-22T06:00:00Z INFO tally listening on http://127.0.0.1:1 node=x"
            ),
            Some(("http://127.0.0.1:1".into(), "x".into()))
        );
        assert_eq!(
            parse_listening("tally listening on http://127.0.0.1:1"),
            None
        );
        assert_eq!(parse_listening("starting"), None);
    }

    #[test]
    fn numbers_compare_at_micro_precision() {
        assert_eq!(micros(&json!(2)), micros(&json!(2.0)));
        assert_eq!(micros(&json!(0.000001)), 1);
        assert_eq!(micros(&json!(12.5)), 12_500_000);
        assert_eq!(count(&json!(3.0)), 3);
        assert_matches(
            &json!({"a": 1, "b": {"c": [0.1, "x"]}, "extra": true}),
            &json!({"a": 1.0, "b": {"c": [0.1, "x"]}}),
        );
    }

    #[test]
    fn parses_raw_responses() {
        let plain = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 12\r\n\r\n{\"error\": 1}";
        assert_eq!(http_response_end(plain), Some(plain.len()));
        assert_eq!(parse_http_response(plain), Some((413, json!({"error": 1}))));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n[1,2\r\n1\r\n]\r\n0\r\n\r\n";
        assert_eq!(parse_http_response(chunked), Some((200, json!([1, 2]))));
        assert_eq!(
            http_response_end(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab"),
            None
        );
    }

    #[test]
    fn id_pattern() {
        assert!(is_valid_id("req-7f3a:1_2.3"));
        assert!(is_valid_id(&"a".repeat(128)));
        assert!(!is_valid_id(&"a".repeat(129)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a/b"));
    }
}
