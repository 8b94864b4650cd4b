//! `--mode redis`: the same check and record workloads against a central Redis, each
//! request one `EVALSHA` of a Lua script, so one round trip does what one tally request
//! does.
//!
//! **Data model.** Each planned limit `id` has a key `tally:max:{id}` holding its `max`
//! in micro-USD (written by `--setup`, like tally's `PUT /v1/limits`), and a usage counter
//! `tally:used:{id}:{period}` (an integer, created by the first `INCRBY`). The five limits
//! that apply to a request are the same five tally finds by scope; Redis cannot look them
//! up by attributes, so the client names them (the usual way to use Redis for this).
//!
//! **check** ([`CHECK_SCRIPT`], keys: five counters then the five maxima; arg: the
//! estimate): reads the ten keys with one `MGET`, and if every `used + estimate <= max`,
//! increments the five counters and returns `{1, used...}`; else returns `{0, first
//! denying index}`. That is tally's check and record of an allowed request in one atomic
//! step (tally's `POST /v1/check` only reads; its record is a second request).
//!
//! **record** ([`RECORD_SCRIPT`], keys: the dedup key `tally:dedup:{id}` then the five
//! counters; args: amount, dedup TTL): `SET dedup NX EX ttl`; if the id is new, `INCRBY`
//! the five counters and return 1, else 0. That is tally's `POST /v1/usage`: idempotent by
//! id, five increments. Durability is the server's configuration (`appendonly yes`,
//! `appendfsync always` makes Redis fsync its AOF before it replies).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::resp::{self, RespConn, Value};
use crate::run::Protocol;
use crate::workload::{
    LIMIT_MAX_MICROS, LimitPlan, REQUEST_COST_MICROS, applicable_limit_ids, key_for, usage_id,
};

/// Check five limits and, if all allow, count the request against them (atomically).
pub const CHECK_SCRIPT: &str = r"
local n = #KEYS / 2
local amount = tonumber(ARGV[1])
local values = redis.call('MGET', unpack(KEYS))
for i = 1, n do
  local max = tonumber(values[n + i])
  if max == nil then
    return redis.error_reply('no limit ' .. KEYS[n + i])
  end
  if (tonumber(values[i]) or 0) + amount > max then
    return {0, i}
  end
end
local reply = {1}
for i = 1, n do
  reply[i + 1] = redis.call('INCRBY', KEYS[i], amount)
end
return reply
";

/// Record usage against five limits once per id (the dedup key lives `ARGV[2]` seconds).
pub const RECORD_SCRIPT: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  return 0
end
for i = 2, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[1])
end
return 1
";

/// How long a record id is remembered: tally's default dedup window, 24 h.
const DEDUP_TTL_SECS: u64 = 24 * 3600;
/// `--setup` writes the maxima with `MSET`s of this many keys, pipelined this deep.
const SETUP_MSET_KEYS: usize = 1000;
const SETUP_PIPELINE: usize = 16;

/// Which script the run calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Check,
    Record,
}

/// The Redis [`Protocol`].
#[derive(Debug)]
pub struct Redis {
    addr: SocketAddr,
    workload: Workload,
    sha: String,
    /// Suffix of the counter keys: the current 30-day period, so reruns in one period
    /// share counters as tally's do.
    period: String,
    keys: usize,
    run_id: String,
    reported_error: AtomicBool,
}

/// What one connection sends next.
#[derive(Debug)]
pub struct RedisGen {
    connection: usize,
    n: u64,
    /// Check: one prebuilt command per attribute key.
    checks: Vec<Vec<u8>>,
}

