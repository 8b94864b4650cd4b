//! The HTTP/1.1 client half: one keep-alive connection per [`Conn`], requests stamped from a
//! prebuilt [`RequestTemplate`] so the hot loop does no header work.
//!
//! A hand-written client, as minimal as the RESP client of the Redis rows (one write per
//! request, one buffer per connection, `Content-Length` bodies only), so that every row
//! of a comparison pays the same small client cost and the numbers measure the servers.
//! Anything it does not understand (chunked bodies, interim responses) is an error, not a
//! guess.
//!
//! Owns only transport; what is sent (bodies, paths) is `workload`'s business and what is
//! measured is `run`'s.

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context, bail};
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::run::Protocol;
use crate::workload::BodyGen;

/// Largest response head or body accepted, so a broken server cannot make us allocate
/// without bound.
const RESPONSE_BYTES_MAX: usize = 16 << 20;

/// Where to connect and what to put in `Host`/`Authorization`; resolved once, up front.
#[derive(Clone, Debug)]
pub struct Target {
    addr: SocketAddr,
    host: HeaderValue,
    authorization: Option<HeaderValue>,
}

impl Target {
    /// Parses `http://host[:port][/]` (no path prefix, no TLS) and resolves the host.
    pub fn parse(url: &str, token: Option<&str>) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("bad --url {url:?}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("--url {url:?}: only http:// is supported");
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            bail!("--url {url:?}: give the server root; paths come from the scenario");
        }
        let authority = uri
            .authority()
            .with_context(|| format!("--url {url:?} has no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        let addr = (authority.host().trim_matches(['[', ']']), port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .with_context(|| format!("{authority} resolves to no address"))?;
        let host = HeaderValue::from_str(authority.as_str())?;
        let authorization = token
            .map(|token| HeaderValue::from_str(&format!("Bearer {token}")))
            .transpose()
            .context("--token is not a valid header value")?;
        Ok(Self {
            addr,
            host,
            authorization,
        })
    }

    /// Opens one keep-alive connection with Nagle off (each request is one small write and
    /// we wait for its answer: delaying it would only add latency).
    pub async fn connect(&self) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(8192),
        })
    }
}

/// One HTTP/1.1 connection; requests on it are strictly sequential (no pipelining).
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Sends one request (built by [`RequestTemplate::build`]) and reads the whole
    /// response: its status and body.
    pub async fn send(&mut self, request: Vec<u8>) -> anyhow::Result<(StatusCode, Bytes)> {
        self.stream.write_all(&request).await?;
        self.buf.clear();
        let (status, head_len, body_len) = loop {
            if let Some(head) = parse_head(&self.buf)? {
                break head;
            }
            self.fill().await?;
        };
        let total = head_len + body_len;
        while self.buf.len() < total {
            self.fill().await?;
        }
        if self.buf.len() > total {
            bail!("the server sent bytes after the response (no pipelining here)");
        }
        Ok((status, Bytes::copy_from_slice(&self.buf[head_len..total])))
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.buf.len() >= RESPONSE_BYTES_MAX {
            bail!("response larger than {RESPONSE_BYTES_MAX} bytes");
        }
        self.buf.reserve(8192);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            bail!("the server closed the connection");
        }
        Ok(())
    }
}

/// Parses a response head at the start of `buf`: `Ok(None)` until it is complete, then
/// (status, head length, body length).
fn parse_head(buf: &[u8]) -> anyhow::Result<Option<(StatusCode, usize, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > RESPONSE_BYTES_MAX {
            bail!("response head larger than {RESPONSE_BYTES_MAX} bytes");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let status = StatusCode::from_bytes(code.as_bytes())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    if status.is_informational() {
        bail!("interim {status} responses are not supported");
    }
    let mut body_len = None;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("bad header line {line:?}"))?;
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .trim()
                .parse()
                .with_context(|| format!("bad content-length {value:?}"))?;
            if n > RESPONSE_BYTES_MAX {
                bail!("response body of {n} bytes");
            }
            body_len = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("transfer-encoding {value:?} is not supported (Content-Length only)");
        }
    }
    Ok(Some((status, end + 4, body_len.unwrap_or(0))))
}

/// Method, path and headers of a request, rendered once; [`RequestTemplate::build`] only
/// appends the body's length and the body.
#[derive(Clone, Debug)]
pub struct RequestTemplate {
    head: Vec<u8>,
}

