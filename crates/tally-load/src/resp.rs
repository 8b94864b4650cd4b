//! A minimal Redis client: RESP2 encoding of commands, decoding of replies, and one
//! connection that sends a command and reads its whole reply (no pipelining in the
//! measured loop, like the HTTP client).
//!
//! Only what the benchmark needs: commands are arrays of bulk strings; replies may be any
//! RESP2 type. Decoding is incremental: [`decode`] returns `Ok(None)` until the buffer
//! holds a complete reply.

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Deepest array nesting accepted in a reply (the benchmark's replies are flat).
const DEPTH_MAX: usize = 8;
/// Largest bulk string or array accepted, so a corrupt length cannot allocate the world.
const LENGTH_MAX: i64 = 512 << 20;

/// A decoded reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    Array(Vec<Value>),
    Nil,
}

/// Appends `args` as one RESP command (an array of bulk strings) to `out`.
pub fn encode<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for arg in args {
        let arg = arg.as_ref();
        out.push(b'$');
        out.extend_from_slice(arg.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// `args` as one encoded command.
pub fn command<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = Vec::new();
    encode(&mut out, args);
    out
}

/// Decodes one reply from the front of `buf`: `Ok(Some((value, bytes used)))`, `Ok(None)`
/// if `buf` holds only part of a reply, `Err` if it is not RESP.
pub fn decode(buf: &[u8]) -> anyhow::Result<Option<(Value, usize)>> {
    decode_at(buf, 0, 0)
}

fn decode_at(buf: &[u8], at: usize, depth: usize) -> anyhow::Result<Option<(Value, usize)>> {
    if depth > DEPTH_MAX {
        bail!("RESP reply nested deeper than {DEPTH_MAX}");
    }
    let Some(line_end) = find_crlf(buf, at) else {
        return Ok(None);
    };
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let line = &buf[at + 1..line_end];
    let next = line_end + 2;
    let text = || String::from_utf8_lossy(line).into_owned();
    match kind {
        b'+' => Ok(Some((Value::Simple(text()), next))),
        b'-' => Ok(Some((Value::Error(text()), next))),
        b':' => Ok(Some((Value::Integer(parse_int(line)?), next))),
        b'$' => {
            let len = parse_int(line)?;
            if len < 0 {
                return Ok(Some((Value::Nil, next)));
            }
            if len > LENGTH_MAX {
                bail!("RESP bulk string of {len} bytes");
            }
            let end = next + len as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                bail!("RESP bulk string not followed by CRLF");
            }
            Ok(Some((Value::Bulk(buf[next..end].to_vec()), end + 2)))
        }
        b'*' => {
            let len = parse_int(line)?;
            if len < 0 {
                return Ok(Some((Value::Nil, next)));
            }
            if len > LENGTH_MAX {
                bail!("RESP array of {len} elements");
            }
            let mut items = Vec::with_capacity((len as usize).min(64));
            let mut at = next;
            for _ in 0..len {
                match decode_at(buf, at, depth + 1)? {
                    Some((item, after)) => {
                        items.push(item);
                        at = after;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Value::Array(items), at)))
        }
        other => bail!("not a RESP reply: type byte {other:#04x}"),
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|pair| pair == b"\r\n")
        .map(|offset| from + offset)
}

fn parse_int(line: &[u8]) -> anyhow::Result<i64> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|text| text.parse().ok())
        .with_context(|| format!("bad RESP integer {:?}", String::from_utf8_lossy(line)))
}