impl Redis {
    /// Loads the workload's script (`SCRIPT LOAD`) and returns a protocol calling it.
    pub async fn new(
        addr: SocketAddr,
        workload: Workload,
        keys: usize,
        run_id: String,
    ) -> anyhow::Result<Self> {
        let mut conn = RespConn::connect(addr).await?;
        let script = match workload {
            Workload::Check => CHECK_SCRIPT,
            Workload::Record => RECORD_SCRIPT,
        };
        let sha = match conn
            .call(&resp::command(&["SCRIPT", "LOAD", script]))
            .await?
        {
            Value::Bulk(sha) => String::from_utf8(sha).context("SCRIPT LOAD: bad sha")?,
            other => bail!("SCRIPT LOAD answered {other:?}"),
        };
        let days = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs() / 86_400);
        Ok(Self {
            addr,
            workload,
            sha,
            period: format!("p{}", days / 30),
            keys,
            run_id,
            reported_error: AtomicBool::new(false),
        })
    }

    fn used_key(&self, id: &str) -> String {
        format!("tally:used:{id}:{}", self.period)
    }

    /// The `EVALSHA` of a check for attribute key `key`.
    pub fn check_command(&self, key: usize) -> Vec<u8> {
        let ids = applicable_limit_ids(key);
        let mut args: Vec<String> = vec!["EVALSHA".into(), self.sha.clone(), "10".into()];
        args.extend(ids.iter().map(|id| self.used_key(id)));
        args.extend(ids.iter().map(|id| max_key(id)));
        args.push(REQUEST_COST_MICROS.to_string());
        resp::command(&args)
    }

    /// The `EVALSHA` of a connection's `n`-th record.
    pub fn record_command(&self, connection: usize, n: u64) -> Vec<u8> {
        let key = key_for(connection, n, self.keys);
        let id = usage_id(connection, n, &self.run_id);
        let mut args: Vec<String> = vec![
            "EVALSHA".into(),
            self.sha.clone(),
            "6".into(),
            format!("tally:dedup:{id}"),
        ];
        args.extend(applicable_limit_ids(key).iter().map(|id| self.used_key(id)));
        args.push(REQUEST_COST_MICROS.to_string());
        args.push(DEDUP_TTL_SECS.to_string());
        resp::command(&args)
    }

    pub fn generator(&self, connection: usize) -> RedisGen {
        let checks = match self.workload {
            Workload::Check => (0..self.keys).map(|key| self.check_command(key)).collect(),
            Workload::Record => Vec::new(),
        };
        RedisGen {
            connection,
            n: 0,
            checks,
        }
    }

    /// Maps a reply to a status: 200 for the script's answer (a denial is an answer, as
    /// in tally), 500 for an error reply (the first is printed).
    fn status(&self, reply: &Value) -> u16 {
        let ok = match (self.workload, reply) {
            (Workload::Check, Value::Array(items)) => {
                matches!(items.first(), Some(Value::Integer(0 | 1)))
            }
            (Workload::Record, Value::Integer(0 | 1)) => true,
            _ => false,
        };
        if ok {
            return 200;
        }
        if !self.reported_error.swap(true, Ordering::Relaxed) {
            eprintln!("redis: unexpected reply {reply:?}");
        }
        500
    }
}

impl Protocol for Redis {
    type Conn = RespConn;
    type Gen = RedisGen;

    async fn connect(&self) -> anyhow::Result<RespConn> {
        RespConn::connect(self.addr).await
    }

    async fn call(&self, conn: &mut RespConn, generator: &mut RedisGen) -> anyhow::Result<u16> {
        let n = generator.n;
        generator.n += 1;
        let reply = match self.workload {
            Workload::Check => {
                let key = key_for(generator.connection, n, self.keys);
                conn.call(&generator.checks[key]).await?
            }
            Workload::Record => {
                conn.call(&self.record_command(generator.connection, n))
                    .await?
            }
        };
        Ok(self.status(&reply))
    }
}

fn max_key(id: &str) -> String {
    format!("tally:max:{id}")
}

/// `--setup` for Redis: writes every planned limit's maximum (pipelined `MSET`s; setup is
/// not measured).
pub async fn create_limits(addr: SocketAddr, plan: LimitPlan) -> anyhow::Result<()> {
    let mut conn = RespConn::connect(addr).await?;
    let max = LIMIT_MAX_MICROS.to_string();
    let mut next = 0;
    while next < plan.total() {
        let mut commands = Vec::new();
        let mut count = 0;
        while count < SETUP_PIPELINE && next < plan.total() {
            let end = (next + SETUP_MSET_KEYS).min(plan.total());
            let mut args = vec!["MSET".to_owned()];
            for n in next..end {
                args.push(max_key(&plan.parts(n).id));
                args.push(max.clone());
            }
            resp::encode(&mut commands, &args);
            count += 1;
            next = end;
        }
        for reply in conn.pipeline(&commands, count).await? {
            if reply != Value::Simple("OK".into()) {
                bail!("MSET answered {reply:?}");
            }
        }
    }
    Ok(())
}