impl RequestTemplate {
    /// `json` adds `Content-Type: application/json` (set it when bodies are non-empty).
    pub fn new(target: &Target, method: Method, path: &str, json: bool) -> anyhow::Result<Self> {
        let uri: Uri = path.parse().with_context(|| format!("bad path {path:?}"))?;
        if uri.scheme().is_some() || !path.starts_with('/') {
            bail!("path {path:?} must start with '/'");
        }
        let mut head = format!("{method} {uri} HTTP/1.1\r\nhost: ").into_bytes();
        head.extend_from_slice(target.host.as_bytes());
        if let Some(authorization) = &target.authorization {
            head.extend_from_slice(b"\r\nauthorization: ");
            head.extend_from_slice(authorization.as_bytes());
        }
        if json {
            head.extend_from_slice(b"\r\ncontent-type: application/json");
        }
        head.extend_from_slice(b"\r\ncontent-length: ");
        Ok(Self { head })
    }

    /// The whole request, ready to write.
    pub fn build(&self, body: Bytes) -> Vec<u8> {
        let len = itoa::Buffer::new().format(body.len()).to_owned();
        let mut request = Vec::with_capacity(self.head.len() + len.len() + 4 + body.len());
        request.extend_from_slice(&self.head);
        request.extend_from_slice(len.as_bytes());
        request.extend_from_slice(b"\r\n\r\n");
        request.extend_from_slice(&body);
        request
    }
}

/// The HTTP/1.1 [`Protocol`]: one fixed method, path and headers, bodies from a [`BodyGen`].
#[derive(Debug)]
pub struct Http {
    target: Target,
    template: RequestTemplate,
}

impl Http {
    pub fn new(target: Target, template: RequestTemplate) -> Self {
        Self { target, template }
    }
}

impl Protocol for Http {
    type Conn = Conn;
    type Gen = BodyGen;

    async fn connect(&self) -> anyhow::Result<Conn> {
        self.target.connect().await
    }

    async fn call(&self, conn: &mut Conn, bodies: &mut BodyGen) -> anyhow::Result<u16> {
        let request = self.template.build(bodies.next_body());
        let (status, _body) = conn.send(request).await?;
        Ok(status.as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loopback_urls() {
        let target = Target::parse("http://127.0.0.1:7070", Some("secret")).unwrap();
        assert_eq!(target.addr, "127.0.0.1:7070".parse().unwrap());
        assert_eq!(target.host, "127.0.0.1:7070");
        assert_eq!(target.authorization.as_ref().unwrap(), "Bearer secret");

        let target = Target::parse("http://127.0.0.1/", None).unwrap();
        assert_eq!(target.addr.port(), 80);
        assert!(target.authorization.is_none());

        let target = Target::parse("http://[::1]:9000", None).unwrap();
        assert_eq!(target.addr, "[::1]:9000".parse().unwrap());
    }

    #[test]
    fn rejects_what_it_cannot_do() {
        for url in [
            "https://127.0.0.1:7070",
            "127.0.0.1:7070",
            "http://127.0.0.1:7070/v1",
            "http://127.0.0.1:7070/?a=b",
        ] {
            assert!(Target::parse(url, None).is_err(), "{url} accepted");
        }
    }

    #[test]
    fn template_stamps_method_path_and_headers() {
        let target = Target::parse("http://127.0.0.1:7070", Some("t")).unwrap();
        let template = RequestTemplate::new(&target, Method::POST, "/v1/check", true).unwrap();
        let request = template.build(Bytes::from_static(b"{}"));
        assert_eq!(
            String::from_utf8(request).unwrap(),
            "POST /v1/check HTTP/1.1\r\nhost: 127.0.0.1:7070\r\nauthorization: Bearer t\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        );
        let template = RequestTemplate::new(&target, Method::GET, "/healthz", false).unwrap();
        assert_eq!(
            String::from_utf8(template.build(Bytes::new())).unwrap(),
            "GET /healthz HTTP/1.1\r\nhost: 127.0.0.1:7070\r\nauthorization: Bearer t\r\ncontent-length: 0\r\n\r\n"
        );
        assert!(RequestTemplate::new(&target, Method::GET, "healthz", false).is_err());
    }

    #[test]
    fn response_heads_are_parsed_strictly() {
        let ok =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(
            parse_head(ok).unwrap(),
            Some((StatusCode::OK, ok.len() - 5, 5))
        );
        assert_eq!(parse_head(&ok[..20]).unwrap(), None, "incomplete");
        let empty = b"HTTP/1.1 404 Not Found\r\n\r\n";
        assert_eq!(
            parse_head(empty).unwrap(),
            Some((StatusCode::NOT_FOUND, empty.len(), 0))
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"SPDY 200\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
