//! The HTTP/1.1 client half: one keep-alive connection per [`Conn`], requests stamped from a
//! prebuilt [`RequestTemplate`] so the hot loop does no parsing.
//!
//! Owns only transport; what is sent (bodies, paths) is `workload`'s business and what is
//! measured is `run`'s.

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::run::Protocol;
use crate::workload::BodyGen;

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
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection task ends when `sender` is dropped or the peer closes.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn { sender })
    }
}

/// One HTTP/1.1 connection; requests on it are strictly sequential (no pipelining).
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    /// Sends `request` and reads the whole response body.
    pub async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), hyper::Error> {
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Method, path and headers of a request, built once; [`RequestTemplate::build`] only
/// clones them and attaches a body.
#[derive(Clone, Debug)]
pub struct RequestTemplate {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl RequestTemplate {
    /// `json` adds `Content-Type: application/json` (set it when bodies are non-empty).
    pub fn new(target: &Target, method: Method, path: &str, json: bool) -> anyhow::Result<Self> {
        let uri: Uri = path.parse().with_context(|| format!("bad path {path:?}"))?;
        if uri.scheme().is_some() || !path.starts_with('/') {
            bail!("path {path:?} must start with '/'");
        }
        let mut headers = HeaderMap::new();
        headers.insert(HOST, target.host.clone());
        if let Some(authorization) = &target.authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        if json {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        Ok(Self {
            method,
            uri,
            headers,
        })
    }

    pub fn build(&self, body: Bytes) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
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
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), "/v1/check");
        assert_eq!(request.headers()[HOST], "127.0.0.1:7070");
        assert_eq!(request.headers()[AUTHORIZATION], "Bearer t");
        assert_eq!(request.headers()[CONTENT_TYPE], "application/json");

        let template = RequestTemplate::new(&target, Method::GET, "/healthz", false).unwrap();
        assert!(
            !template
                .build(Bytes::new())
                .headers()
                .contains_key(CONTENT_TYPE)
        );
        assert!(RequestTemplate::new(&target, Method::GET, "healthz", false).is_err());
    }
}