/// Parses `redis://host:port` (no auth, no database number) and resolves it.
pub fn parse_url(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("redis://")
        .with_context(|| format!("--url {url:?}: Redis mode wants redis://host:port"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '@', '?']) {
        bail!("--url {url:?}: only redis://host[:port] is supported");
    }
    let with_port = if rest.starts_with('[') {
        if rest.contains("]:") {
            rest.to_owned()
        } else {
            format!("{rest}:6379")
        }
    } else if rest.contains(':') {
        rest.to_owned()
    } else {
        format!("{rest}:6379")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {with_port}"))?
        .next()
        .with_context(|| format!("{with_port} resolves to no address"))
}

/// One connection; commands on it are strictly sequential.
#[derive(Debug)]
pub struct RespConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RespConn {
    /// Connects with Nagle off, as the HTTP client does.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends one encoded command and reads its reply.
    pub async fn call(&mut self, command: &[u8]) -> anyhow::Result<Value> {
        self.stream.write_all(command).await?;
        self.read_reply().await
    }

    async fn read_reply(&mut self) -> anyhow::Result<Value> {
        loop {
            if let Some((value, used)) = decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(value);
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            let read = self.stream.read_buf(&mut self.buf).await?;
            if read == 0 {
                bail!("the Redis server closed the connection");
            }
        }
    }

    /// Sends every command in `commands` back to back, then reads all their replies:
    /// pipelining, for setup only (the measured loop never pipelines).
    pub async fn pipeline(&mut self, commands: &[u8], count: usize) -> anyhow::Result<Vec<Value>> {
        self.stream.write_all(commands).await?;
        let mut replies = Vec::with_capacity(count);
        for _ in 0..count {
            replies.push(self.read_reply().await?);
        }
        Ok(replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_as_arrays_of_bulk_strings() {
        assert_eq!(
            command(&["SET", "k", "héllo"]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$6\r\nh\xc3\xa9llo\r\n"
        );
        assert_eq!(command::<&str>(&[]), b"*0\r\n");
    }

    #[test]
    fn decodes_every_reply_type() {
        let cases: [(&[u8], Value); 7] = [
            (b"+OK\r\n", Value::Simple("OK".into())),
            (b"-NOSCRIPT x\r\n", Value::Error("NOSCRIPT x".into())),
            (b":-42\r\n", Value::Integer(-42)),
            (b"$5\r\na\r\nbc\r\n", Value::Bulk(b"a\r\nbc".to_vec())),
            (b"$-1\r\n", Value::Nil),
            (b"*-1\r\n", Value::Nil),
            (
                b"*3\r\n:1\r\n*2\r\n$0\r\n\r\n:7\r\n+x\r\n",
                Value::Array(vec![
                    Value::Integer(1),
                    Value::Array(vec![Value::Bulk(vec![]), Value::Integer(7)]),
                    Value::Simple("x".into()),
                ]),
            ),
        ];
        for (bytes, want) in cases {
            let mut with_tail = bytes.to_vec();
            with_tail.extend_from_slice(b":9\r\n");
            assert_eq!(
                decode(&with_tail).unwrap(),
                Some((want, bytes.len())),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            // Every strict prefix is incomplete, never an error or a wrong value.
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut]).unwrap(), None, "prefix {cut}");
            }
        }
    }

    #[test]
    fn rejects_what_is_not_resp() {
        for bytes in [&b"?x\r\n"[..], b":abc\r\n", b"$3\r\nabcde\r\n"] {
            assert!(
                decode(bytes).is_err(),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let deep = "*1\r\n".repeat(DEPTH_MAX + 2) + ":1\r\n";
        assert!(decode(deep.as_bytes()).is_err());
    }

    #[test]
    fn parses_redis_urls() {
        assert_eq!(
            parse_url("redis://127.0.0.1:7393").unwrap(),
            "127.0.0.1:7393".parse().unwrap()
        );
        assert_eq!(parse_url("redis://127.0.0.1/").unwrap().port(), 6379);
        for url in ["http://127.0.0.1:1", "redis://u@h:1", "redis://h:1/0"] {
            assert!(parse_url(url).is_err(), "{url} accepted");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_reads_replies_split_across_packets() {
        use tokio::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 64];
            let read = socket.read(&mut request).await.unwrap();
            assert_eq!(&request[..read], command(&["PING"]).as_slice());
            for part in [&b"*2\r\n$3\r\nab"[..], b"c\r\n", b":5\r\n"] {
                socket.write_all(part).await.unwrap();
                socket.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        let mut conn = RespConn::connect(addr).await.unwrap();
        let reply = conn.call(&command(&["PING"])).await.unwrap();
        assert_eq!(
            reply,
            Value::Array(vec![Value::Bulk(b"abc".to_vec()), Value::Integer(5)])
        );
        assert!(conn.call(&command(&["PING"])).await.is_err());
    }
}