/// Runs one check for key 0 and returns how many counters the script reports.
pub async fn probe(redis: &Redis) -> anyhow::Result<usize> {
    let mut conn = RespConn::connect(redis.addr).await?;
    match conn.call(&redis.check_command(0)).await? {
        Value::Array(items) if items.first() == Some(&Value::Integer(1)) => Ok(items.len() - 1),
        other => bail!("probe check answered {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(workload: Workload) -> Redis {
        Redis {
            addr: "127.0.0.1:1".parse().unwrap(),
            workload,
            sha: "abc".into(),
            period: "p7".into(),
            keys: 2,
            run_id: "r".into(),
            reported_error: AtomicBool::new(false),
        }
    }

    fn args(command: &[u8]) -> Vec<String> {
        let mut args = Vec::new();
        let mut at = 0;
        let text = String::from_utf8(command.to_vec()).unwrap();
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert!(lines[0].starts_with('*'));
        at += 1;
        while at + 1 < lines.len() {
            args.push(lines[at + 1].to_owned());
            at += 2;
        }
        args
    }

    #[test]
    fn check_names_the_five_counters_then_the_five_maxima() {
        let args = args(&redis(Workload::Check).check_command(1));
        assert_eq!(&args[..3], ["EVALSHA", "abc", "10"]);
        assert_eq!(args[3], "tally:used:load-vk-1:p7");
        assert_eq!(args[7], "tally:used:load-model-gpt-4o:p7");
        assert_eq!(args[8], "tally:max:load-vk-1");
        assert_eq!(args[12], "tally:max:load-model-gpt-4o");
        assert_eq!(args[13], "100");
        assert_eq!(args.len(), 14);
    }

    #[test]
    fn records_carry_a_unique_dedup_key() {
        let redis = redis(Workload::Record);
        let first = args(&redis.record_command(3, 0));
        let second = args(&redis.record_command(3, 1));
        assert_eq!(&first[..3], ["EVALSHA", "abc", "6"]);
        assert_eq!(first[3], "tally:dedup:load-3-0-r");
        assert_ne!(first[3], second[3]);
        assert_eq!(first[4], "tally:used:load-vk-1:p7");
        assert_eq!(second[4], "tally:used:load-vk-0:p7");
        assert_eq!(&first[9..], ["100", "86400"]);
    }

    #[test]
    fn replies_map_to_statuses() {
        let check = redis(Workload::Check);
        assert_eq!(
            check.status(&Value::Array(vec![Value::Integer(1), Value::Integer(5)])),
            200
        );
        assert_eq!(
            check.status(&Value::Array(vec![Value::Integer(0), Value::Integer(2)])),
            200
        );
        assert_eq!(check.status(&Value::Error("NOSCRIPT".into())), 500);
        let record = redis(Workload::Record);
        assert_eq!(record.status(&Value::Integer(0)), 200);
        assert_eq!(record.status(&Value::Nil), 500);
    }

    /// A throwaway `redis-server` on a free loopback port, killed on drop.
    struct Server {
        child: std::process::Child,
        addr: SocketAddr,
        _dir: tempfile::TempDir,
    }

    impl Server {
        /// `None` when `redis-server` is not installed (the test is then skipped).
        fn start() -> Option<Server> {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = tempfile::tempdir().unwrap();
            let child = std::process::Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .ok()?;
            Some(Server {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                _dir: dir,
            })
        }

        async fn connect(&self) -> RespConn {
            for _ in 0..200 {
                if let Ok(conn) = RespConn::connect(self.addr).await {
                    return conn;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            panic!("redis-server did not start on {}", self.addr);
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn scripts_check_and_record_on_a_real_redis() {
        let Some(server) = Server::start() else {
            eprintln!("skipped: redis-server is not installed");
            return;
        };
        let mut conn = server.connect().await;
        let plan = LimitPlan::new(20, 2).unwrap();
        create_limits(server.addr, plan).await.unwrap();
        let check = Redis::new(server.addr, Workload::Check, 2, "r".into())
            .await
            .unwrap();
        assert_eq!(probe(&check).await.unwrap(), 5);
        let used = |id: &str| resp::command(&["GET", &check.used_key(id)]);
        assert_eq!(
            conn.call(&used("load-vk-0")).await.unwrap(),
            Value::Bulk(b"100".to_vec())
        );

        // A low max on key 1's team limit: one more check fits, the next is denied and
        // counts nothing.
        conn.call(&resp::command(&["SET", "tally:max:load-team-1", "150"]))
            .await
            .unwrap();
        let allowed = conn.call(&check.check_command(1)).await.unwrap();
        assert_eq!(
            allowed,
            Value::Array(vec![
                Value::Integer(1),
                Value::Integer(100),
                Value::Integer(100),
                Value::Integer(100),
                Value::Integer(200),
                Value::Integer(200),
            ])
        );
        let denied = conn.call(&check.check_command(1)).await.unwrap();
        assert_eq!(
            denied,
            Value::Array(vec![Value::Integer(0), Value::Integer(2)])
        );
        assert_eq!(check.status(&denied), 200);
        assert_eq!(
            conn.call(&used("load-model-gpt-4o")).await.unwrap(),
            Value::Bulk(b"200".to_vec())
        );

        // A record counts once per id.
        let record = Redis::new(server.addr, Workload::Record, 2, "r".into())
            .await
            .unwrap();
        let first = conn.call(&record.record_command(0, 0)).await.unwrap();
        let again = conn.call(&record.record_command(0, 0)).await.unwrap();
        assert_eq!((first, again), (Value::Integer(1), Value::Integer(0)));
        assert_eq!(
            conn.call(&used("load-model-gpt-4o")).await.unwrap(),
            Value::Bulk(b"300".to_vec())
        );

        // The closed loop runs clean against it.
        let config = crate::run::RunConfig {
            connections: 4,
            warmup: std::time::Duration::from_millis(20),
            duration: std::time::Duration::from_millis(200),
            request_timeout: std::time::Duration::from_secs(5),
        };
        let record = std::sync::Arc::new(record);
        let generators = std::sync::Arc::clone(&record);
        let stats = crate::run::run(record, |c| generators.generator(c), config).await;
        assert!(stats.requests > 10);
        assert_eq!(stats.errors(), 0);
    }
}
